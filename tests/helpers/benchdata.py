"""Builders of real benchmark files for tests: face-like images with an identity each, insightface `.bin` packs
(a pickle of (bins, issame_list) with encoded image bytes, as insightface's own pack scripts write them) and
pairs.csv files. Images are PNG by default so every decoder gives the same pixels."""
from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np


def identity_image(identity: int, variant: int, *, size=(112, 112), seed: int = 0) -> np.ndarray:
    """An RGB uint8 image: a per-identity pattern (colour, stripes, blob position) plus per-variant noise."""
    h, w = size
    rng_id = np.random.default_rng(1000 + identity)
    rng = np.random.default_rng((seed, identity, variant))
    base = rng_id.integers(40, 216, size=3)
    yy, xx = np.mgrid[0:h, 0:w]
    freq = rng_id.uniform(0.05, 0.4)
    cy, cx = rng_id.uniform(0.3, 0.7) * h, rng_id.uniform(0.3, 0.7) * w
    stripes = 40 * np.sin(freq * (xx + rng_id.uniform(0, 1) * yy))
    blob = 60 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.02 * h * w))
    image = base[None, None, :] + (stripes + blob)[..., None] * rng_id.uniform(-1, 1, size=3)
    image = image + rng.normal(0, 18, size=(h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def encode(image: np.ndarray, ext: str = ".png") -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, 75] if ext == ".jpg" else []
    ok, data = cv2.imencode(ext, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
    assert ok
    return data.tobytes()


def pair_plan(n_pairs: int, *, identities: int = 12, seed: int = 0) -> list[tuple[int, int, int, int, bool]]:
    """(id_a, variant_a, id_b, variant_b, same) for n_pairs pairs, alternating genuine and impostor."""
    rng = np.random.default_rng(seed)
    plan = []
    for k in range(n_pairs):
        a = int(rng.integers(identities))
        same = k % 2 == 0
        b = a if same else int((a + 1 + rng.integers(identities - 1)) % identities)
        plan.append((a, 2 * k, b, 2 * k + 1, same))
    return plan


def write_bin_pack(path: Path, n_pairs: int = 40, *, size=(112, 112), seed: int = 0, ext: str = ".png",
                   identities: int = 12) -> tuple[list[bytes], list[bool]]:
    """An insightface verification pack of `n_pairs` pairs (pickle protocol 4, as insightface writes them)."""
    bins, issame = [], []
    for a, va, b, vb, same in pair_plan(n_pairs, identities=identities, seed=seed):
        bins += [encode(identity_image(a, va, size=size, seed=seed), ext),
                 encode(identity_image(b, vb, size=size, seed=seed), ext)]
        issame.append(same)
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=4)
    return bins, issame


def write_pairs_csv(folder: Path, n_pairs: int = 30, *, size=(112, 112), seed: int = 0) -> Path:
    """pairs.csv (path_a,path_b,label, paths relative to it) over PNG files in folder/images/ID/."""
    lines = ["path_a,path_b,label"]
    for a, va, b, vb, same in pair_plan(n_pairs, seed=seed):
        names = []
        for identity, variant in ((a, va), (b, vb)):
            rel = f"images/id{identity:02d}/{variant:04d}.png"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / rel), cv2.cvtColor(identity_image(identity, variant, size=size, seed=seed),
                                                        cv2.COLOR_RGB2BGR))
            names.append(rel)
        lines.append(f"{names[0]},{names[1]},{int(same)}")
    path = folder / "pairs.csv"
    path.write_text("\n".join(lines) + "\n")
    return path
