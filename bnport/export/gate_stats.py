"""The figures both gates report (float32 against float64 in `parity`, a converted file against its float32 file in
`precision`), computed one way: row cosines, error histograms per decade, quantiles, and JSON-safe floats."""
from __future__ import annotations

import math

import numpy as np

QUANTILES = (0.5, 0.9, 0.99, 0.999)
# max rel is taken over elements at least this fraction of the output scale; smaller ones are judged by atol
REL_FLOOR = 1e-3


def json_float(value: float) -> float | str:
    """A float as JSON can hold it: a non-finite one (NaN outputs) becomes the string "inf" or "nan"."""
    return value if math.isfinite(value) else str(value)


def row_cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Cosine per row (float64) between two N x ... arrays; both rows zero counts as 1, a NaN/Inf row as -1."""
    r = ref.reshape(len(ref), -1).astype(np.float64)
    o = out.reshape(len(out), -1).astype(np.float64)
    nr, no = np.linalg.norm(r, axis=1), np.linalg.norm(o, axis=1)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        cos = (r * o).sum(axis=1) / (nr * no)
    cos = np.where((nr == 0) & (no == 0), 1.0, cos)
    return np.where(np.isfinite(cos), cos, -1.0)


def histogram(relative: np.ndarray) -> dict[str, int]:
    """Counts of |error| / scale per decade, from <1e-9 to >=1e-1."""
    edges = [0.0] + [10.0 ** k for k in range(-9, 0)] + [math.inf]
    labels = ["<1e-9"] + [f"1e{k}..1e{k + 1}" for k in range(-9, -1)] + [">=1e-1"]
    counts, _ = np.histogram(relative, bins=edges)
    return {label: int(c) for label, c in zip(labels, counts)}


def quantiles(err: np.ndarray) -> dict[str, float]:
    """p50 ... p99.9 of the absolute errors (inf errors, from NaN outputs, make the upper ones inf, as they should)."""
    with np.errstate(invalid="ignore"):
        return {f"p{q * 100:g}": float(np.quantile(err, q)) for q in QUANTILES}


def max_relative(err: np.ndarray, ref: np.ndarray, scale: float) -> float:
    """max |error| / |ref| over the elements at least REL_FLOOR x scale."""
    significant = np.abs(ref) >= REL_FLOOR * scale
    return float((err[significant] / np.abs(ref[significant])).max(initial=0.0))
