"""Noise sources mixed into calibration batches, and the mix that applies them.

A noise source is parsed from a spec such as `blur:p=0.05,sigma=3-5`, `gauss-append:ratio=0.05,std=1`,
`gauss-add:std=0.1`, `ood:DIR,ratio=0.05` or `fractal:ratio=0.05`. Blur and gauss-add modify the real images of a
batch; gauss-append, ood and fractal append images after them, `ratio * N` per batch on average (stochastic
rounding, so small batches still see noise). Everything random in a batch is drawn from generators seeded by
(seed, step, rank, source index) alone, so a resumed run reproduces the same batches and every rank sees its own
noise. Tensor noise is drawn on the batch's device: its values are reproducible per device type. All noise lives in
the normalised input space of the `InputSpec`; blur commutes with per-channel normalisation, so blurring the
normalised tensor equals blurring the pixels.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bnport.data.transforms import InputSpec
from bnport.errors import BnportError

ACCEPTED_FORMS = ("blur[:p=0.05,sigma=3-5]", "gauss-append[:ratio=0.05,std=1]", "gauss-add[:std=0.1]",
                  "ood:DIR[,ratio=0.05]", "fractal[:ratio=0.05]")
_HINT = "accepted forms: " + ", ".join(ACCEPTED_FORMS) + " (sigma may be one value, e.g. sigma=4)"
# A source whose every draw lands on unreadable files must not loop forever; this bounds the retries per image.
_OOD_TRIES_PER_IMAGE = 20
# Sums of map areas (|det|) kept: below, a sparse dust of dots; above, an overlapping blob (FractalDB filters both).
_FRACTAL_AREA = (0.45, 1.5)


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass(frozen=True)
class NoiseSource:
    """A configured noise source; `name` is its kind as written in a spec."""

    name: ClassVar[str] = ""
    # Appending sources add `ratio * N` images after the real ones; the others modify the real images.
    appends: ClassVar[bool] = False

    def spec(self) -> str:
        """The canonical spec text; `parse_noise(source.spec())` gives the source back."""
        return self.name + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in self._params().items())

    def to_dict(self) -> dict:
        """Name, parameters and canonical spec, for run.json."""
        return {"name": self.name, **self._params(), "spec": self.spec()}

    def _params(self) -> dict:
        raise NotImplementedError


@dataclass(frozen=True)
class BlurNoise(NoiseSource):
    """Gaussian-blur each real image with probability `p`, sigma drawn uniformly in [sigma_min, sigma_max]."""

    name: ClassVar[str] = "blur"
    p: float = 0.05
    sigma_min: float = 3.0
    sigma_max: float = 5.0

    def spec(self) -> str:
        sigma = _fmt(self.sigma_min)
        if self.sigma_max != self.sigma_min:
            sigma += f"-{_fmt(self.sigma_max)}"
        return f"blur:p={_fmt(self.p)},sigma={sigma}"

    def _params(self) -> dict:
        return {"p": self.p, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


@dataclass(frozen=True)
class GaussAddNoise(NoiseSource):
    """Add N(0, std) noise to every real image, in normalised input space."""

    name: ClassVar[str] = "gauss-add"
    std: float = 0.1

    def _params(self) -> dict:
        return {"std": self.std}


@dataclass(frozen=True)
class GaussAppendNoise(NoiseSource):
    """Append `ratio * N` images of pure N(0, std) noise, in normalised input space."""

    name: ClassVar[str] = "gauss-append"
    appends: ClassVar[bool] = True
    ratio: float = 0.05
    std: float = 1.0

    def _params(self) -> dict:
        return {"ratio": self.ratio, "std": self.std}


@dataclass(frozen=True)
class OodNoise(NoiseSource):
    """Append `ratio * N` out-of-domain images read from `path` (any source `bnport.data.open_images` reads)."""

    name: ClassVar[str] = "ood"
    appends: ClassVar[bool] = True
    path: str = ""
    ratio: float = 0.05

    def spec(self) -> str:
        return f"ood:{self.path},ratio={_fmt(self.ratio)}"

    def _params(self) -> dict:
        return {"path": self.path, "ratio": self.ratio}


@dataclass(frozen=True)
class FractalNoise(NoiseSource):
    """Append `ratio * N` procedurally generated IFS fractal images (see `generate_fractal`)."""

    name: ClassVar[str] = "fractal"
    appends: ClassVar[bool] = True
    ratio: float = 0.05

    def _params(self) -> dict:
        return {"ratio": self.ratio}


_KINDS: dict[str, type[NoiseSource]] = {c.name: c for c in (BlurNoise, GaussAddNoise, GaussAppendNoise, OodNoise,
                                                             FractalNoise)}


def _bad(text: str, problem: str) -> BnportError:
    return BnportError(f"bad noise spec {text!r}: {problem}", _HINT)


def _number(text: str, key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise _bad(text, f"{key}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise _bad(text, f"{key}={value!r} is not a finite number")
    return number


def _options(text: str, items: list[str], allowed: tuple[str, ...]) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not value.strip():
            raise _bad(text, f"expected key=value, got {item!r}")
        if key not in allowed:
            raise _bad(text, f"unknown key {key!r} (this kind takes {', '.join(allowed)})")
        if key in options:
            raise _bad(text, f"{key} given twice")
        options[key] = value.strip()
    return options


def _fraction(text: str, key: str, value: str) -> float:
    number = _number(text, key, value)
    if not 0.0 <= number <= 1.0:
        raise _bad(text, f"{key}={value} is outside [0, 1]")
    return number


def _positive(text: str, key: str, value: str) -> float:
    number = _number(text, key, value)
    if number <= 0:
        raise _bad(text, f"{key}={value} must be > 0")
    return number


def _sigma_range(text: str, value: str) -> tuple[float, float]:
    low, sep, high = value.partition("-")
    lo = _positive(text, "sigma", low)
    hi = _positive(text, "sigma", high) if sep else lo
    if hi < lo:
        raise _bad(text, f"sigma range {value} is reversed (write it low-high, e.g. sigma=3-5)")
    return lo, hi


def parse_noise(text: str) -> NoiseSource:
    """Parse one noise spec (`blur:p=0.05,sigma=3-5`, `ood:DIR,ratio=0.05`, ...); omitted keys take their defaults.

    A bad spec raises BnportError naming it and listing the accepted forms.
    """
    kind, _, rest = text.strip().partition(":")
    kind = kind.strip().lower()
    items = [item for item in rest.split(",") if item.strip()] if rest.strip() else []
    if kind not in _KINDS:
        raise _bad(text, f"unknown kind {kind!r} (known: {', '.join(_KINDS)})")
    if kind == "blur":
        options = _options(text, items, ("p", "sigma"))
        lo, hi = _sigma_range(text, options["sigma"]) if "sigma" in options else (3.0, 5.0)
        p = _fraction(text, "p", options["p"]) if "p" in options else 0.05
        return BlurNoise(p=p, sigma_min=lo, sigma_max=hi)
    if kind == "gauss-add":
        options = _options(text, items, ("std",))
        return GaussAddNoise(std=_positive(text, "std", options["std"]) if "std" in options else 0.1)
    if kind == "gauss-append":
        options = _options(text, items, ("ratio", "std"))
        return GaussAppendNoise(ratio=_fraction(text, "ratio", options["ratio"]) if "ratio" in options else 0.05,
                                std=_positive(text, "std", options["std"]) if "std" in options else 1.0)
    if kind == "fractal":
        options = _options(text, items, ("ratio",))
        return FractalNoise(ratio=_fraction(text, "ratio", options["ratio"]) if "ratio" in options else 0.05)
    return _parse_ood(text, items)


def _parse_ood(text: str, items: list[str]) -> OodNoise:
    # Options are taken from the right, so a path that itself contains a comma still parses.
    keyed: list[str] = []
    while items and items[-1].strip().partition("=")[0].strip() in ("ratio", "path"):
        keyed.insert(0, items.pop())
    options = _options(text, keyed, ("ratio", "path"))
    positional = ",".join(items).strip()
    if positional and "path" in options:
        raise _bad(text, "the directory is given twice (as DIR and as path=)")
    path = positional or options.get("path", "")
    if not path:
        raise _bad(text, "ood needs a directory, e.g. ood:/data/ood_images,ratio=0.05")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise BnportError(f"bad noise spec {text!r}: {path} does not exist",
                          "give an existing image folder, list file, .rec or .bin after 'ood:'")
    return OodNoise(path=path, ratio=_fraction(text, "ratio", options["ratio"]) if "ratio" in options else 0.05)


def _kernel_1d(sigma: float, radius: int, width: int) -> torch.Tensor:
    """A normalised Gaussian of `radius`, zero-padded to 2 * width + 1 taps so kernels of different radii stack."""
    taps = torch.arange(-width, width + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2) * (taps.abs() <= radius)
    return kernel / kernel.sum()


def blur_images(images: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Gaussian-blur each image of an N x C x H x W batch with its own sigma (separable, reflect padding).

    The kernel radius is ceil(3 * sigma), clamped per axis to size - 1 so reflect padding fits the image; the
    truncated kernel is renormalised to sum 1, so a constant image stays constant.
    """
    n, c, h, w = images.shape
    if len(sigmas) != n:
        raise ValueError(f"{len(sigmas)} sigmas for {n} images")
    if n == 0:
        return images.clone()
    out = images
    for axis, size in ((3, w), (2, h)):
        radii = [min(math.ceil(3 * s), size - 1) for s in sigmas]
        width = max(radii)
        if width == 0:
            continue
        kernels = torch.stack([_kernel_1d(s, r, width) for s, r in zip(sigmas, radii)])
        weight = kernels.to(images.dtype).repeat_interleave(c, dim=0).to(images.device)
        shape = (n * c, 1, 1, 2 * width + 1) if axis == 3 else (n * c, 1, 2 * width + 1, 1)
        pad = (width, width, 0, 0) if axis == 3 else (0, 0, width, width)
        flat = F.pad(out.reshape(1, n * c, h, w), pad, mode="reflect")
        out = F.conv2d(flat, weight.view(shape), groups=n * c).view(n, c, h, w)
    return out


