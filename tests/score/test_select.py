"""Tests for bnport.score.select: rules, ties, the guard, the baseline fallback and parity failures, on score tables
built by hand (the numbers are chosen so each rule has one right answer)."""
from __future__ import annotations

import pytest

from bnport.errors import BnportError
from bnport.score.select import Rule, parse_rule, select_model
from bnport.score.table import BenchResult, ScoreTable, fpr_label

FPRS = [1e-4, 1e-3, 1e-2]


def _result(model: str, strict: list[float], insightface: list[float] | None = None, acc=None, bench="lfw"):
    insightface = insightface or strict
    return BenchResult(model=model, bench=bench, n_genuine=100, n_impostor=10000,
                       tpr={"strict": {fpr_label(f): v for f, v in zip(FPRS, strict)},
                            "insightface": {fpr_label(f): v for f, v in zip(FPRS, insightface)}},
                       noisy={fpr_label(f): False for f in FPRS}, accuracy=acc)


def _table(rows: dict[str, list[float]], *, failed=(), kind="bin", accs=None, insightface=None) -> ScoreTable:
    models = [{"label": label, "passed": label not in failed, "failure": "3 of 900 values beyond" if label in failed
               else "", "how": "x"} for label in rows]
    results = [_result(label, values, (insightface or {}).get(label), (accs or {}).get(label))
               for label, values in rows.items() if label not in failed]
    return ScoreTable(fprs=FPRS, benches=[{"name": "lfw", "kind": kind, "pairs": 10100, "images": 1,
                                           "settings": {"flip": True}}], models=models, results=results,
                      providers=["CPUExecutionProvider"])


BASE = "0000 (baseline)"


def test_best_value_wins_and_every_loser_gets_a_reason():
    table = _table({BASE: [0.80, 0.90, 0.95], "0001": [0.82, 0.90, 0.95], "0002": [0.85, 0.89, 0.94]})
    sel = select_model(table, parse_rule("tpr@1e-4"), baseline=BASE)
    assert sel.selected == "0002" and sel.beats_baseline
    assert sel.reasons == {BASE: "5.00 points below 0002", "0001": "3.00 points below 0002"}
    assert "selected: 0002 (85.00 vs baseline 80.00)" in "\n".join(sel.lines())


def test_ties_go_to_the_earlier_model():
    table = _table({BASE: [0.80, 0.9, 0.9], "0001": [0.85, 0.9, 0.9], "0002": [0.85, 0.95, 0.95]})
    sel = select_model(table, parse_rule("tpr@1e-4"), baseline=BASE)
    assert sel.selected == "0001"
    assert sel.reasons["0002"] == "ties with 0001, which comes first"


def test_nothing_beats_the_baseline_so_it_is_selected_and_said_so():
    table = _table({BASE: [0.85, 0.9, 0.9], "0001": [0.85, 0.99, 0.99], "0002": [0.84, 0.99, 0.99]})
    sel = select_model(table, parse_rule("tpr@1e-4"), baseline=BASE)
    assert sel.selected == BASE and not sel.beats_baseline
    assert "no snapshot beats the baseline (85.00), so the baseline is selected" in "\n".join(sel.lines())


def test_guard_excludes_a_model_that_loses_elsewhere():
    table = _table({BASE: [0.80, 0.90, 0.95], "0001": [0.84, 0.897, 0.95], "0002": [0.86, 0.85, 0.95]})
    sel = select_model(table, parse_rule("tpr@1e-4"), guard=0.5, baseline=BASE)
    assert sel.selected == "0001"
    assert sel.reasons["0002"].startswith("excluded by the guard: TPR@1e-3 85.00 is 5.00 points below")
    unguarded = select_model(table, parse_rule("tpr@1e-4"), baseline=BASE)
    assert unguarded.selected == "0002"


def test_failed_parity_is_never_selected():
    table = _table({BASE: [0.80, 0.9, 0.9], "0001": [0.99, 0.99, 0.99], "0002": [0.82, 0.9, 0.9]},
                   failed=("0001",))
    sel = select_model(table, parse_rule("tpr@1e-4"), baseline=BASE)
    assert sel.selected == "0002"
    assert sel.reasons["0001"].startswith("not eligible: failed parity (3 of 900 values beyond")


def test_failed_baseline_leaves_the_others_comparable_and_says_so():
    table = _table({BASE: [0.9, 0.9, 0.9], "0001": [0.8, 0.9, 0.9], "0002": [0.82, 0.9, 0.9]}, failed=(BASE,))
    sel = select_model(table, parse_rule("tpr@1e-4"), guard=0.1, baseline=BASE)
    assert sel.selected == "0002" and sel.beats_baseline
    assert any("failed parity" in n for n in sel.notes)


def test_insightface_rule_and_accuracy_rule_read_their_own_figures():
    table = _table({BASE: [0.80, 0.9, 0.9], "0001": [0.81, 0.9, 0.9]},
                   insightface={BASE: [0.7, 0.9, 0.9], "0001": [0.6, 0.9, 0.9]},
                   accs={BASE: (99.1, 0.3), "0001": (99.4, 0.2)})
    assert select_model(table, parse_rule("strict:tpr@1e-4"), baseline=BASE).selected == "0001"
    assert select_model(table, parse_rule("insightface:tpr@1e-4"), baseline=BASE).selected == BASE
    acc = select_model(table, parse_rule("acc"), baseline=BASE)
    assert acc.selected == "0001" and acc.reasons[BASE] == "0.30% below 0001"


def test_accuracy_needs_a_bin_benchmark():
    table = _table({BASE: [0.8, 0.9, 0.9]}, kind="ijbc")
    with pytest.raises(BnportError, match="--select acc needs an insightface .bin benchmark"):
        select_model(table, parse_rule("acc"))


@pytest.mark.parametrize("text, rule", [
    (None, Rule("tpr", "strict", 1e-4)), ("tpr@1e-5", Rule("tpr", "strict", 1e-5)),
    ("insightface:tpr@1e-6", Rule("tpr", "insightface", 1e-6)), ("acc", Rule("acc")),
    ("strict:tpr@0.01,bench=IJBC", Rule("tpr", "strict", 0.01, "IJBC")),
])
def test_parse_rule(text, rule):
    assert parse_rule(text) == rule


@pytest.mark.parametrize("text", ["tpr@0", "tpr@1.5", "fpr@1e-4", "nearest:tpr@1e-4", "tpr", "acc,on=lfw",
                                  "tpr@abc"])
def test_bad_rules_are_errors(text):
    with pytest.raises(BnportError, match="bad selection rule"):
        parse_rule(text)
