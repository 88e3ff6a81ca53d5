"""Real image files for the tests: faces-sized noise with a per-identity colour cast, one sub-folder per identity."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


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
