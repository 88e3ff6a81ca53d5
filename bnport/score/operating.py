"""The operating point a deployer ships: the cosine threshold that gives the selection FPR on a benchmark, the FPR
and TPR it achieves there, and how sure that threshold is.

The threshold is the strict rule's (bnport.score.metrics): accept a pair when its cosine is >= the threshold; at most
FPR x impostor pairs score that high. Its interval resamples the impostor pairs (the genuine ones do not move it):
the threshold sits just above the (k+1)-th highest impostor score, k = floor(FPR x n), so a replicate needs only the
counts its resample puts on the top impostor scores. Those are drawn exactly (a binomial for how many of the n draws
land among the top R scores, then a uniform multinomial among them), so a replicate costs O(R), not O(n): IJB-C's
15.6 M pairs take well under a second for 200 replicates.
"""
from __future__ import annotations

import math

import numpy as np

from bnport.score.table import BenchResult, fpr_label

DEFAULT_REPLICATES = 200
OPERATING_FPR = 1e-4  # where a rule names no FPR (acc, tpir): the FPR the handoff states its threshold at


def threshold_interval(scores: np.ndarray, labels: np.ndarray, fpr: float, *, replicates: int = DEFAULT_REPLICATES,
                       seed: int = 0, percentiles: tuple[float, float] = (2.5, 97.5)) -> tuple[float, float] | None:
    """Percentile interval of the strict FPR-`fpr` threshold over `replicates` bootstrap resamples of the impostor
    pairs: in each, the lowest pair score above the (k+1)-th highest resampled impostor score, k = floor(fpr x n)
    (inf when no score is above it). None without impostors or replicates."""
    impostor = np.asarray(scores, dtype=np.float64)[~np.asarray(labels, dtype=bool)]
    n = len(impostor)
    if n == 0 or replicates < 1:
        return None
    k = int(math.floor(fpr * n))
    keep = min(n, max(4 * (k + 1), k + 1 + 2000))
    top = np.sort(np.partition(impostor, n - keep)[n - keep:])[::-1]  # the `keep` highest, descending
    rng = np.random.default_rng(seed)
    cuts = []
    for _ in range(replicates):
        landed = rng.binomial(n, keep / n) if keep < n else n
        counts = rng.multinomial(landed, np.full(keep, 1.0 / keep))
        position = int(np.searchsorted(np.cumsum(counts), k + 1))
        if position < keep:  # else the (k+1)-th draw fell below the kept scores: no cut among them (vanishingly rare)
            cuts.append(top[position])
    if not cuts:
        return None
    # the threshold itself, as the strict rule sets it: the lowest score of any pair above the cut
    above = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(scores) > min(cuts)])
    positions = np.searchsorted(above, cuts, side="right")
    thresholds = np.where(positions < len(above), above[np.minimum(positions, len(above) - 1)], np.inf)
    low, high = np.percentile(thresholds, percentiles)
    return float(low), float(high)


def operating_point(result: BenchResult, fpr: float, *, replicates: int = DEFAULT_REPLICATES, seed: int = 0) -> dict:
    """The card's operating point of one model on one benchmark at `fpr`: threshold, achieved FPR and TPR (strict
    rule), and the threshold's bootstrap interval (from the per-pair scores the result points at)."""
    label = fpr_label(fpr)
    threshold = result.thresholds.get("strict", {}).get(label)
    point = {"fpr_target": fpr, "rule": "strict: accept a pair when cosine >= threshold", "threshold": threshold,
             "achieved_fpr": result.achieved_fpr.get("strict", {}).get(label),
             "tpr": result.tpr.get("strict", {}).get(label), "n_impostor": result.n_impostor,
             "noisy": bool(result.noisy.get(label)), "interval": None, "replicates": replicates}
    labels_file = result.extra.get("labels_file")
    if result.scores_file and labels_file:
        scores, labels = np.load(result.scores_file), np.load(labels_file)
        interval = threshold_interval(scores, labels, fpr, replicates=replicates, seed=seed)
        point["interval"] = list(interval) if interval is not None else None
    return point


def usage_lines(point: dict, bench: str) -> list[str]:
    """How a deployer uses it, in three lines of Python."""
    return [f"threshold = {point['threshold']!r}  # {bench}: FPR {point['achieved_fpr']} (target "
            f"{fpr_label(point['fpr_target'])}), TPR {point['tpr']}",
            "similarity = float(embedding_a @ embedding_b)  # both L2-normalised",
            "same_person = similarity >= threshold"]
