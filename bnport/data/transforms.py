"""The input spec (size, mean, std, channel order) and the one function that applies it.

Every path that feeds a model (calibration data, noise images, parity inputs, benchmark images) turns a
decoded uint8 RGB image into a network input through `InputSpec.to_tensor`, so the spec is applied the same
way everywhere. The default is insightface's: 112x112, `(x / 255 - 0.5) / 0.5`, i.e. mean = std = 127.5, RGB.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

from bnport.errors import BnportError


def _triple(value: float | tuple[float, ...] | list[float]) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) == 1:
        return values * 3
    if len(values) != 3:
        raise BnportError(f"expected 1 or 3 values, got {len(values)}: {values}",
                          "give one number or three, e.g. 127.5 or 123.7,116.3,103.5")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes a network input: resize to height x width, RGB or BGR, then
    (x - mean) / std per channel, mean and std listed in the model's channel order."""

    height: int = 112
    width: int = 112
    mean: tuple[float, float, float] = field(default=(127.5, 127.5, 127.5))
    std: tuple[float, float, float] = field(default=(127.5, 127.5, 127.5))
    bgr: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", _triple(self.mean))
        object.__setattr__(self, "std", _triple(self.std))
        if self.height <= 0 or self.width <= 0:
            raise BnportError(f"input size must be positive, got {self.height}x{self.width}",
                              "use e.g. --input-size 112x112")
        if any(s == 0 for s in self.std):
            raise BnportError(f"std must not be zero, got {self.std}", "use e.g. --std 127.5")

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    def resize(self, image: np.ndarray) -> np.ndarray:
        """Resize an HxWx3 uint8 RGB array to the spec's size (bilinear), unchanged if it already fits."""
        if image.shape[:2] == (self.height, self.width):
            return image
        return np.array(Image.fromarray(image).resize((self.width, self.height), Image.BILINEAR))

    def to_tensor(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 RGB -> float32 3xHxW network input (resized, channel order and normalisation applied)."""
        import torch

        image = self.resize(image)
        if self.bgr:
            image = image[:, :, ::-1]
        x = torch.from_numpy(np.array(image, dtype=np.uint8, order="C")).permute(2, 0, 1).float()  # a writable copy
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def to_dict(self) -> dict:
        return {"height": self.height, "width": self.width, "mean": list(self.mean), "std": list(self.std),
                "bgr": self.bgr, "layout": "NCHW", "dtype": "float32",
                "formula": "(uint8 pixels in the model's channel order - mean) / std, per channel, "
                           "mean/std in that same order"}

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        return cls(height=int(d["height"]), width=int(d["width"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   bgr=bool(d.get("bgr", False)))


def parse_size(text: str) -> tuple[int, int]:
    """'112x112' or '112' -> (112, 112)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise BnportError(f"bad input size {text!r}", "write it as HxW, e.g. 112x112") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise BnportError(f"bad input size {text!r}", "write it as HxW, e.g. 112x112")
    return values[0], values[1]


def parse_floats(text: str) -> tuple[float, ...]:
    """'127.5' or '123.7,116.3,103.5' -> floats."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise BnportError(f"bad number list {text!r}", "give one number or three separated by commas") from None
