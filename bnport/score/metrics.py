"""Face-verification metrics computed exactly as published tables compute them, with numpy only.

ROC curves identical to scikit-learn's `roc_curve` (one point per distinct score, collinear points dropped the same
way); TPR at FPR by two labelled rules, "insightface" (the nearest ROC point, picked exactly as insightface's
`recognition/arcface_torch/eval_ijbc.py` picks it, so figures compare with published IJB-B/C tables) and "strict"
(the best TPR whose FPR does not exceed the target), each cell flagged when there are fewer than 10 / FPR impostor
pairs; seeded bootstrap percentile intervals that resample genuine and impostor pairs separately; and the 10-fold
verification accuracy of insightface's `eval/verification.py` for `.bin` packs (LFW, CFP-FP, AgeDB-30). Hand-written
rather than borrowed: scikit-learn is only a test dependency, and its `roc_curve` argsorts every score (over 10 s
for IJB-C's 15.6 M pairs on a 2-core machine, and again for every bootstrap replicate), while no library computes
the nearest-point rule without that full sort. Here only the top impostor scores the largest FPR target needs are sorted
(after an O(n) `np.partition`), which gives the same numbers more than 10x faster (tests/benchmarks/bench_metrics.py).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from bnport.errors import BnportError

DEFAULT_FPRS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
RULES: tuple[str, ...] = ("insightface", "strict")
DEFAULT_FOLDS = 10
DEFAULT_SEED = 0
BOOTSTRAP_PERCENTILES: tuple[float, float] = (2.5, 97.5)
# below this many impostor pairs per 1/FPR a TPR@FPR cell rests on a handful of impostors: flagged as unreliable
MIN_IMPOSTORS_PER_FPR = 10
# the first region keeps the top (1 + margin) * max(FPR) * n_impostor impostor scores plus a fixed extra; when the
# answer could lie beyond it, the region grows by _REGION_GROWTH until it holds every score
_REGION_MARGIN = 0.02
_REGION_EXTRA = 1024
_REGION_GROWTH = 4


def _json_float(value: float) -> float | None:
    """JSON has no infinity: the threshold of the (0, 0) point, +inf, is written as None."""
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True, eq=False)
class Roc:
    """A ROC curve as scikit-learn's `roc_curve` returns it.

    `fpr` and `tpr` are non-decreasing, `thresholds` strictly decreasing; point i counts the pairs with
    score >= thresholds[i], and the first point is (0, 0) at threshold +inf. `drop_intermediate` says whether points
    collinear with their neighbours were dropped (scikit-learn's default, and what insightface's IJB tables use);
    `decimated` whether the curve was thinned for plotting (then it is a subset of the vertices, not for metrics).
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    n_genuine: int
    n_impostor: int
    drop_intermediate: bool
    decimated: bool

    def to_dict(self) -> dict:
        return {"fpr": self.fpr.tolist(), "tpr": self.tpr.tolist(),
                "thresholds": [_json_float(t) for t in self.thresholds.tolist()],
                "n_genuine": self.n_genuine, "n_impostor": self.n_impostor,
                "drop_intermediate": self.drop_intermediate, "decimated": self.decimated}


@dataclass(frozen=True)
class TprAtFpr:
    """One TPR@FPR figure.

    `rule` is "insightface" (the ROC vertex nearest to `fpr_target`, as published tables report it; its `fpr` may
    exceed the target) or "strict" (the best TPR over every threshold whose FPR is <= `fpr_target`). `fpr` and
    `threshold` are those of the chosen point (pairs with score >= threshold are accepted; +inf = accept nothing).
    `unreliable` is set when `n_impostor < 10 / fpr_target`: fewer than ten impostors decide the figure.
    `interval` is the bootstrap (2.5, 97.5) percentile interval of the TPR when one was asked for.
    """

    rule: str
    fpr_target: float
    tpr: float
    fpr: float
    threshold: float
    n_genuine: int
    n_impostor: int
    unreliable: bool
    interval: tuple[float, float] | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["threshold"] = _json_float(self.threshold)
        d["interval"] = list(self.interval) if self.interval is not None else None
        return d


