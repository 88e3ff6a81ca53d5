"""The operating point the handoff ships (bnport.score.operating): the threshold interval against a direct bootstrap
(np.random.choice over the impostors, full sort, same threshold rule), and the card's operating point against the
table's strict threshold."""
from __future__ import annotations

import numpy as np

from bnport.score.metrics import compute_tpr_at_fpr
from bnport.score.operating import operating_point, threshold_interval, usage_lines
from bnport.score.table import BenchResult


def _scores(seed: int = 0, n_genuine: int = 3000, n_impostor: int = 60000):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(n_genuine, bool), np.zeros(n_impostor, bool)]
    return np.r_[rng.normal(0.55, 0.12, n_genuine), rng.normal(0.0, 0.1, n_impostor)], labels


def test_threshold_interval_agrees_with_a_direct_bootstrap():
    scores, labels = _scores()
    fpr = 1e-3
    low, high = threshold_interval(scores, labels, fpr, replicates=400, seed=1)
    rng = np.random.default_rng(7)
    impostor = scores[~labels]
    every = np.sort(scores)
    direct = []
    for _ in range(400):
        resample = np.sort(rng.choice(impostor, len(impostor)))[::-1]
        cut = resample[int(fpr * len(impostor))]  # the (k+1)-th highest impostor score
        direct.append(every[np.searchsorted(every, cut, side="right")])
    d_low, d_high = np.percentile(direct, [2.5, 97.5])
    width = d_high - d_low
    assert abs(low - d_low) < 0.25 * width and abs(high - d_high) < 0.25 * width  # two bootstraps, same law
    strict = next(c for c in compute_tpr_at_fpr(labels, scores, fprs=[fpr]).cells if c.rule == "strict")
    assert low <= strict.threshold <= high


def test_operating_point_reads_the_scores_files(tmp_path):
    scores, labels = _scores(seed=3)
    np.save(tmp_path / "s.npy", scores)
    np.save(tmp_path / "l.npy", labels)
    table = compute_tpr_at_fpr(labels, scores, fprs=[1e-3])
    strict = next(c for c in table.cells if c.rule == "strict")
    result = BenchResult(model="m", bench="b", n_genuine=table.n_genuine, n_impostor=table.n_impostor,
                         tpr={"strict": {"1e-3": strict.tpr}}, noisy={"1e-3": False},
                         achieved_fpr={"strict": {"1e-3": strict.fpr}},
                         thresholds={"strict": {"1e-3": strict.threshold}},
                         scores_file=str(tmp_path / "s.npy"), extra={"labels_file": str(tmp_path / "l.npy")})
    point = operating_point(result, 1e-3, replicates=100)
    assert point["threshold"] == strict.threshold and point["tpr"] == strict.tpr and point["achieved_fpr"] <= 1e-3
    assert point["interval"][0] <= point["threshold"] <= point["interval"][1]
    accepted = scores[~labels] >= point["threshold"]
    assert accepted.mean() == point["achieved_fpr"]  # the stated threshold gives the stated FPR
    lines = usage_lines(point, "b")
    assert lines[-1] == "same_person = similarity >= threshold" and repr(point["threshold"]) in lines[0]
