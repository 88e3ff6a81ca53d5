"""A CPU stand-in for a real device's moves, so the CPU suite sees what a GPU would.

On a GPU, `tensor.to("cuda")` makes a new tensor, and so does `module.to(...)` for every parameter; on the CPU,
`.to("cpu")` of a CPU tensor returns the same tensor, which hides every bug that a move would expose (a module moved
inside `torch.inference_mode` comes back holding inference tensors that can no longer be updated in place or traced).
`copying_moves()` patches `torch.Tensor.to` so that a call naming a device copies even when the tensor is already
there, exactly as a move to another device would; `module_state` records what a library call must leave as it was.
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch

_REAL_TO = torch.Tensor.to


def _names_device(args: tuple, kwargs: dict) -> bool:
    if "device" in kwargs:
        return True
    return any(isinstance(a, (str, torch.device, torch.Tensor)) for a in args)


def _copying_to(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    out = _REAL_TO(self, *args, **kwargs)
    if out is self and _names_device(args, kwargs):
        out = out.clone()  # what a move to another device gives: a new tensor (its autograd history included)
        copying_moves.count += 1
    return out


@contextlib.contextmanager
def copying_moves() -> Iterator[None]:
    """Every `Tensor.to(device...)` (hence every `Module.to(device)`) makes a copy for the duration."""
    copying_moves.count = 0
    torch.Tensor.to = _copying_to
    try:
        yield
    finally:
        torch.Tensor.to = _REAL_TO


copying_moves.count = 0


def module_state(module: torch.nn.Module) -> dict:
    """What a library call must not change in its caller's module: each tensor's device and identity, whether any is
    an inference tensor, each submodule's train/eval flag, each parameter's requires_grad."""
    tensors = list(itertools.chain(module.named_parameters(), module.named_buffers()))
    return {"devices": {name: t.device for name, t in tensors},
            "tensors": {name: id(t) for name, t in module.named_parameters()},
            "inference": sorted(name for name, t in tensors if t.is_inference()),
            "training": {name: m.training for name, m in module.named_modules()},
            "requires_grad": {name: p.requires_grad for name, p in module.named_parameters()}}
