"""The architecture registry: `@register_model` adds a factory under a name, `create_model(name)` builds it.

Each entry also says the input size the architecture expects, so a registered name is a complete model spec.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from bnport.errors import BnportError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[..., nn.Module]
    input_size: tuple[int, int]
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, input_size: tuple[int, int] = (112, 112), description: str = ""):
    """Decorator: register `factory` under `name`."""
    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelEntry(name, factory, input_size, description or (factory.__doc__ or "").strip())
        return factory
    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise BnportError(f"unknown model {name!r}", f"registered models: {', '.join(list_models())}; "
                          "or give torchvision:NAME, path/to/file.py:factory, package.module:factory, "
                          "a TorchScript file")
    return _REGISTRY[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered architecture `name` with random weights."""
    return get_entry(name).factory(**kwargs)
