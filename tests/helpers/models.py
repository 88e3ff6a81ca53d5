"""Models that look trained: BatchNorm layers with non-trivial running statistics and affine parameters
(`randomize_bn`, or `realistic_bn` with statistics measured on parity-like inputs), and a .safetensors weights file
of such a model standing in for a user's checkpoint (`write_trained_weights`)."""
from __future__ import annotations

from pathlib import Path

import torch

from bnport.data.transforms import InputSpec
from bnport.export.parity import build_parity_inputs


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