@dataclass(frozen=True)
class TprAtFprTable:
    """TPR@FPR for every rule and FPR target of one score set: `cells` holds rule-major order (RULES x fpr_targets).

    `bootstrap` is the number of replicates behind the cells' intervals (0: none), `seed` the seed they used.
    """

    cells: tuple[TprAtFpr, ...]
    fpr_targets: tuple[float, ...]
    n_genuine: int
    n_impostor: int
    bootstrap: int
    seed: int | None

    def cell(self, rule: str, fpr_target: float) -> TprAtFpr:
        """The cell of `rule` at `fpr_target` (one of `fpr_targets`)."""
        for c in self.cells:
            if c.rule == rule and c.fpr_target == fpr_target:
                return c
        raise KeyError(f"no cell for rule {rule!r} at FPR {fpr_target!r}")

    def row(self, rule: str) -> tuple[TprAtFpr, ...]:
        """The cells of `rule`, in the order of `fpr_targets`."""
        return tuple(c for c in self.cells if c.rule == rule)

    def to_dict(self) -> dict:
        return {"fpr_targets": list(self.fpr_targets), "n_genuine": self.n_genuine, "n_impostor": self.n_impostor,
                "bootstrap": self.bootstrap, "seed": self.seed, "cells": [c.to_dict() for c in self.cells]}

    def __str__(self) -> str:
        head = ["TPR(%)@FPR".ljust(12)] + [f"{t:g}".rjust(8) for t in self.fpr_targets]
        lines = ["".join(head)]
        for rule in RULES:
            cells = [f"{100 * c.tpr:.2f}{'*' if c.unreliable else ''}".rjust(8) for c in self.row(rule)]
            lines.append("".join([rule.ljust(12)] + cells))
        lines.append(f"{self.n_genuine} genuine, {self.n_impostor} impostor pairs"
                     + ("; * = fewer than 10/FPR impostors" if any(c.unreliable for c in self.cells) else ""))
        return "\n".join(lines)


@dataclass(frozen=True)
class VerificationAccuracy:
    """10-fold verification accuracy as insightface's `eval/verification.py` reports it for a `.bin` pack.

    `accuracy` and `std` are the mean and the population standard deviation (ddof 0) of `fold_accuracies`
    (insightface's `acc2` and `std2`, "Accuracy-Flip" when the embeddings were flip-summed); `fold_thresholds`
    holds the squared-distance threshold each fold chose on its training folds (pairs with distance < threshold
    are accepted as the same identity).
    """

    accuracy: float
    std: float
    fold_accuracies: tuple[float, ...]
    fold_thresholds: tuple[float, ...]
    n_pairs: int
    n_folds: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fold_accuracies"] = list(self.fold_accuracies)
        d["fold_thresholds"] = list(self.fold_thresholds)
        return d


# ---------------------------------------------------------------------------------------------------- inputs

