"""Tests for bnport.score.format's recipe comparison in words (`recipe_outcome`) and the table's recipe and BN
consistency columns, on score tables built by hand with known figures."""
from __future__ import annotations

from bnport.score.format import CONSISTENCY_NOTE, format_score_table, recipe_outcome
from bnport.score.table import BenchResult, ScoreTable

RULE = {"rule": "strict:tpr@1e-3,confident", "rule_text": "TPR@FPR=1e-3", "bench": "pairs"}


def _table(values: dict, paired: dict, recipes: dict, consistency: dict | None = None) -> ScoreTable:
    models = [{"label": label, "passed": True, "how": "graph reused", "recipe": recipes.get(label),
               "precision": "fp32", "consistency": (consistency or {}).get(label)} for label in values]
    results = [BenchResult(model=label, bench="pairs", n_genuine=2000, n_impostor=10000,
                           tpr={"strict": {"1e-3": v}, "insightface": {"1e-3": v}}, noisy={"1e-3": False},
                           extra={"paired": paired[label]} if label in paired else {})
               for label, v in values.items()]
    return ScoreTable(fprs=[1e-3], benches=[{"name": "pairs", "kind": "pairs", "images": 400, "pairs": 12000,
                                             "settings": {"flip": False}}], models=models, results=results,
                      providers=["CPUExecutionProvider"])


def _paired(delta: float, low: float, high: float) -> dict:
    return {"fpr": "1e-3", "vs": "0000 (baseline)", "delta": delta, "low": low, "high": high}


VALUES = {"0000 (baseline)": 0.50, "a/0001": 0.70, "a/0002": 0.80, "b/0001": 0.60}
RECIPES = {"a/0001": "a", "a/0002": "a", "b/0001": "b"}


def test_each_recipe_best_the_winner_and_a_runner_up_apart_beyond_noise():
    paired = {"a/0002": _paired(0.30, 0.25, 0.35), "b/0001": _paired(0.10, 0.05, 0.15)}
    table = _table(VALUES, paired, RECIPES)
    lines = recipe_outcome(table, {**RULE, "values": VALUES, "baseline": "0000 (baseline)", "selected": "a/0002"})
    assert lines == [
        "recipes compared by TPR@FPR=1e-3 on pairs; the shared baseline 0000 (baseline): 50.00",
        "recipe a: best a/0002 80.00 (+30.00 points over the baseline)",
        "recipe b: best b/0001 60.00 (+10.00 points over the baseline)",
        "outcome: recipe a is selected (a/0002)",
        "runner-up b/0001: 20.00 points behind; paired intervals against the baseline: winner +25.00 .. +35.00, "
        "runner-up +5.00 .. +15.00: apart, so the winning recipe is ahead beyond noise"]


def test_overlapping_intervals_say_the_recipes_are_not_separated():
    paired = {"a/0002": _paired(0.30, 0.12, 0.40), "b/0001": _paired(0.10, 0.02, 0.20)}
    lines = recipe_outcome(_table(VALUES, paired, RECIPES),
                           {**RULE, "values": VALUES, "baseline": "0000 (baseline)", "selected": "a/0002"})
    assert lines[-1].endswith("they overlap, so this benchmark does not separate the recipes beyond noise")


def test_a_kept_baseline_and_a_table_without_recipes():
    selection = {**RULE, "values": VALUES, "baseline": "0000 (baseline)", "selected": "0000 (baseline)"}
    lines = recipe_outcome(_table(VALUES, {}, RECIPES), selection)
    assert lines[-1] == "outcome: no recipe's snapshot won under the rule, so the baseline is kept"
    assert recipe_outcome(_table(VALUES, {}, {}), selection) == []
    assert recipe_outcome(_table(VALUES, {}, RECIPES), None) == []


def test_the_table_shows_the_recipe_and_consistency_columns_only_when_some_model_has_them():
    text = format_score_table(_table(VALUES, {}, RECIPES, {"a/0002": {"worst": 0.0123}}))
    header = next(line for line in text.splitlines() if line.startswith("model"))
    assert header.split()[:3] == ["model", "recipe", "parity"] and "BN consistency" in header
    row = next(line for line in text.splitlines() if line.startswith("a/0002"))
    assert row.split()[1] == "a" and "1.2e-02" in row.split()
    baseline = next(line for line in text.splitlines() if line.startswith("0000 (baseline)"))
    assert baseline.split()[2] == "-"  # no recipe
    assert CONSISTENCY_NOTE in text
    plain = format_score_table(_table(VALUES, {}, {}))
    assert "recipe" not in plain and "BN consistency" not in plain
