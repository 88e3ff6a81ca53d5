"""Paired bootstrap intervals (bnport.score.paired) against a plain re-implementation that draws the same Poisson
counts and computes each replicate's weighted TPR by a full sort; and the `,confident` selection that reads them."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bnport.score.metrics import compute_tpr_at_fpr
from bnport.score.paired import paired_tpr_deltas
from bnport.score.select import parse_rule, select_model
from bnport.score.table import BenchResult, ScoreTable


def _weighted_tpr(scores, labels, weights, fpr):
    """Strict TPR with pair weights: the cut is the lowest impostor score such that the weight of impostors strictly
    above it is at most k = floor(fpr x n); a genuine pair counts when it scores above the cut."""
    impostor = np.flatnonzero(~labels)
    k = math.floor(fpr * len(impostor))
    order = impostor[np.argsort(scores[impostor])[::-1]]
    cumulative = np.cumsum(weights[order])
    position = int(np.searchsorted(cumulative, k + 1))
    cut = scores[order[position]]
    genuine = np.flatnonzero(labels)
    return weights[genuine][scores[genuine] > cut].sum() / weights[genuine].sum()


def _world(seed=0, n_gen=400, n_imp=20000):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(n_gen, bool), np.zeros(n_imp, bool)]
    base = np.r_[rng.normal(0.5, 0.15, n_gen), rng.normal(0, 0.1, n_imp)]
    better = base + np.r_[np.full(n_gen, 0.08), rng.normal(0, 0.01, n_imp)]
    same = base.copy()
    return labels, {"base": base, "better": better, "same": same}


@pytest.mark.parametrize("clustered", [False, True])
def test_paired_deltas_equal_a_plain_reimplementation(clustered):
    labels, scores = _world()
    fpr, replicates = 1e-3, 60
    clusters = None
    if clustered:  # templates: each pair joins two of 300 templates
        rng = np.random.default_rng(5)
        clusters = rng.integers(0, 300, size=(len(labels), 2))
    got = paired_tpr_deltas(scores, labels, "base", fpr, clusters=clusters, replicates=replicates, seed=11)
    rng = np.random.default_rng(11)
    if clusters is None:
        first, second, units = np.arange(len(labels)), None, len(labels)
    else:
        ids, inverse = np.unique(clusters.reshape(-1), return_inverse=True)
        inverse = inverse.reshape(clusters.shape)
        first, second, units = inverse[:, 0], inverse[:, 1], len(ids)
    deltas = {"better": [], "same": []}
    for _ in range(replicates):
        counts = rng.poisson(1.0, units).astype(float)
        weights = counts[first] if second is None else counts[first] * counts[second]
        base = _weighted_tpr(scores["base"], labels, weights, fpr)
        for label in deltas:
            deltas[label].append(_weighted_tpr(scores[label], labels, weights, fpr) - base)
    for label in deltas:
        low, high = np.percentile(deltas[label], [2.5, 97.5])
        assert got[label].low == pytest.approx(low, abs=1e-12) and got[label].high == pytest.approx(high, abs=1e-12)
    strict = {k: next(c.tpr for c in compute_tpr_at_fpr(labels, s, fprs=[fpr]).cells if c.rule == "strict")
              for k, s in scores.items()}
    assert got["better"].delta == pytest.approx(strict["better"] - strict["base"], abs=1e-12)
    assert got["same"].delta == 0 and got["same"].low == 0 and got["same"].high == 0 and not got["same"].confident
    assert got["better"].confident  # 8 points of genuine shift: far beyond the noise


def _table(paired_low: float, *, noisy: bool = False) -> ScoreTable:
    models = [{"label": label, "passed": True, "precision": "fp32"} for label in ("0000 (baseline)", "0001")]
    results = []
    for label, tpr in (("0000 (baseline)", 0.50), ("0001", 0.53)):
        paired = {"vs": "0000 (baseline)", "fpr": "1e-3", "units": "pairs", "delta": 0.03, "low": paired_low,
                  "high": 0.06, "replicates": 200}
        extra = {} if label.startswith("0000") else {"paired": paired}
        results.append(BenchResult(model=label, bench="b", n_genuine=100, n_impostor=100000,
                                   tpr={"strict": {"1e-3": tpr}, "insightface": {"1e-3": tpr}},
                                   noisy={"1e-3": noisy}, extra=extra))
    return ScoreTable(fprs=[1e-3], benches=[{"name": "b", "kind": "pairs"}], models=models, results=results,
                      providers=[])


def test_confident_keeps_the_baseline_when_the_win_is_noise():
    rule = parse_rule("tpr@1e-3,confident")
    assert rule.confident and rule.short() == "strict:tpr@1e-3,confident"
    kept = select_model(_table(-0.01), rule, baseline="0000 (baseline)")
    assert kept.selected == "0000 (baseline)" and not kept.beats_baseline
    assert "within noise" in kept.reasons["0001"] and any("(95%: -1.00 .. +6.00)" in n for n in kept.notes)
    taken = select_model(_table(0.01), rule, baseline="0000 (baseline)")
    assert taken.selected == "0001" and any("more than noise" in n for n in taken.notes)
    plain = select_model(_table(-0.01), parse_rule("tpr@1e-3"), baseline="0000 (baseline)")
    assert plain.selected == "0001" and any("within noise" in n for n in plain.notes)  # said, not acted on
    with pytest.raises(Exception, match="confident applies to TPR rules"):
        parse_rule("acc,confident")


def test_run_selects_confidently_by_default_where_the_benchmark_is_large_enough(tmp_path):
    from bnport.config import parse_config
    from bnport.score.select import confident_by_default

    def rule_of(select: str | None):
        score = {"bench": ["pairs:p.csv"]} | ({"select": select} if select else {})
        return parse_config({"out": "o", "model": {"spec": "iresnet_tiny"}, "calibrate": {"data": "d"},
                             "score": score}, base=tmp_path).score.rule

    assert rule_of(None).confident and rule_of(None).auto  # the run's default
    assert rule_of("tpr@1e-3,confident=off").confident is False  # said otherwise: kept
    assert rule_of("acc").confident is None  # not a TPR rule: nothing to add
    assert parse_rule("tpr@1e-3").confident is None and not parse_rule("tpr@1e-3").auto  # bnport score: plain
    auto = confident_by_default(parse_rule("tpr@1e-3"))
    kept = select_model(_table(-0.01), auto, baseline="0000 (baseline)")
    assert kept.selected == "0000 (baseline)" and "within noise" in kept.reasons["0001"]
    small = select_model(_table(-0.01, noisy=True), auto, baseline="0000 (baseline)")  # < 10/FPR impostors
    assert small.selected == "0001" and not small.rule.confident
    assert any("too few for a paired interval" in n for n in small.notes)
    stated = select_model(_table(-0.01, noisy=True), parse_rule("tpr@1e-3,confident"), baseline="0000 (baseline)")
    assert stated.selected == "0000 (baseline)"  # asked for in words: applied whatever the size