def _split_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels (1 genuine / 0 impostor, or bool) and scores; return (genuine scores, impostor scores)."""
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.ndim != 1 or scores.ndim != 1 or labels.shape != scores.shape:
        raise BnportError(f"labels and scores must be 1-D arrays of the same length, got shapes {labels.shape} and "
                          f"{scores.shape}", "pass one label and one score per pair")
    if scores.size == 0:
        raise BnportError("no pairs to score", "the benchmark produced no pair scores; check its pair list")
    if scores.dtype.kind not in "fiu":
        raise BnportError(f"scores must be numbers, got dtype {scores.dtype}", "pass similarity scores as floats")
    if scores.dtype.kind != "f":
        scores = scores.astype(np.float64)
    # min and max are NaN or infinite exactly when some score is: two fast reductions instead of a mask
    if not (np.isfinite(scores.min()) and np.isfinite(scores.max())):
        n_nan = int(np.isnan(scores).sum())
        raise BnportError(f"{n_nan} NaN and {int((~np.isfinite(scores)).sum()) - n_nan} infinite pair scores",
                          "NaN scores come from NaN or zero embeddings: check the model outputs")
    if labels.dtype == bool:
        is_genuine = labels
    elif labels.dtype.kind in "iu" and labels.min() >= 0 and labels.max() <= 1:
        is_genuine = labels.astype(bool)
    elif labels.dtype.kind == "f" and ((labels == 0) | (labels == 1)).all():
        is_genuine = labels == 1
    else:
        raise BnportError("labels must be 0 (impostor) or 1 (genuine), or bool",
                          "use 1 for genuine (same identity) and 0 for impostor pairs")
    genuine = scores[is_genuine]
    impostor = scores[~is_genuine]
    if genuine.size == 0 or impostor.size == 0:
        missing = "genuine" if genuine.size == 0 else "impostor"
        raise BnportError(f"no {missing} pairs: a ROC needs both genuine and impostor pairs",
                          "check the pair labels of the benchmark (1 = same identity, 0 = different)")
    return genuine, impostor


def _check_fprs(fprs) -> np.ndarray:
    targets = np.asarray(DEFAULT_FPRS if fprs is None else fprs, dtype=np.float64).reshape(-1)
    if targets.size == 0 or not np.all((targets > 0) & (targets <= 1)):
        raise BnportError(f"FPR targets must lie in (0, 1], got {targets.tolist()}", "e.g. 1e-6,1e-5,1e-4")
    return targets


# ---------------------------------------------------------------------------------------------------- ROC core

@dataclass(eq=False)
class _Region:
    """The top of the ROC: every distinct score >= `cut`, with the pairs scoring exactly each one.

    `complete` says whether `cut` is the lowest score of all (then this is the whole ROC). For the bootstrap,
    `genuine_index` maps every genuine pair (ascending score order) to its threshold (len(thresholds) when below
    the cut) and `impostor_index` maps every impostor pair scoring >= cut to its threshold.
    """

    thresholds: np.ndarray
    genuine_counts: np.ndarray
    impostor_counts: np.ndarray
    complete: bool
    n_genuine: int
    n_impostor: int
    genuine_index: np.ndarray | None = None
    impostor_index: np.ndarray | None = None


def _build_region(genuine_sorted: np.ndarray, impostor: np.ndarray, n_keep: int, *,
                  with_index: bool = False) -> _Region:
    """The region above the `n_keep`-th highest impostor score (ties at it included), or the whole ROC."""
    n_imp = impostor.size
    if n_keep >= n_imp:
        kept = np.sort(impostor)
        cut = min(kept[0], genuine_sorted[0])
        n_tied_out = 0
    else:
        split = n_imp - n_keep
        part = np.partition(impostor, split)
        cut = part[split]
        kept = np.sort(part[split:])
        # impostors equal to the cut that the partition left below it still count at the cut's threshold
        n_tied_out = int(np.count_nonzero(part[:split] == cut))
    first_genuine = int(np.searchsorted(genuine_sorted, cut, side="left"))
    impostor_values, impostor_runs = _distinct(kept)
    genuine_values, genuine_runs = _distinct(genuine_sorted[first_genuine:])
    # merge the two sorted distinct lists without sorting again: insert the genuine-only values
    at = np.searchsorted(impostor_values, genuine_values)
    shared = impostor_values[np.minimum(at, impostor_values.size - 1)] == genuine_values
    ascending = np.insert(impostor_values, at[~shared], genuine_values[~shared])
    n = ascending.size
    genuine_slot = np.searchsorted(ascending, genuine_values)
    impostor_slot = np.ones(n, dtype=bool)
    impostor_slot[genuine_slot[~shared]] = False
    impostor_slot = np.flatnonzero(impostor_slot)
    # descending order, as the ROC runs: index n - 1 - slot
    impostor_counts = np.zeros(n, dtype=np.int64)
    impostor_counts[n - 1 - impostor_slot] = impostor_runs
    impostor_counts[n - 1] += n_tied_out
    genuine_counts = np.zeros(n, dtype=np.int64)
    genuine_counts[n - 1 - genuine_slot] = genuine_runs
    region = _Region(thresholds=ascending[::-1].astype(np.float64), genuine_counts=genuine_counts,
                     impostor_counts=impostor_counts,
                     complete=first_genuine == 0 and kept.size + n_tied_out == n_imp,
                     n_genuine=genuine_sorted.size, n_impostor=n_imp)
    if with_index:
        region.genuine_index = np.concatenate([np.full(first_genuine, n), np.repeat(n - 1 - genuine_slot,
                                                                                      genuine_runs)])
        region.impostor_index = np.concatenate([np.repeat(n - 1 - impostor_slot, impostor_runs),
                                                np.full(n_tied_out, n - 1)])
    return region


def _distinct(ascending: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of a sorted array and how many times each occurs (np.unique without its sort)."""
    if ascending.size == 0:
        return ascending, np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate([[True], ascending[1:] != ascending[:-1]]))
    return ascending[starts], np.diff(np.append(starts, ascending.size))


