"""The published method's own analysis views, computed: how likely each BN layer finds its inputs under its running
statistics, and how far each input's normalised output lies from the clean images' centre, per input group (clean
calibration images, each noise source of the run, an optional out-of-domain folder).

Definitions (per BN layer, its running statistics mu_c, var_c and eps as the layer normalises with them):
- **log-likelihood**: for an input activation x at channel c, -log N(x | mu_c, var_c + eps) =
  0.5 log(2 pi (var_c + eps)) + (x - mu_c)^2 / (2 (var_c + eps)). The figure of one channel position (an image and a
  spatial position; the whole feature vector of a 1-d BN) is its mean over the channels, so layers of different widths
  read on one scale. Channels whose running variance is zero or not finite are excluded by name (`excluded`): under
  them the figure is dominated by eps alone, not by the data.
- **distance to centre**: the layer's output of each image, flattened, against the mean output of the clean images
  (the centre): cosine similarity and Euclidean distance, per image.

Layers: the first five and the last five BN layers in module order (all of them below ten). Every number comes from an
eval-mode forward with hooks on the chosen BN layers; the models are the run's snapshots (BN statistics swapped into
one loaded model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bnport.errors import BnportError

LAYERS_EACH_END = 5
SAMPLES = 4000  # values kept per (layer, group) for a distribution; summaries use every value
BATCH = 16


@dataclass
class InputGroup:
    """Images (N x C x H x W, normalised input space) fed as one group; `name` as the plots label it."""

    name: str
    images: object


@dataclass
class LayerFigures:
    """One model's figures at one BN layer for one input group: samples of the per-position negative
    log-likelihood, of each image's cosine to the clean centre and of its Euclidean distance to it, and the median
    negative log-likelihood over every position."""

    nll: np.ndarray
    cosine: np.ndarray
    distance: np.ndarray
    nll_median: float


@dataclass
class ModelAnalysis:
    """`figures[layer][group]` for one model (a snapshot's label); `excluded[layer]` names the channels left out of
    the log-likelihood (zero or non-finite running variance)."""

    model: str
    figures: dict[str, dict[str, LayerFigures]]
    excluded: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class Analysis:
    """What the three views draw: `models` holds the baseline and the selected snapshot at `layers`; `per_snapshot`
    holds, for every snapshot, the median negative log-likelihood per group at the last two BN layers
    (`per_snapshot[label][layer][group]`)."""

    layers: list[str]
    groups: list[str]
    models: list[ModelAnalysis]
    last_layers: list[str]
    per_snapshot: dict[str, dict[str, dict[str, float]]]
    n_images: int
    notes: list[str] = field(default_factory=list)


def chosen_layers(names: list[str], each_end: int = LAYERS_EACH_END) -> list[str]:
    """The first and last `each_end` BN layers; every one of them when there are fewer than 2 x each_end."""
    return list(names) if len(names) <= 2 * each_end else list(names[:each_end]) + list(names[-each_end:])


def input_groups(manifest: dict, spec, clean, *, ood: str | Path | None = None, seed: int = 0) -> list[InputGroup]:
    """Clean images first, then one group per noise source the run mixed in (blur at each end of its sigma range,
    gauss-add, Gaussian-noise images, fractals, its out-of-domain folder), then `ood`. A run without noise gets
    Gaussian-noise images and fractals, so the views always compare clean against something."""
    import torch

    from bnport.calibrate.noise import blur_images, generate_fractal

    n = len(clean)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    noise = manifest.get("calibration", {}).get("noise", []) or [{"name": "gauss-append", "std": 1.0},
                                                                   {"name": "fractal"}]
    groups = [InputGroup("clean", clean)]
    for source in noise:
        kind = source.get("name")
        if kind == "blur":
            for sigma in sorted({float(source["sigma_min"]), float(source["sigma_max"])}):
                groups.append(InputGroup(f"blur sigma={sigma:g}", blur_images(clean, [sigma] * n)))
        elif kind == "gauss-add":
            std = float(source.get("std", 0.1))
            groups.append(InputGroup(f"gauss-add std={std:g}", clean + std * torch.randn(clean.shape,
                                                                                         generator=generator)))
        elif kind == "gauss-append":
            std = float(source.get("std", 1.0))
            groups.append(InputGroup("gaussian images", std * torch.randn(clean.shape, generator=generator)))
        elif kind == "fractal":
            fractals = [spec.to_tensor(generate_fractal(rng, spec.height, spec.width)) for _ in range(n)]
            groups.append(InputGroup("fractals", torch.stack(fractals).float()))
        elif kind == "ood":
            groups.append(_folder_group(f"ood {Path(source['path']).name}", source["path"], spec, n))
    if ood is not None:
        groups.append(_folder_group(f"ood {Path(ood).name}", ood, spec, n))
    return groups


def _folder_group(name: str, src, spec, n: int) -> InputGroup:
    from bnport.export.parity import load_parity_images

    if not Path(src).exists():
        raise BnportError(f"out-of-domain images {src} not found", "point --ood at a folder, list, .rec or .bin")
    return InputGroup(name, load_parity_images(str(src), spec, limit=n))


def analyse_model(module, label: str, groups: list[InputGroup], layers: list[str], *,
                  samples: int = SAMPLES) -> ModelAnalysis:
    """Every figure of `module` (eval mode, its BN statistics as they stand) at `layers` for each group; the clean
    group must come first (its mean output is the centre)."""
    import torch

    from bnport.model.snapshot import bn_modules

    bns = dict(bn_modules(module))
    missing = [name for name in layers if name not in bns]
    if missing:
        raise BnportError(f"BN layers {', '.join(missing)} are not in the model", "draw the report of this run anew")
    if not groups or groups[0].name != "clean":
        raise ValueError("the clean group comes first: its outputs define the centre")
    stats = {name: _layer_stats(bns[name]) for name in layers}
    figures: dict[str, dict[str, LayerFigures]] = {name: {} for name in layers}
    centres: dict[str, torch.Tensor] = {}
    module.eval()
    for group in groups:
        inputs, outputs = _forward(module, {name: bns[name] for name in layers}, group.images)
        for name in layers:
            mean, var, keep = stats[name]
            nll = _position_nll(inputs[name], mean, var, keep)
            flat = outputs[name].reshape(len(outputs[name]), -1)
            if group.name == "clean":
                centres[name] = flat.mean(dim=0)
            cosine = torch.nn.functional.cosine_similarity(flat, centres[name][None], dim=1)
            distance = (flat - centres[name][None]).norm(dim=1)
            figures[name][group.name] = LayerFigures(nll=_subsample(nll.numpy(), samples),
                                                     cosine=cosine.numpy().astype(np.float64),
                                                     distance=distance.numpy().astype(np.float64),
                                                     nll_median=float(np.median(nll.numpy())))
    excluded = {name: np.flatnonzero(~stats[name][2].numpy()).tolist() for name in layers
                if not bool(stats[name][2].all())}
    return ModelAnalysis(model=label, figures=figures, excluded=excluded)


def _layer_stats(bn):
    """(mean, var + eps, kept channels) in float64; a channel is kept when its running variance is finite and > 0."""
    import torch

    mean = bn.running_mean.detach().double().cpu()
    raw = bn.running_var.detach().double().cpu()
    keep = torch.isfinite(raw) & (raw > 0) & torch.isfinite(mean)
    return mean, raw + bn.eps, keep


def _forward(module, bns: dict, images):
    """Each chosen BN's inputs and outputs over `images` (float64, CPU), in batches of BATCH."""
    import torch

    captured_in: dict[str, list] = {name: [] for name in bns}
    captured_out: dict[str, list] = {name: [] for name in bns}

    def hook(name):
        def grab(bn, args, output):
            captured_in[name].append(args[0].detach().double().cpu())
            captured_out[name].append(output.detach().double().cpu())
        return grab

    handles = [bn.register_forward_hook(hook(name)) for name, bn in bns.items()]
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    try:
        with torch.inference_mode():
            for start in range(0, len(images), BATCH):
                module(images[start:start + BATCH].to(device))
    finally:
        for h in handles:
            h.remove()
    return ({name: torch.cat(v) for name, v in captured_in.items()},
            {name: torch.cat(v) for name, v in captured_out.items()})


def _position_nll(x, mean, var, keep):
    """Mean over the kept channels of -log N(x | mean_c, var_c), one value per (image, spatial position)."""
    if not bool(keep.any()):
        raise BnportError("a BN layer has no channel with a positive running variance",
                          "its statistics are degenerate; recalibrate or check the weights")
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m, v = mean.view(shape), var.view(shape)
    per_value = 0.5 * math.log(2 * math.pi) + 0.5 * v.log() + (x - m) ** 2 / (2 * v)
    per_value = per_value[:, keep]
    return per_value.mean(dim=1).reshape(-1)


def _subsample(values: np.ndarray, n: int) -> np.ndarray:
    if len(values) <= n:
        return values.astype(np.float64)
    return values[np.linspace(0, len(values) - 1, n).astype(int)].astype(np.float64)


def analyse_run(run, picks: list[int], *, n_images: int = 32, ood: str | Path | None = None,
                seed: int = 0) -> Analysis:
    """The three views for `run`: distributions for the snapshots in `picks` (baseline and selected), and the median
    log-likelihood at the last two BN layers for every snapshot. Raises BnportError when the calibration data is
    gone."""
    from bnport.export.parity import load_parity_images
    from bnport.model.snapshot import apply_bn_state, bn_modules, load_snapshot, load_snapshot_model

    manifest = run.manifest()
    src = manifest.get("data", {}).get("src")
    if not src or not Path(src).exists():
        raise BnportError(f"the run's calibration data {src} is gone", "restore it to draw the BN analysis views")
    loaded = load_snapshot_model(run.snapshot(0).tensors)
    spec, module = loaded.input_spec, loaded.module
    clean = load_parity_images(src, spec, limit=n_images)
    groups = input_groups(manifest, spec, clean, ood=ood, seed=seed)
    names = [name for name, _ in bn_modules(module)]
    layers = chosen_layers(names)
    last = names[-2:]
    models, per_snapshot = [], {}
    for ref in run.snapshots():
        apply_bn_state(module, load_snapshot(ref.tensors)[0])
        wanted = layers if ref.index in picks else last
        result = analyse_model(module, ref.label, groups, sorted(set(wanted) | set(last), key=names.index))
        per_snapshot[ref.label] = {layer: {g: f.nll_median for g, f in result.figures[layer].items()}
                                   for layer in last}
        if ref.index in picks:
            models.append(result)
    notes = [f"{m.model}, {layer}: {len(ch)} channel(s) with zero or non-finite running variance left out of the "
             f"log-likelihood ({', '.join(map(str, ch[:8]))}{', ...' if len(ch) > 8 else ''})"
             for m in models for layer, ch in m.excluded.items()]
    return Analysis(layers=layers, groups=[g.name for g in groups], models=models, last_layers=last,
                    per_snapshot=per_snapshot, n_images=len(clean), notes=notes)
