"""The embedded demo (bnport/demo/): the committed weights load into the registered `iresnet_demo` with strict keys
and tell genuine from impostor pairs on the committed benchmarks; the benchmarks read back through bnport's readers
and agree with their own labels; and a built wheel, installed into a fresh environment, carries every file the demo
reads and finds them without the checkout and without importing torch."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from bnport.data import decode_image, read_bin_pack
from bnport.data.transforms import InputSpec
from bnport.demo import DEMO_INPUT_SIZE, DEMO_MODEL, demo_files
from bnport.model import arch
from bnport.model.load import load_model
from tests.helpers.paths import REPO


@pytest.fixture(scope="module")
def files():
    return demo_files()


@pytest.fixture(scope="module")
def model(files) -> torch.nn.Module:
    return load_model(files.model, weights=files.weights).module


def embed(model: torch.nn.Module, encoded: list[bytes]) -> np.ndarray:
    """Decode and preprocess as bnport feeds a model (RGB, 32x32, (x - 127.5) / 127.5), then L2-normalise in
    float64."""
    spec = InputSpec(*DEMO_INPUT_SIZE)
    x = torch.stack([spec.to_tensor(decode_image(data)) for data in encoded])
    with torch.no_grad():
        out = model(x).double().numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def read_pairs(path: Path) -> list[tuple[str, str, int]]:
    with open(path, newline="") as f:
        return [(a, b, int(label)) for a, b, label in csv.reader(f)]


def test_registry_entry_is_a_small_iresnet_for_32x32():
    entry = arch.get_entry(DEMO_MODEL)
    assert entry.input_size == DEMO_INPUT_SIZE == (32, 32)
    model = arch.create_model(DEMO_MODEL)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 1 + 3 * 4 + 4 + 2  # stem, three per block, one downsample per stage, head bn2 + features
    assert sum(p.numel() for p in model.parameters()) < 250_000
    assert {type(m) for m in model.modules()} >= {arch.iresnet.IResNet, arch.iresnet.IBasicBlock}


def test_weights_load_with_strict_keys_and_are_trained(files, model):
    state = load_file(str(files.weights))
    assert set(state) == set(model.state_dict())  # strict: nothing missing, nothing left over
    assert files.weights.stat().st_size < 1_000_000
    untrained = load_model(files.model).module.state_dict()
    moved = [k for k, v in state.items() if v.is_floating_point() and not torch.equal(v, untrained[k])]
    assert len(moved) > 0.9 * sum(v.is_floating_point() for v in state.values())
    assert all(int(state[k]) > 0 for k in state if k.endswith("num_batches_tracked"))


def test_embeddings_are_finite_and_unit_normalisable(files, model):
    encoded = [p.read_bytes() for p in sorted(files.calibration.glob("*.png"))[:16]]
    spec = InputSpec(*DEMO_INPUT_SIZE)
    x = torch.stack([spec.to_tensor(decode_image(data)) for data in encoded])
    with torch.no_grad():
        out = model(x)
    assert out.shape == (16, 64) and torch.isfinite(out).all()
    norms = out.norm(dim=1)
    assert (norms > 1e-3).all()
    # distinct images give distinct directions: no collapsed embedding
    unit = torch.nn.functional.normalize(out.double(), dim=1)
    off_diagonal = (unit @ unit.T)[~torch.eye(16, dtype=torch.bool)]
    assert off_diagonal.max() < 1 - 1e-6


def test_bin_pack_reads_back_as_insightface_folds(files):
    pack = read_bin_pack(files.bin_pack)
    assert len(pack.issame) == 3000 and len(pack.images) == 6000
    # ten folds of 300 pairs, half genuine in each, as insightface's packs
    assert (pack.issame.reshape(10, 300).sum(axis=1) == 150).all()
    for data in pack.images[:50]:
        assert decode_image(data).shape == (32, 32, 3)


def test_pairs_csv_names_existing_images_and_its_labels_match_the_identity_folders(files):
    pairs = read_pairs(files.pairs_csv)
    assert len(pairs) == 12000 and sum(label for *_, label in pairs) == 2000
    root = files.pairs_csv.parent
    names = {name for a, b, _ in pairs for name in (a, b)}
    assert all((root / name).is_file() for name in names)
    assert names == {str(p.relative_to(root)) for p in files.identities.rglob("*.png")}
    # one sub-folder per identity: a pair is genuine exactly when both images sit in the same folder
    assert all((Path(a).parent == Path(b).parent) == bool(label) for a, b, label in pairs)
    assert len({tuple(sorted((a, b))) for a, b, _ in pairs}) == len(pairs)  # no pair twice


def test_calibration_folder_holds_a_few_hundred_small_images(files):
    images = sorted(files.calibration.glob("*.png"))
    assert 200 <= len(images) <= 500
    assert decode_image(images[0].read_bytes()).shape == (32, 32, 3)


def test_model_separates_genuine_from_impostor_pairs(files, model):
    pairs = read_pairs(files.pairs_csv)[:3000]
    root = files.pairs_csv.parent
    names = sorted({name for a, b, _ in pairs for name in (a, b)})
    unit = dict(zip(names, embed(model, [(root / n).read_bytes() for n in names])))
    labels = np.array([label for *_, label in pairs])
    scores = np.array([unit[a] @ unit[b] for a, b, _ in pairs])
    assert roc_auc_score(labels, scores) > 0.8

    pack = read_bin_pack(files.bin_pack)
    n = 600
    emb = embed(model, pack.images[:2 * n])
    scores = np.sum(emb[0::2] * emb[1::2], axis=1)
    assert roc_auc_score(pack.issame[:n], scores) > 0.8


def folder_digest(root: Path, prefix: str) -> str:
    """What `find PREFIX -type f | LC_ALL=C sort | xargs sha256sum | sha256sum` prints, run inside `root`."""
    names = sorted(((f"./{p.relative_to(root).as_posix()}" if prefix == "." else p.relative_to(root).as_posix())
                    for p in (root / prefix).rglob("*") if p.is_file()), key=str.encode)
    lines = "".join(f"{hashlib.sha256((root / name).read_bytes()).hexdigest()}  {name}\n" for name in names)
    return hashlib.sha256(lines.encode()).hexdigest()


def test_card_lists_the_shipped_files_sizes_and_digests(files):
    card = files.card.read_text()
    rows = {m[1]: (int(m[2].replace(",", "")), m[3])
            for m in re.finditer(r"^\| `([^`]+)` \|[^\n]*\| ([\d,]+) \| `([0-9a-f]{64})` \|$", card, re.M)}
    assert set(rows) == {"iresnet_demo.safetensors", "digits.bin", "pairs.csv", "calibration/", "images/<digit>/"}
    for name in ("iresnet_demo.safetensors", "digits.bin", "pairs.csv"):
        path = files.root / name
        assert rows[name] == (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()), name
    for name, folder in (("calibration/", "calibration"), ("images/<digit>/", "images")):
        size = sum(p.stat().st_size for p in (files.root / folder).rglob("*.png"))
        assert rows[name] == (size, folder_digest(files.root, folder)), name
    assert folder_digest(files.root, ".") in card
    assert "python tools/train_demo.py" in card


def test_importing_the_accessor_does_not_import_torch():
    code = "import sys, bnport.demo; bnport.demo.demo_files(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "False"


WHEEL_CHECK = textwrap.dedent("""
    import hashlib, json, sys
    import bnport.demo
    from bnport.errors import BnportError
    f = bnport.demo.demo_files()
    found = {"module": bnport.demo.__file__, "root": str(f.root), "model": f.model, "input_size": f.input_size,
             "torch_imported": "torch" in sys.modules,
             "sha256": {name: hashlib.sha256(getattr(f, name).read_bytes()).hexdigest()
                        for name in ("weights", "bin_pack", "pairs_csv", "card")},
             "calibration": len(list(f.calibration.glob("*.png"))),
             "identities": len(list(f.identities.rglob("*.png")))}
    f.weights.unlink()
    try:
        bnport.demo.demo_files()
    except BnportError as e:
        found["missing_error"] = e.message
    print(json.dumps(found))