def _affine_maps(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """2-4 random contracting affine maps (rotations and singular values < 1), as rows [a, b, c, d, e, f] of
    x' = [[a, b], [c, d]] x + [e, f], and the probability of each in the chaos game."""
    while True:
        k = int(rng.integers(2, 5))
        s1 = rng.uniform(0.35, 0.95, k)
        s2 = s1 * rng.uniform(0.25, 1.0, k) * rng.choice([-1.0, 1.0], k)
        if _FRACTAL_AREA[0] <= np.abs(s1 * s2).sum() <= _FRACTAL_AREA[1]:
            break
    a, b = rng.uniform(0, 2 * np.pi, (2, k))
    rot_a = np.stack([np.cos(a), -np.sin(a), np.sin(a), np.cos(a)], axis=-1).reshape(k, 2, 2)
    rot_b = np.stack([np.cos(b), -np.sin(b), np.sin(b), np.cos(b)], axis=-1).reshape(k, 2, 2)
    matrices = rot_a * np.stack([s1, s2], axis=-1)[:, None, :] @ rot_b
    maps = np.concatenate([matrices.reshape(k, 4), rng.uniform(-1, 1, (k, 2))], axis=1)
    # The chaos game visits each map in proportion to the area it covers, so thin maps are not overdrawn.
    area = np.abs(s1 * s2) + 0.02
    return maps, area / area.sum()


def generate_fractal(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An IFS fractal (as in FractalDB): chaos game over 2-4 random contracting affine maps, drawn in random
    colours on a contrasting background. Returns a height x width x 3 uint8 RGB image."""
    maps, weights = _affine_maps(rng)
    k = len(weights)
    chains, burn_in, steps = 512, 8, 16
    choice = np.searchsorted(np.cumsum(weights)[:-1], rng.random((burn_in + steps, chains)), side="right")
    a, b, c, d, e, f = np.moveaxis(maps[choice], -1, 0)
    # Chains start at map 0's fixed point, which lies on the attractor, so every recorded point is on it too.
    x, y = np.linalg.solve(np.eye(2) - maps[0, :4].reshape(2, 2), maps[0, 4:])
    xs = np.empty((steps, chains))
    ys = np.empty((steps, chains))
    for t in range(burn_in + steps):
        x, y = a[t] * x + b[t] * y + e[t], c[t] * x + d[t] * y + f[t]
        if t >= burn_in:
            xs[t - burn_in], ys[t - burn_in] = x, y
    low = np.array([xs.min(), ys.min()])
    high = np.array([xs.max(), ys.max()])
    scale = (1.0 - rng.uniform(0.05, 0.3)) * min(height, width) / max(float((high - low).max()), 1e-9)
    left, top = np.array([width, height]) / 2 - (low + high) / 2 * scale
    col = np.floor(xs * scale + left).astype(np.int64).clip(0, width - 1)
    row = np.floor(ys * scale + top).astype(np.int64).clip(0, height - 1)
    index = (row * width + col).reshape(-1)

    dark = rng.random() < 0.5
    background = rng.uniform(0, 90, 3) if dark else rng.uniform(165, 255, 3)
    colours = rng.uniform(140, 255, (k, 3)) if dark else rng.uniform(0, 115, (k, 3))
    # Each pixel takes the mean colour of the maps that moved points onto it, over the background by 1 - exp(-hits).
    point_colours = colours[choice[burn_in:].reshape(-1)]
    hits = np.bincount(index, minlength=height * width).astype(np.float64)
    alpha = 1.0 - np.exp(-hits)
    weight = alpha / np.maximum(hits, 1)
    planes = np.empty((3, height * width))
    for ch in range(3):
        planes[ch] = background[ch] * (1 - alpha) + np.bincount(index, point_colours[:, ch], height * width) * weight
    return np.rint(planes.T).astype(np.uint8).reshape(height, width, 3)


class NoiseMix:
    """The configured sources applied to calibration batches, deterministic in (seed, step, rank)."""

    def __init__(self, sources: list[NoiseSource], spec: InputSpec, *, seed: int):
        self.sources = list(sources)
        self.spec = spec
        self.seed = int(seed)
        self._ood: dict[int, torch.utils.data.Dataset] = {}
        for index, source in enumerate(self.sources):
            if isinstance(source, OodNoise):
                from bnport.data import open_images

                try:
                    dataset = open_images(source.path, spec)
                except BnportError as exc:
                    raise BnportError(f"noise source {source.spec()!r}: {exc.message}", exc.hint) from None
                if len(dataset) == 0:
                    raise BnportError(f"noise source {source.spec()!r}: no images found in {source.path}",
                                      "point ood: at a folder, list file, .rec or .bin that holds images")
                self._ood[index] = dataset
        self._appenders: dict[type, Callable] = {GaussAppendNoise: self._gauss_images, OodNoise: self._ood_images,
                                                 FractalNoise: self._fractal_images}

    def describe(self) -> list[dict]:
        """One dict per source (name, parameters, canonical spec), plus the image count of ood sources."""
        out = []
        for index, source in enumerate(self.sources):
            entry = source.to_dict()
            if index in self._ood:
                entry["images"] = len(self._ood[index])
            out.append(entry)
        return out

    def _streams(self, step: int, rank: int, index: int, device: torch.device
                 ) -> tuple[np.random.Generator, torch.Generator]:
        sequence = np.random.SeedSequence([self.seed & 0xFFFFFFFFFFFFFFFF, int(step), int(rank), index])
        generator = torch.Generator(device=device)
        generator.manual_seed(int(sequence.generate_state(1, np.uint64)[0]) & 0x7FFFFFFFFFFFFFFF)
        return np.random.default_rng(sequence), generator

    def apply(self, batch: torch.Tensor, step: int, *, rank: int = 0) -> tuple[torch.Tensor, dict[str, int]]:
        """Mix noise into an N x 3 x H x W normalised batch; returns the mixed batch and images per source.

        Blur and gauss-add modify real images (the input is not changed in place); appending sources add their
        images after the N real ones, in configured order. Counts: "data" is N, "blur" the images blurred,
        "gauss-add" N, appending sources the images they added; sources of the same kind add up.
        """
        n, _, h, w = batch.shape
        if (h, w) != self.spec.size:
            raise ValueError(f"batch images are {h}x{w} but the input spec says {self.spec.height}x{self.spec.width}")
        counts = {"data": n}
        real = batch
        appended = []
        for index, source in enumerate(self.sources):
            rng, generator = self._streams(step, rank, index, batch.device)
            if source.appends:
                expected = source.ratio * n
                count = int(math.floor(expected)) + int(rng.random() < expected - math.floor(expected))
                images = self._appenders[type(source)](index, source, count, rng, generator, batch)
                appended.append(images)
                added = len(images)
            elif isinstance(source, BlurNoise):
                chosen = np.flatnonzero(rng.random(n) < source.p)
                if len(chosen):
                    sigmas = rng.uniform(source.sigma_min, source.sigma_max, len(chosen)).tolist()
                    rows = torch.from_numpy(chosen).to(batch.device)
                    real = real.index_copy(0, rows, blur_images(real[rows], sigmas))
                added = len(chosen)
            else:
                real = real + source.std * torch.randn(real.shape, generator=generator, device=batch.device,
                                                       dtype=batch.dtype)
                added = n
            counts[source.name] = counts.get(source.name, 0) + added
        return torch.cat([real, *appended]) if appended else real, counts

    def _gauss_images(self, index: int, source: GaussAppendNoise, count: int, rng: np.random.Generator,
                      generator: torch.Generator, batch: torch.Tensor) -> torch.Tensor:
        return source.std * torch.randn((count, *batch.shape[1:]), generator=generator, device=batch.device,
                                        dtype=batch.dtype)

    def _ood_images(self, index: int, source: OodNoise, count: int, rng: np.random.Generator,
                    generator: torch.Generator, batch: torch.Tensor) -> torch.Tensor:
        dataset = self._ood[index]
        images = []
        for _ in range(count * _OOD_TRIES_PER_IMAGE):
            if len(images) == count:
                break
            tensor, _ = dataset[int(rng.integers(len(dataset)))]
            if tensor is not None:
                images.append(tensor)
        if not images:
            return batch.new_empty((0, *batch.shape[1:]))
        return torch.stack(images).to(device=batch.device, dtype=batch.dtype)

    def _fractal_images(self, index: int, source: FractalNoise, count: int, rng: np.random.Generator,
                        generator: torch.Generator, batch: torch.Tensor) -> torch.Tensor:
        if count == 0:
            return batch.new_empty((0, *batch.shape[1:]))
        images = [self.spec.to_tensor(generate_fractal(rng, self.spec.height, self.spec.width)) for _ in range(count)]
        return torch.stack(images).to(device=batch.device, dtype=batch.dtype)