def _corner_mask(impostor_counts: np.ndarray, genuine_counts: np.ndarray) -> np.ndarray:
    """scikit-learn's `drop_intermediate` over the pairs per threshold: keep both ends and every point where the
    second difference of the cumulative FP or TP counts is non-zero, i.e. where the next threshold's count differs."""
    if impostor_counts.size <= 2:
        return np.ones(impostor_counts.size, dtype=bool)
    corner = (impostor_counts[2:] != impostor_counts[1:-1]) | (genuine_counts[2:] != genuine_counts[1:-1])
    return np.concatenate([[True], corner, [True]])


def _last_count_within(target: float, n: int) -> int:
    """The largest count c with c / n <= target in float64, the comparison scikit-learn's FPR array would make."""
    c = math.floor(target * n)
    while c + 1 <= n and (c + 1) / n <= target:
        c += 1
    while c >= 0 and c / n > target:
        c -= 1
    return c


def _nearest_vertex(vertex_fpr: np.ndarray, target: float) -> int:
    """eval_ijbc.py's pick: the index minimising |fpr - target| (float64), the last one on ties.

    The curve is flipped there and the first minimum taken, i.e. the last in ascending order. |fpr - target| falls
    up to the last vertex a with fpr <= target and rises after it, so only a and the run of vertices just above the
    target that tie with the first of them (all within 2x its distance) can win.
    """
    a = int(np.searchsorted(vertex_fpr, target, side="right")) - 1
    b = a + 1
    if b == vertex_fpr.size:
        return a
    d_right = abs(vertex_fpr[b] - target)
    if d_right > abs(vertex_fpr[a] - target):
        return a
    end = int(np.searchsorted(vertex_fpr, target + 2 * d_right, side="right"))
    run = np.abs(vertex_fpr[b:end] - target)
    return b + int(np.flatnonzero(run == d_right)[-1])


def _evaluate(thresholds: np.ndarray, impostor_counts: np.ndarray, genuine_counts: np.ndarray, n_genuine: int,
              n_impostor: int, complete: bool, targets: np.ndarray) -> np.ndarray | None:
    """TPR, FPR and threshold by both rules at every target: shape (2 rules, 3, n_targets); None when unsettled.

    The counts are per threshold (pairs scoring exactly it; bootstrap replicates give multiplicities, and a
    threshold no pair of the replicate scores is not a ROC point, as in a resampled score list). When the region
    is not `complete`, every ROC point beyond it has an FPR >= that of the region's last point F, and the last
    point's own drop decision is unknown (it depends on the next point). The strict rule is settled when a point
    of the region exceeds the target. The nearest-point rule is settled when the best vertex found is strictly
    nearer than F - target, computed in the same float64 arithmetic: then no point from the last one on can tie
    or win (|fpr - target| rounds monotonically).
    """
    present = (impostor_counts > 0) | (genuine_counts > 0)
    if not present.all():
        thresholds, impostor_counts, genuine_counts = (
            thresholds[present], impostor_counts[present], genuine_counts[present])
    n = thresholds.size
    if n == 0:
        return None
    fps = np.cumsum(impostor_counts)
    tps = np.cumsum(genuine_counts)
    last_within = np.searchsorted(fps, [_last_count_within(t, n_impostor) for t in targets.tolist()],
                                  side="right") - 1
    if not complete and (last_within >= n - 1).any():
        return None
    # an incomplete region's last point has an unknown drop decision, but it is never needed: its distance is
    # F - target, so were it the nearest vertex the settling test below fails anyway
    keep = _corner_mask(impostor_counts, genuine_counts)
    vertices = np.flatnonzero(keep)
    vertex_fpr = np.concatenate([[0.0], fps[vertices] / n_impostor])
    boundary = fps[-1] / n_impostor
    out = np.empty((2, 3, targets.size))
    for i, target in enumerate(targets.tolist()):
        k = _nearest_vertex(vertex_fpr, target)
        if not complete and not abs(vertex_fpr[k] - target) < boundary - target:
            return None
        j = vertices[k - 1] if k else -1
        out[0, :, i] = _point(j, fps, tps, thresholds, n_genuine, n_impostor)
        out[1, :, i] = _point(int(last_within[i]), fps, tps, thresholds, n_genuine, n_impostor)
    return out


