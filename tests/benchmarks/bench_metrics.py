"""TPR@FPR at IJB-C size: bnport's metrics against scikit-learn's `roc_curve` plus insightface's nearest-point rule.

Usage: python tests/benchmarks/bench_metrics.py [--pairs 15658489] [--genuine 19557] [--seed 0] [--bootstrap 20]

Builds IJB-C-sized pair scores (genuine ~ N(0.5, 0.15), impostor ~ N(0, 0.1), plus a few hundred hard impostors
scoring like genuine pairs), then times `compute_tpr_at_fpr` against the route of insightface's eval_ijbc.py
(`roc_curve`, flip, first nearest point per target), asserts that both give identical TPR at every target
1e-6 ... 1e-1; it also times the whole-curve `compute_roc` (for plots) and, with `--bootstrap N`, N bootstrap
replicates. The last line is the TPR@FPR speed-up over scikit-learn (target >= 10x).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import roc_curve

from bnport.score.metrics import DEFAULT_FPRS, compute_roc, compute_tpr_at_fpr


def make_scores(n_pairs: int, n_genuine: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.zeros(n_pairs, dtype=np.int64)
    labels[rng.choice(n_pairs, n_genuine, replace=False)] = 1
    scores = rng.normal(0.0, 0.1, n_pairs)
    genuine = labels == 1
    scores[genuine] = rng.normal(0.5, 0.15, n_genuine)
    hard = rng.choice(np.flatnonzero(~genuine), 300, replace=False)
    scores[hard] = rng.normal(0.45, 0.15, hard.size)
    # IJB-C scores are float32 cosines averaged into float64: keep that resolution so tied scores occur too
    return labels, scores.astype(np.float32).astype(np.float64)


def insightface_route(labels: np.ndarray, scores: np.ndarray) -> list[float]:
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    return [float(tpr[np.argmin(np.abs(fpr - target))]) for target in DEFAULT_FPRS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=15_658_489)
    parser.add_argument("--genuine", type=int, default=19_557)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=0)
    args = parser.parse_args()
    labels, scores = make_scores(args.pairs, args.genuine, args.seed)
    print(f"{args.pairs} pairs, {args.genuine} genuine")

    start = time.perf_counter()
    reference = insightface_route(labels, scores)
    t_sklearn = time.perf_counter() - start
    start = time.perf_counter()
    table = compute_tpr_at_fpr(labels, scores)
    t_bnport = time.perf_counter() - start

    ours = [c.tpr for c in table.row("insightface")]
    for target, a, b in zip(DEFAULT_FPRS, reference, ours):
        print(f"FPR {target:g}: sklearn+nearest {100 * a:.4f}  bnport {100 * b:.4f}")
    assert ours == reference, "bnport's insightface-rule TPR differs from sklearn roc_curve + nearest point"
    print(table)
    print(f"sklearn roc_curve + nearest point: {t_sklearn:.3f} s")
    print(f"bnport compute_tpr_at_fpr (both rules): {t_bnport:.3f} s")
    start = time.perf_counter()
    compute_roc(labels, scores, max_points=2000)
    print(f"bnport compute_roc (whole curve, for plots): {time.perf_counter() - start:.3f} s")
    if args.bootstrap:
        start = time.perf_counter()
        compute_tpr_at_fpr(labels, scores, bootstrap=args.bootstrap, seed=args.seed)
        t_boot = time.perf_counter() - start - t_bnport
        per = 1000 * t_boot / args.bootstrap
        print(f"bootstrap: {args.bootstrap} replicates in {t_boot:.2f} s ({per:.0f} ms each, region set-up included)")
    print(f"{t_sklearn / t_bnport:.1f}x")


if __name__ == "__main__":
    main()
