"""`ModelOptions`: how a MODEL spec is loaded (weights, wrapper key, strictness, pickle trust) and what its input is
(size, mean, std, channel order). Declared once; the CLI of every command that takes a MODEL and the `[model]` table
of `bnport run` build it alike (bnport.options)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from bnport.data.transforms import _triple, parse_floats, parse_size
from bnport.options import Setting, SettingsGroup

SPEC = Setting("spec", None, "str", "MODEL: a registered name (iresnet50, mobilefacenet...), torchvision:NAME, "
               "path/to/file.py:factory, package.module:factory or a TorchScript file", required=True)


@dataclass(frozen=True)
class ModelOptions(SettingsGroup):
    """`weights`: a state dict file (None: the architecture's seeded initialisation); `weights_key`: the checkpoint
    key holding it; `strict`: mismatched keys are an error; `trust_pickle`: unpickle more than tensors. Input spec
    overrides (None keeps the model's own): `input_size` (H, W), `mean`, `std` (three floats), `bgr`."""

    weights: str | None = None
    weights_key: str | None = None
    strict: bool = True
    trust_pickle: bool = False
    input_size: tuple[int, int] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    bgr: bool | None = None

    SETTINGS: ClassVar[tuple[Setting, ...]] = (
        Setting("weights", None, "str", "state dict (.pt/.pth/.safetensors)", path=True),
        Setting("weights_key", None, "str", "key of the checkpoint dict that holds the state dict"),
        Setting("non_strict", False, "bool", "load weights even if some keys are missing or unexpected"),
        Setting("trust_pickle", False, "bool", "allow full unpickling of the weights file (runs its code)"),
        Setting("input_size", None, "str", "HxW (default: the architecture's, 112x112 for face models)"),
        Setting("mean", None, "numbers", "per-channel mean, one or three numbers (default 127.5)"),
        Setting("std", None, "numbers", "per-channel std, one or three numbers (default 127.5)"),
        Setting("bgr", False, "bool", "the model takes BGR input (default RGB)"),
    )

    @classmethod
    def _convert(cls, values: dict[str, Any]) -> dict[str, Any]:
        out = dict(values)
        out["strict"] = not out.pop("non_strict", False)
        if out.get("input_size") is not None:
            out["input_size"] = parse_size(out["input_size"])
        for key in ("mean", "std"):
            if out.get(key) is not None:
                out[key] = _triple(parse_floats(out[key]))
        out["bgr"] = out.get("bgr") or None  # False from a flag left unset means "the model's own"
        return out

    @property
    def sets_input(self) -> bool:
        """Whether any input-spec option is given."""
        return any(v is not None for v in (self.input_size, self.mean, self.std, self.bgr))

    def input_names(self) -> list[str]:
        """The options of the input spec that are set, as the CLI spells them."""
        return [f"--{k.replace('_', '-')}" for k in ("input_size", "mean", "std", "bgr") if getattr(self, k)]