def _point(j: int, fps: np.ndarray, tps: np.ndarray, thresholds: np.ndarray, n_genuine: int,
           n_impostor: int) -> tuple[float, float, float]:
    """(TPR, FPR, threshold) of ROC point j, with -1 the (0, 0) point at +inf, divided as scikit-learn divides."""
    if j < 0:
        return 0.0, 0.0, math.inf
    return float(tps[j] / n_genuine), float(fps[j] / n_impostor), float(thresholds[j])


def _evaluate_region(region: _Region, targets: np.ndarray) -> np.ndarray | None:
    return _evaluate(region.thresholds, region.impostor_counts, region.genuine_counts, region.n_genuine,
                     region.n_impostor, region.complete, targets)


def _settle(genuine_sorted: np.ndarray, impostor: np.ndarray, targets: np.ndarray, *, n_keep: int | None = None,
            with_index: bool = False) -> tuple[_Region, np.ndarray]:
    """Both rules at every target from the smallest region that settles them; grows the region until it does."""
    n_imp = impostor.size
    if n_keep is None:
        n_keep = math.ceil(float(targets.max()) * n_imp * (1 + _REGION_MARGIN)) + _REGION_EXTRA
    n_keep = max(1, min(n_imp, n_keep))
    while True:
        region = _build_region(genuine_sorted, impostor, n_keep, with_index=with_index)
        result = _evaluate_region(region, targets)
        if result is not None:
            return region, result
        n_keep = min(n_imp, n_keep * _REGION_GROWTH)


def _replicate(region: _Region, rng: np.random.Generator, targets: np.ndarray) -> np.ndarray | None:
    """One bootstrap replicate's results on `region`, or None when the region does not settle it.

    Resampling n pairs with replacement is a multinomial draw of n over the pairs; restricted to the region's
    impostors it is a Binomial(n, k/n) total spread uniformly over those k pairs, so the impostors below the region
    are never touched. Counts are summed per distinct score (the scores were sorted once), which is what sorting the
    resampled list would give.
    """
    n_thresholds = region.thresholds.size
    genuine_draw = rng.integers(0, region.n_genuine, size=region.n_genuine)
    genuine_counts = np.bincount(region.genuine_index[genuine_draw], minlength=n_thresholds + 1)[:n_thresholds]
    n_in = region.impostor_index.size
    n_drawn = region.n_impostor if n_in == region.n_impostor else int(rng.binomial(region.n_impostor,
                                                                                       n_in / region.n_impostor))
    impostor_draw = rng.integers(0, n_in, size=n_drawn)
    impostor_counts = np.bincount(region.impostor_index[impostor_draw], minlength=n_thresholds)
    return _evaluate(region.thresholds, impostor_counts, genuine_counts, region.n_genuine, region.n_impostor,
                     region.complete, targets)