""")


@pytest.mark.slow
def test_built_wheel_installed_in_a_fresh_venv_finds_the_demo_files(tmp_path, files):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    # a copy, so the in-tree build leaves nothing in the checkout
    shutil.copytree(REPO / "bnport", src / "bnport", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(src)], check=True, capture_output=True)
    (wheel,) = wheels.glob("bnport-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    demo = files.root.relative_to(REPO)
    expected = {str(p.relative_to(REPO)) for p in (REPO / demo).rglob("*") if p.is_file()}
    assert expected <= names, sorted(expected - names)[:5]
    assert "bnport/demo/README.md" in names and not any("train_demo" in name for name in names)

    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   capture_output=True)
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = subprocess.run([str(python), "-c", WHEEL_CHECK], cwd=work, env=clean_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert Path(found["module"]).is_relative_to(env_dir) and Path(found["root"]).is_relative_to(env_dir)
    assert found["model"] == DEMO_MODEL and tuple(found["input_size"]) == DEMO_INPUT_SIZE
    assert found["torch_imported"] is False
    for name, digest in found["sha256"].items():
        assert digest == hashlib.sha256(getattr(files, name).read_bytes()).hexdigest(), name
    assert found["calibration"] == len(list(files.calibration.glob("*.png")))
    assert found["identities"] == len(list(files.identities.rglob("*.png")))
    assert "missing" in found["missing_error"] and "iresnet_demo.safetensors" in found["missing_error"]
