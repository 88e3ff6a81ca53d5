"""Which torch device to use: `auto` means CUDA only if it really works, else CPU, said in one line.

A CUDA build of torch on a machine without a usable GPU reports `is_available() == False`; a broken driver can
report True and then fail on the first kernel, so `auto` and `cuda` run one tiny operation before trusting it.
"""
from __future__ import annotations

import torch

from bnport.errors import BnportError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def cuda_works() -> tuple[bool, str]:
    """(usable, reason): whether a CUDA tensor op really runs here."""
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False (no GPU or no driver visible to torch)"
    try:
        x = torch.ones(8, device="cuda")
        torch.cuda.synchronize()
        return bool((x * 2).sum().item() == 16), "ok"
    except Exception as e:  # a broken driver or toolkit mismatch surfaces here
        return False, f"{type(e).__name__}: {e}"


def resolve_torch_device(device: str | None) -> tuple[torch.device, str]:
    """Map --device auto|cpu|cuda[:N] to a torch.device and a one-line note saying what was chosen and why."""
    device = device or "auto"
    if device == "cpu":
        return torch.device("cpu"), "device: cpu (as asked)"
    if device == "auto" or device.startswith("cuda"):
        ok, reason = cuda_works()
        if ok:
            target = torch.device("cuda" if device == "auto" else device)
            return target, f"device: {target} ({torch.cuda.get_device_name(target)})"
        if device == "auto":
            return torch.device("cpu"), f"device: cpu (CUDA not usable: {reason})"
        raise BnportError(f"CUDA was requested but torch cannot use it: {reason}",
                          "install a CUDA build of torch with a working driver, or use --device cpu")
    raise BnportError(f"unknown device {device!r}", "use auto, cpu or cuda")