def _bootstrap_tprs(region: _Region, genuine_sorted: np.ndarray, impostor: np.ndarray, targets: np.ndarray,
                    n_boot: int, seed: int) -> np.ndarray:
    """TPR of every replicate, shape (n_boot, 2 rules, n_targets); replicate b draws from the b-th spawned seed."""
    tprs = np.empty((n_boot, 2, targets.size))
    whole = None
    for b, child in enumerate(np.random.SeedSequence(seed).spawn(n_boot)):
        rng = np.random.default_rng(child)
        result = _replicate(region, rng, targets)
        if result is None:
            if whole is None:
                whole = _build_region(genuine_sorted, impostor, impostor.size, with_index=True)
            result = _replicate(whole, rng, targets)
        tprs[b] = result[:, 0, :]
    return tprs


# ---------------------------------------------------------------------------------------------------- public API

def compute_roc(labels, scores, *, drop_intermediate: bool | None = None, max_points: int | None = None) -> Roc:
    """The ROC of pair scores, point for point what `sklearn.metrics.roc_curve(labels, scores)` returns.

    `labels`: 1 (or True) for genuine pairs, 0 for impostors; `scores`: higher = more similar. Ties: one point per
    distinct score. `drop_intermediate` (default True, as scikit-learn) drops points collinear with their neighbours,
    by scikit-learn's rule (a point stays where the second difference of the FP or TP counts is non-zero).
    `max_points` (default: all) thins the curve for plotting to at most that many vertices: for each of
    `max_points - 3` log-spaced FPR values the highest-TPR vertex at or below it, plus the first and last points
    and the top of the FPR = 0 segment. All scores equal gives [(0, 0), (1, 1)]. NaN or infinite scores, labels
    other than 0/1 and a class with no pairs (where scikit-learn returns NaN rates with a warning) raise
    BnportError.
    """
    genuine, impostor = _split_scores(labels, scores)
    drop = True if drop_intermediate is None else bool(drop_intermediate)
    region = _build_region(np.sort(genuine), impostor, impostor.size)
    fps = np.cumsum(region.impostor_counts)
    tps = np.cumsum(region.genuine_counts)
    keep = _corner_mask(region.impostor_counts, region.genuine_counts) if drop else np.ones(fps.size, dtype=bool)
    fpr = np.concatenate([[0.0], fps[keep] / impostor.size])
    tpr = np.concatenate([[0.0], tps[keep] / genuine.size])
    thresholds = np.concatenate([[np.inf], region.thresholds[keep]])
    decimated = False
    if max_points is not None:
        if max_points < 4:
            raise BnportError(f"max_points must be at least 4, got {max_points}", "plots need 100 or more")
        if fpr.size > max_points:
            grid = np.geomspace(fpr[fpr > 0][0], 1.0, max_points - 3)
            chosen = np.concatenate([[0, np.searchsorted(fpr, 0.0, side="right") - 1, fpr.size - 1],
                                     np.searchsorted(fpr, grid, side="right") - 1])
            chosen = np.unique(chosen)
            fpr, tpr, thresholds, decimated = fpr[chosen], tpr[chosen], thresholds[chosen], True
    return Roc(fpr=fpr, tpr=tpr, thresholds=thresholds, n_genuine=int(genuine.size), n_impostor=int(impostor.size),
               drop_intermediate=drop, decimated=decimated)


