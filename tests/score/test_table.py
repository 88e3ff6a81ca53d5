"""Tests for bnport.score.table: how FPR targets are named (`fpr_label`), the figure a selection rule reads from a
`BenchResult` (`value`: accuracy or TPR under either rule), and the score table's way to table.json and back
(`ScoreTable.to_dict` through real JSON text, then `from_dict`), extra fields included."""
from __future__ import annotations

import json
import math

import pytest

from bnport.score.table import BenchResult, ScoreTable, fpr_label


@pytest.mark.parametrize("fpr, label", [
    (1e-6, "1e-6"), (1e-4, "1e-4"), (1e-1, "1e-1"), (0.1, "1e-1"), (5e-3, "5e-3"), (3e-7, "3e-7"),
    (0.15, "0.15"), (2.5e-3, "0.0025"), (1.0, "1e0"), (0.5, "5e-1"),
])
def test_fpr_label_names_round_targets_by_power_of_ten_and_others_plainly(fpr, label):
    assert fpr_label(fpr) == label
    assert float(label) == pytest.approx(fpr)  # every label reads back as its target


def _result(model: str = "0001", bench: str = "lfw", **extra) -> BenchResult:
    return BenchResult(model=model, bench=bench, n_genuine=20, n_impostor=20000,
                       tpr={"strict": {"1e-4": 0.25, "1e-1": 0.75}, "insightface": {"1e-4": 0.3, "1e-1": 0.8}},
                       noisy={"1e-4": True, "1e-1": False},
                       achieved_fpr={"strict": {"1e-4": 5e-5, "1e-1": 0.0995}},
                       thresholds={"strict": {"1e-4": 0.61, "1e-1": 0.2}},
                       intervals={"strict": {"1e-4": [0.2, 0.31], "1e-1": [0.7, 0.79]}},
                       accuracy=(97.5, 1.25), scores_file="/s/0001__lfw.npy", seconds=1.23456, **extra)


def test_value_reads_accuracy_or_tpr_under_the_named_rule():
    result = _result()
    assert result.value("acc") == 97.5
    assert result.value("tpr", "strict", 1e-4) == 0.25
    assert result.value("tpr", "insightface", 1e-4) == 0.3
    assert result.value("tpr", "strict", 0.1) == 0.75  # 0.1 and 1e-1 name the same cell
    no_accuracy = BenchResult(model="m", bench="pairs", n_genuine=3, n_impostor=3, tpr={"strict": {"1e-1": 1.0}},
                              noisy={"1e-1": True})
    assert math.isnan(no_accuracy.value("acc"))
    with pytest.raises(KeyError):
        result.value("tpr", "strict", 1e-3)  # a target that was not scored is not made up


def test_score_table_round_trips_through_table_json():
    table = ScoreTable(fprs=[1e-4, 1e-1],
                       benches=[{"name": "lfw", "kind": "bin", "images": 80, "pairs": 40, "settings": {"flip": True}}],
                       models=[{"label": "0000 (baseline)", "passed": True}, {"label": "0001", "passed": True}],
                       results=[_result("0000 (baseline)"), _result("0001", extra={"features_norm": 11.5})],
                       providers=["CPUExecutionProvider"], device_note="CUDA not used",
                       session_settings={"use": "as deployed"})
    data = table.to_dict()
    assert data["fpr_labels"] == ["1e-4", "1e-1"]
    assert data["results"][1]["features_norm"] == 11.5  # extra fields sit beside the known ones
    assert data["results"][0]["accuracy"] == [97.5, 1.25] and data["results"][0]["seconds"] == 1.235
    back = ScoreTable.from_dict(json.loads(json.dumps(data)))
    assert back.to_dict() == json.loads(json.dumps(data))
    first, second = back.results
    assert first.accuracy == (97.5, 1.25) and isinstance(first.accuracy, tuple)
    assert second.extra == {"features_norm": 11.5}
    assert first.tpr == table.results[0].tpr and first.intervals == table.results[0].intervals
    assert back.fprs == [1e-4, 1e-1] and back.providers == ["CPUExecutionProvider"]
    assert back.device_note == "CUDA not used" and back.session_settings == {"use": "as deployed"}
    assert back.result("0001", "lfw") is second and back.result("0002", "lfw") is None
    assert back.result("0001", "cfp_fp") is None


def test_an_older_table_without_the_optional_fields_still_reads():
    data = {"fprs": [1e-1], "benches": [], "models": [],
            "results": [{"model": "m", "bench": "b", "n_genuine": 1, "n_impostor": 1, "tpr": {"strict": {"1e-1": 1}},
                         "noisy": {"1e-1": True}, "accuracy": None}]}
    table = ScoreTable.from_dict(data)
    assert table.providers == [] and table.device_note == "" and table.session_settings == {}
    assert table.results[0].accuracy is None and table.results[0].extra == {}
