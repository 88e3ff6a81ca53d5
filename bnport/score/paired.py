"""Paired bootstrap intervals: how much of a model's win over the baseline is more than noise.

Every model is resampled on the same draw as the baseline, so each replicate gives one difference and the interval
is that of the difference itself (far narrower than two separate intervals). The draw is a Poisson bootstrap: each
resampling unit gets an independent Poisson(1) count, the large-sample form of a multinomial resample, which lets a
replicate touch only the units that matter. The units are the pairs of a `.bin` pack or a pair list, and the
templates of an IJB release (a pair weighs the product of its two templates' counts: resampling templates keeps the
dependence between the pairs that share one). For TPR at FPR f (strict rule) only the genuine pairs and the highest
impostor scores of each model move the figure: a replicate draws counts for the genuine units and for the units
behind each model's top impostor region (the top 4(k+1) + 2000, k = floor(f x n)), and sets each model's threshold at
the weighted (k+1)-th highest impostor score.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PERCENTILES = (2.5, 97.5)


@dataclass
class PairedDelta:
    """A model's figure minus the baseline's (TPR points x 100 left to the caller: fractions here), and the
    percentile interval of that difference over the replicates."""

    delta: float
    low: float
    high: float
    replicates: int

    @property
    def confident(self) -> bool:
        """The win is more than noise: the interval's lower end is above zero."""
        return self.low > 0

    def to_dict(self) -> dict:
        return {"delta": self.delta, "low": self.low, "high": self.high, "replicates": self.replicates}


def _units(n_pairs: int, clusters: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Per pair its resampling unit(s): (first, second or None, number of units)."""
    if clusters is None:
        return np.arange(n_pairs), None, n_pairs
    ids, inverse = np.unique(clusters.reshape(-1), return_inverse=True)
    inverse = inverse.reshape(clusters.shape)
    return inverse[:, 0], inverse[:, 1], len(ids)


def paired_tpr_deltas(scores: dict[str, np.ndarray], labels: np.ndarray, baseline: str, fpr: float, *,
                      clusters: np.ndarray | None = None, replicates: int = 200,
                      seed: int = 0) -> dict[str, PairedDelta]:
    """For each model other than `baseline` in `scores` (per-pair scores, same pair order): strict TPR@`fpr` minus
    the baseline's, with its paired bootstrap interval. `clusters`: P x 2 template ids (IJB) to resample templates;
    None resamples pairs."""
    labels = np.asarray(labels, dtype=bool)
    genuine, impostor = np.flatnonzero(labels), np.flatnonzero(~labels)
    n = len(impostor)
    if not len(genuine) or not n or replicates < 1:
        return {}
    k = int(math.floor(fpr * n))
    keep = min(n, max(4 * (k + 1), k + 1 + 2000))
    first, second, n_units = _units(len(labels), None if clusters is None else np.asarray(clusters))
    tops = {}
    for label, s in scores.items():  # each model's top impostor pairs, highest first
        s_imp = np.asarray(s, dtype=np.float64)[impostor]
        top = np.argpartition(s_imp, n - keep)[n - keep:]
        top = top[np.argsort(s_imp[top])[::-1]]
        tops[label] = (impostor[top], s_imp[top])
    point = {label: _tpr(np.asarray(s, dtype=np.float64), genuine, *tops[label], k, None, None, None)
             for label, s in scores.items()}
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {label: [] for label in scores if label != baseline}
    for _ in range(replicates):
        counts = rng.poisson(1.0, n_units).astype(np.float64)
        figures = {label: _tpr(np.asarray(s, dtype=np.float64), genuine, *tops[label], k, counts, first, second)
                   for label, s in scores.items()}
        for label in samples:
            samples[label].append(figures[label] - figures[baseline])
    out = {}
    for label, values in samples.items():
        values = np.asarray([v for v in values if np.isfinite(v)])
        if not len(values):
            continue
        low, high = np.percentile(values, PERCENTILES)
        out[label] = PairedDelta(point[label] - point[baseline], float(low), float(high), len(values))
    return out


def _tpr(scores: np.ndarray, genuine: np.ndarray, top_pairs: np.ndarray, top_scores: np.ndarray, k: int,
         counts: np.ndarray | None, first: np.ndarray | None, second: np.ndarray | None) -> float:
    """Strict TPR at the threshold that lets k impostors through: unweighted (`counts` None) or with the replicate's
    unit counts (a pair weighs its unit's count, or the product of its two templates' counts)."""
    if counts is None:
        cut = top_scores[k] if k < len(top_scores) else -np.inf
        return float((scores[genuine] > cut).mean())
    w_top = _weights(top_pairs, counts, first, second)
    position = int(np.searchsorted(np.cumsum(w_top), k + 1))
    cut = top_scores[position] if position < len(top_scores) else -np.inf
    w_gen = _weights(genuine, counts, first, second)
    total = w_gen.sum()
    return float(w_gen[scores[genuine] > cut].sum() / total) if total > 0 else float("nan")


def _weights(pairs: np.ndarray, counts: np.ndarray, first: np.ndarray, second: np.ndarray | None) -> np.ndarray:
    return counts[first[pairs]] if second is None else counts[first[pairs]] * counts[second[pairs]]