def compute_tpr_at_fpr(labels, scores, *, fprs=None, bootstrap: int | None = None,
                       seed: int | None = None) -> TprAtFprTable:
    """TPR at each FPR target by both rules, optionally with bootstrap intervals.

    `labels`: 1 (or True) genuine, 0 impostor; `scores`: higher = more similar. `fprs`: the targets (default
    DEFAULT_FPRS, 1e-6 ... 1e-1).

    Rule "insightface" is eval_ijbc.py's: `fpr, tpr, _ = roc_curve(label, score)` (collinear points dropped),
    both flipped, and for each target the point with the smallest |fpr - target|, the first one in the flipped
    order on ties (so the highest-TPR point among equal FPRs, and the higher FPR when two are equally near). The
    chosen point may lie above the target (on small sets far above: the figure then overstates), and when the
    top score is an impostor's and the target is below about half of 1 / n_impostor it is the (0, 0) point: TPR 0
    (a perfectly separated set reads 1 at every target). Rule "strict" takes the best TPR over every threshold
    (none dropped) with FPR <= target; 0 at threshold +inf when none qualifies. Every cell with fewer than
    10 / target impostors is flagged `unreliable`.

    Only the top 1.02 * max(target) * n_impostor + 1024 impostor scores are sorted: the ROC points there are
    rebuilt with scikit-learn's tie and drop rules, and the region grows (x4, up to every score) whenever a point
    beyond it could be the answer (see `_evaluate`), so the figures always equal the full computation's.

    `bootstrap` (default 0: none) replicates give each cell a (2.5, 97.5) percentile interval of its TPR. Genuine
    and impostor pairs are resampled separately with replacement, each class keeping its size (a multinomial
    draw, in distribution the same as resampling the score list). Nothing is re-sorted per replicate: the draws
    become counts per sorted distinct score and the ROC comes from their cumulative sums; impostors below the
    region are not drawn one by one (a binomial gives how many of the resample land in the region), and a
    replicate the region cannot settle is redone on the whole ROC. `seed` (default 0) makes the intervals
    reproducible; replicate b uses the b-th child of `np.random.SeedSequence(seed)`.
    """
    genuine, impostor = _split_scores(labels, scores)
    targets = _check_fprs(fprs)
    n_boot = 0 if bootstrap is None else int(bootstrap)
    if n_boot < 0 or (0 < n_boot < 2):
        raise BnportError(f"bootstrap needs at least 2 replicates, got {n_boot}", "use e.g. --bootstrap 1000")
    seed = DEFAULT_SEED if seed is None else int(seed)
    genuine_sorted = np.sort(genuine)
    region, result = _settle(genuine_sorted, impostor, targets, with_index=n_boot > 0)
    intervals = None
    if n_boot:
        tprs = _bootstrap_tprs(region, genuine_sorted, impostor, targets, n_boot, seed)
        intervals = np.percentile(tprs, BOOTSTRAP_PERCENTILES, axis=0)
    cells = []
    for r, rule in enumerate(RULES):
        for t, target in enumerate(targets.tolist()):
            interval = None if intervals is None else (float(intervals[0, r, t]), float(intervals[1, r, t]))
            cells.append(TprAtFpr(rule=rule, fpr_target=target, tpr=float(result[r, 0, t]),
                                  fpr=float(result[r, 1, t]), threshold=float(result[r, 2, t]),
                                  n_genuine=int(genuine.size), n_impostor=int(impostor.size),
                                  unreliable=bool(impostor.size < MIN_IMPOSTORS_PER_FPR / target),
                                  interval=interval))
    return TprAtFprTable(cells=tuple(cells), fpr_targets=tuple(targets.tolist()), n_genuine=int(genuine.size),
                         n_impostor=int(impostor.size), bootstrap=n_boot, seed=seed if n_boot else None)


def normalize_embeddings(embeddings) -> np.ndarray:
    """Rows scaled to unit L2 norm in float64, bit for bit as `sklearn.preprocessing.normalize` (insightface's
    step after the flip sum); rows with a norm below 10 machine epsilons are left as they are."""
    x = np.array(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise BnportError(f"embeddings must be a 2-D array (pairs x dims), got shape {x.shape}",
                          "stack one embedding per row")
    if not np.isfinite(x).all():
        raise BnportError("embeddings contain NaN or infinite values", "check the model outputs")
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms < 10 * np.finfo(np.float64).eps] = 1.0
    x /= norms[:, None]
    return x


