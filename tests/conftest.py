"""Shared test fixtures: real image files in tmp_path and models with randomised BatchNorm statistics."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bnport.data.transforms import InputSpec
from bnport.export.parity import build_parity_inputs


def write_images(folder: Path, count: int, *, seed: int = 0, size=(112, 112), ids: int = 3,
                 fmt: str = "jpg") -> list[Path]:
    """`count` real image files of random faces-sized noise with a per-identity colour cast, in `ids` sub-folders."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        sub = folder / f"id{i % ids:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, size=3)
        pixels = np.clip(rng.normal(base, 40, size=(*size, 3)), 0, 255).astype(np.uint8)
        path = sub / f"img{i:03d}.{fmt}"
        Image.fromarray(pixels).save(path, quality=95) if fmt == "jpg" else Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BN non-trivial running statistics and affine parameters, as a trained model has."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            if m.affine:
                with torch.no_grad():
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model


VAR_FLOOR = 1e-2


def realistic_bn(model: torch.nn.Module, *, size: tuple[int, int] = (112, 112), seed: int = 0) -> torch.nn.Module:
    """Random affine BN parameters and running statistics measured (BN layers alone in train mode, as calibration
    does) on the kinds of input parity uses, then perturbed by up to 20%: every BN has non-trivial statistics to
    fold while the network stays as well conditioned as a trained one. Gammas are small (0.1-0.4, a fifth of them
    negative), as trained nets' mostly are, and variances are floored at VAR_FLOOR: random weights leave some
    channels nearly constant on a few noise images, and dividing by their tiny variance made random EfficientNets
    so ill-conditioned (outputs 1e3-1e4) that PyTorch float32 itself drifted 1e-3 of the scale from float64."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        if bn.affine:
            c = bn.num_features
            sign = torch.where(torch.rand(c, generator=g) < 0.2, -1.0, 1.0)
            with torch.no_grad():
                bn.weight.copy_(sign * (torch.rand(c, generator=g) * 0.3 + 0.1))
                bn.bias.copy_(torch.randn(c, generator=g) * 0.2)
        bn.reset_running_stats()
        bn.momentum = None
    model.eval()
    for bn in bns:
        bn.train()
    calibration, _ = build_parity_inputs(InputSpec(*size), seed=seed + 1)
    with torch.no_grad():
        model(calibration)
    for bn in bns:
        bn.momentum = 0.1
        bn.running_var.mul_(torch.rand(bn.num_features, generator=g) * 0.4 + 0.8).clamp_(min=VAR_FLOOR)
    return model.eval()


def write_trained_weights(path: Path, arch: str = "iresnet_tiny", *, seed: int = 0) -> Path:
    """A .safetensors state dict of `arch` with realistic BN statistics, standing in for a trained checkpoint."""
    from safetensors.torch import save_file

    from bnport.model.arch import create_model

    model = realistic_bn(create_model(arch), seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def tiny_run(root: Path, *, images: int = 16, trained: bool = True, **settings) -> Path:
    """A calibration run of iresnet_tiny in root/run, on `images` real images written to root/calib (with weights
    from `write_trained_weights` in root/w.safetensors when `trained`, else its seeded initialisation), quiet and on
    the CPU; `settings` (mode, batch_size, epochs, noise...) go to bnport.calibrate.engine.calibrate."""
    from bnport.calibrate.engine import calibrate
    from bnport.calibrate.settings import CalibrationSettings
    from bnport.model.load import load_model

    weights = write_trained_weights(root / "w.safetensors") if trained else None
    write_images(root / "calib", images)
    calibrate(load_model("iresnet_tiny", weights=weights), root / "calib", root / "run",
              CalibrationSettings(workers=0, **settings), device="cpu", progress=False, log=lambda m: None)
    return root / "run"


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    write_images(folder, 24)
    return folder


@pytest.fixture(autouse=True)
def _single_thread():
    """Two cores are shared by the suite: one intra-op thread keeps tests from oversubscribing."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