def compute_verification_accuracy(embeddings1, embeddings2, issame, *, n_folds: int | None = None,
                                  normalize: bool | None = None) -> VerificationAccuracy:
    """10-fold accuracy of a verification pack, exactly as insightface's `eval/verification.py` computes it.

    `embeddings1[i]`, `embeddings2[i]` are the two images of pair i (a `.bin` pack interleaves them:
    `embeddings[0::2]`, `embeddings[1::2]`), `issame[i]` its label. The caller does insightface's test-time
    step first: the embedding of each image plus that of its horizontal flip (`test()` adds the two runs), in
    float64; with `normalize` (default True) each row is then scaled to unit norm here (`normalize_embeddings`,
    as `sklearn.preprocessing.normalize`), so pass the flip sums un-normalised, or pass normalize=False with rows
    already normalised. The squared Euclidean distance of each pair goes to
    `compute_verification_accuracy_from_distances`.
    """
    e1 = np.asarray(embeddings1, dtype=np.float64)
    e2 = np.asarray(embeddings2, dtype=np.float64)
    if e1.ndim != 2 or e1.shape != e2.shape:
        raise BnportError(f"embeddings1 and embeddings2 must be 2-D arrays of one shape, got {e1.shape} and "
                          f"{e2.shape}", "pass the first and the second image of each pair, one row per pair")
    if normalize is None or normalize:
        e1, e2 = normalize_embeddings(e1), normalize_embeddings(e2)
    distances = np.sum(np.square(np.subtract(e1, e2)), 1)
    return compute_verification_accuracy_from_distances(distances, issame, n_folds=n_folds)


def compute_verification_accuracy_from_distances(distances, issame, *,
                                                 n_folds: int | None = None) -> VerificationAccuracy:
    """insightface's `calculate_roc` accuracy over precomputed squared distances of unit-norm embeddings.

    `n_folds` (default 10) contiguous folds in pair order, as `KFold(n_splits, shuffle=False)` makes them (the
    first n % n_folds folds one pair larger); n_folds=1 trains and tests on all pairs, as insightface's `LFold`.
    Per fold: the accuracy of "same when distance < threshold" over the training folds at each threshold of
    `np.arange(0, 4, 0.01)`; the first threshold with the best accuracy is applied to the test fold. The result
    holds the mean and std (ddof 0) of the test accuracies.
    """
    d = np.asarray(distances, dtype=np.float64)
    same = np.asarray(issame)
    if d.ndim != 1 or same.shape != d.shape:
        raise BnportError(f"distances and issame must be 1-D arrays of one length, got {d.shape} and {same.shape}",
                          "pass one squared distance and one label per pair")
    if same.dtype != bool:
        if same.dtype.kind not in "iuf" or not ((same == 0) | (same == 1)).all():
            raise BnportError("issame must be bool or 0/1", "use True / 1 for pairs of the same identity")
        same = same == 1
    if not np.isfinite(d).all():
        raise BnportError("pair distances contain NaN or infinite values", "check the embeddings")
    k = DEFAULT_FOLDS if n_folds is None else int(n_folds)
    if k < 1 or d.size < k:
        raise BnportError(f"{d.size} pairs cannot make {k} folds", "use fewer folds or more pairs")
    thresholds = np.arange(0, 4, 0.01)
    sizes = np.full(k, d.size // k)
    sizes[: d.size % k] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    accuracies, chosen = [], []
    for f in range(k):
        test = np.zeros(d.size, dtype=bool)
        test[bounds[f]:bounds[f + 1]] = True
        train = ~test if k > 1 else test
        best = int(np.argmax(_accuracies(thresholds, d[train], same[train])))
        accuracies.append(float(_accuracies(thresholds[best:best + 1], d[test], same[test])[0]))
        chosen.append(float(thresholds[best]))
    fold_accuracies = np.asarray(accuracies)
    return VerificationAccuracy(accuracy=float(np.mean(fold_accuracies)), std=float(np.std(fold_accuracies)),
                                fold_accuracies=tuple(accuracies), fold_thresholds=tuple(chosen),
                                n_pairs=int(d.size), n_folds=k)


def _accuracies(thresholds: np.ndarray, distances: np.ndarray, same: np.ndarray) -> np.ndarray:
    """(TP + TN) / n at each threshold for "same when distance < threshold"; one sort instead of a loop."""
    genuine = np.sort(distances[same])
    impostor = np.sort(distances[~same])
    accepted_genuine = np.searchsorted(genuine, thresholds, side="left")
    rejected_impostor = impostor.size - np.searchsorted(impostor, thresholds, side="left")
    return (accepted_genuine + rejected_impostor) / distances.size
