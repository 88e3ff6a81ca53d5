"""`--precision` in export and score (issue 10): INT8/FP16 files from the CLI on a registry model and on a user's
model file, scored beside their float32 files with latency, and the precision choice: the fastest precision within
the allowed drop ships, and one that loses more is never handed off, with the reason printed."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bnport.cli import cli
from bnport.score.select import choose_precision, parse_rule, select_model
from bnport.score.table import BenchResult, ScoreTable, fpr_label
from tests.helpers.benchdata import write_bin_pack
from tests.helpers.runs import copy_run

USER_MODEL = '''
import torch.nn as nn


def build():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 12), nn.BatchNorm1d(12))
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory, shared_ema_run):
    """A copy of the shared EMA run (trained-looking weights in w.safetensors, 16 images in calib/, snapshots 0000 to
    0003), since scoring writes its exports into the run; a .bin pack and a user's model file beside it."""
    root = copy_run(shared_ema_run, tmp_path_factory.mktemp("precision") / "world")
    write_bin_pack(root / "lfw.bin", 30)
    (root / "net.py").write_text(USER_MODEL)
    return root


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_export_int8_on_a_registry_model(world, tmp_path):
    out = tmp_path / "tiny.onnx"
    result = CliRunner().invoke(cli, ["export", "iresnet_tiny", "--weights", str(world / "w.safetensors"),
                                      "--fold-bn", "-o", str(out), "--precision", "int8", "--parity-data",
                                      str(world / "calib"), "--exporter", "torchscript", "--device", "cpu",
                                      "--precision-min-cos", "0.9"])
    assert result.exit_code == 0, result.output
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(out)
    assert (tmp_path / "tiny.fp32.onnx").is_file() and "QuantizeLinear" not in _ops(tmp_path / "tiny.fp32.onnx")
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["precision"] == "int8" and json.loads(meta["precision_settings"])["format"] == "QDQ"
    calib = json.loads(meta["calibration_data"])
    assert calib["kind"] == "folder" and not set(calib["calibration_indices"]) & set(calib["parity_indices"])
    assert json.loads(meta["parity"])["passed"]  # the float32 file's own PyTorch parity travels too
    assert "int8 parity PASS vs the float32 file" in result.stdout


def test_export_fp16_on_a_users_model_file(world, tmp_path):
    out = tmp_path / "net.onnx"
    result = CliRunner().invoke(cli, ["export", f"{world / 'net.py'}:build", "--fold-bn", "-o", str(out),
                                      "--precision", "fp16", "--input-size", "32x32", "--parity-data",
                                      str(world / "calib"), "--exporter", "torchscript", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_int8_without_calibration_images_is_one_error(world, tmp_path):
    result = CliRunner().invoke(cli, ["export", "iresnet_tiny", "--fold-bn", "-o", str(tmp_path / "x.onnx"),
                                      "--precision", "int8", "--exporter", "torchscript", "--device", "cpu"])
    assert result.exit_code == 1 and "INT8 needs calibration images" in result.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_score_int8_beside_float32_with_latency_and_the_choice_printed(world, tmp_path):
    out = tmp_path / "s"
    result = CliRunner().invoke(cli, ["score", str(world / "run"), "--bench", str(world / "lfw.bin"), "--out",
                                      str(out), "--precision", "fp32,int8", "--fpr", "1e-1", "--select", "tpr@1e-1",
                                      "--precision-min-cos", "0.9", "--cache-dir", str(tmp_path / "cache"),
                                      "--exporter", "torchscript", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    table = json.loads((out / "table.json").read_text())
    labels = [m["label"] for m in table["models"]]
    assert labels[:2] == ["0000 (baseline)", "0000 (baseline) int8"]
    int8 = [m for m in table["models"] if m["precision"] == "int8"]
    assert int8 and all(m["latency"]["median_ms"]["8"] > 0 for m in int8)
    assert "precision" in result.stdout.splitlines()[2] or "ms b8" in result.stdout
    selection = table["selection"]
    assert selection["precision_reasons"]["int8"]  # a reason for int8 either way
    assert f"precision: {selection['precision']}" in result.stdout
    card = json.loads((out / "handoff" / "model.json").read_text())
    assert set(card["precisions"]) == {"fp32", "int8"}
    assert card["model"]["label"] == selection["final"]
    assert all(p["latency_ms"] for p in card["precisions"].values())


def test_int8_that_loses_more_than_allowed_is_never_handed_off(tmp_path):
    """The trained demo model, its INT8 version calibrated on flat grey images (activation ranges far too narrow
    for digits) and let through its gate (--precision-min-cos -1), so only the verification metric stands between
    it and the bundle."""
    import cv2

    from bnport.demo import demo_files

    files = demo_files()
    grey = tmp_path / "grey"
    grey.mkdir()
    for i in range(20):
        cv2.imwrite(str(grey / f"{i}.png"), np.full((32, 32, 3), 20 + i % 3, np.uint8))
    out = tmp_path / "s"
    result = CliRunner().invoke(cli, ["score", files.model, "--weights", str(files.weights), "--bench",
                                      f"pairs:{files.pairs_csv},flip=off", "--out", str(out), "--precision",
                                      "fp32,int8", "--fpr", "1e-2", "--select", "tpr@1e-2", "--max-drop", "0.2",
                                      "--calib-data", str(grey), "--precision-min-cos", "-1", "--parity-data",
                                      str(files.calibration), "--cache-dir", str(tmp_path / "cache"), "--exporter",
                                      "torchscript", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    table = json.loads((out / "table.json").read_text())
    fp32, int8 = (next(r for r in table["results"] if r["model"] == m) for m in ("iresnet_demo", "iresnet_demo int8"))
    assert fp32["tpr"]["strict"]["1e-2"] - int8["tpr"]["strict"]["1e-2"] > 0.05
    assert table["selection"]["precision"] == "fp32" and table["selection"]["final"] == "iresnet_demo"
    assert "loses more than the 0.2 allowed" in table["selection"]["precision_reasons"]["int8"]
    assert "int8: TPR@1e-2" in result.stdout and "loses more than the 0.2 allowed" in result.stdout
    meta = {p.key: p.value for p in onnx.load(str(out / "handoff" / "model.onnx")).metadata_props}
    assert "precision" not in meta  # the float32 file shipped


# choose_precision on hand-built tables: which precision ships


def _table(rows: dict[str, tuple[str, float, float, bool]]) -> ScoreTable:
    """rows: label -> (precision, TPR@1e-4, latency ms at batch 8, gate passed)."""
    models, results = [], []
    for label, (precision, tpr, ms, passed) in rows.items():
        base = label.split(" ")[0]
        models.append({"label": label, "passed": passed, "how": "x", "precision": precision, "base": base,
                       "failure": "" if passed else "row cosine 0.95 < 0.99",
                       "latency": {"median_ms": {"1": ms / 4, "8": ms}, "min_ms": {"1": ms / 5, "8": ms * 0.9},
                                   "device": "cuda"}})
        if passed:
            results.append(BenchResult(model=label, bench="lfw", n_genuine=10, n_impostor=100000,
                                       tpr={r: {fpr_label(1e-4): tpr} for r in ("strict", "insightface")},
                                       noisy={fpr_label(1e-4): False}))
    return ScoreTable(fprs=[1e-4], benches=[{"name": "lfw", "kind": "bin", "images": 1, "pairs": 1,
                                             "settings": {}}], models=models, results=results, providers=[])


def _choose(rows, max_drop=0.2):
    table = _table(rows)
    return choose_precision(table, select_model(table, parse_rule("tpr@1e-4")), max_drop=max_drop)


def test_the_fastest_precision_within_the_drop_ships():
    sel = _choose({"0000": ("fp32", 0.900, 100, True), "0000 fp16": ("fp16", 0.899, 90, True),
                   "0000 int8": ("int8", 0.8995, 45, True)})
    assert sel.precision == "int8" and sel.final == "0000 int8"
    assert sel.precision_reasons["int8"].startswith("chosen: TPR@1e-4 -0.05 points, 0.45x")
    assert sel.precision_reasons["fp16"].startswith("within the allowed but slower than int8")
    assert "precision: int8 (0000 int8)" in "\n".join(sel.lines())


def test_a_precision_losing_more_than_allowed_never_ships():
    sel = _choose({"0000": ("fp32", 0.900, 100, True), "0000 int8": ("int8", 0.869, 40, True)})
    assert sel.precision == "fp32" and sel.final == "0000"
    assert sel.precision_reasons["int8"] == ("TPR@1e-4 -3.10 points, 0.40x the float32 latency at batch 8: loses "
                                             "more than the 0.2 allowed")
    assert sel.precision_reasons["fp32"].startswith("chosen: no lower precision")


def test_not_faster_or_failed_gate_keeps_float32():
    sel = _choose({"0000": ("fp32", 0.9, 100, True), "0000 int8": ("int8", 0.9, 120, True),
                   "0000 fp16": ("fp16", 0.9, 50, False)})
    assert sel.precision == "fp32"
    reason = sel.precision_reasons["int8"]
    assert "not faster than float32 (needs <= 0.9x in the median and the fastest run)" in reason
    assert reason.endswith("INT8 pays off on a CPU (score with --device cpu) or with TensorRT")  # timed on CUDA
    assert sel.precision_reasons["fp16"] == "failed its gate against float32 (row cosine 0.95 < 0.99)"


HEAVY_MODEL = '''
import torch.nn as nn


def build():
    layers, width = [], 3
    for out, stride in ((64, 2), (128, 2), (128, 1), (256, 2)):
        layers += [nn.Conv2d(width, out, 3, padding=1, stride=stride), nn.BatchNorm2d(out), nn.ReLU()]
        width = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 32), nn.BatchNorm1d(32))
'''


def test_int8_that_is_faster_and_within_the_drop_is_handed_off(world, tmp_path):
    """A user's model file of plain dense convolutions, which INT8 speeds up on a VNNI CPU (0.48x here). The drop
    allowance is wide, so speed alone decides: the decision must follow the latency the table shows."""
    (tmp_path / "heavy.py").write_text(HEAVY_MODEL)
    out = tmp_path / "s"
    result = CliRunner().invoke(cli, ["score", f"{tmp_path / 'heavy.py'}:build", "--bench", str(world / "lfw.bin"),
                                      "--out", str(out), "--precision", "fp32,int8", "--max-drop", "100", "--fpr",
                                      "1e-1", "--select", "tpr@1e-1", "--parity-data", str(world / "calib"),
                                      "--precision-min-cos", "-1", "--cache-dir", str(tmp_path / "cache"),
                                      "--exporter", "torchscript", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    table = json.loads((out / "table.json").read_text())
    fp32, int8 = table["models"]
    ratio = int8["latency"]["median_ms"]["8"] / fp32["latency"]["median_ms"]["8"]
    meta = {p.key: p.value for p in onnx.load(str(out / "handoff" / "model.onnx")).metadata_props}
    card = json.loads((out / "handoff" / "model.json").read_text())
    if ratio <= 0.9:
        assert table["selection"]["final"] == int8["label"] and meta["precision"] == "int8"
        assert card["precisions"]["int8"]["reason"].startswith("chosen: ")
        assert f"{ratio:.2f}x the float32 latency at batch 8" in result.stdout
    else:  # a CPU where INT8 convolutions are not faster: float32 ships, and says why
        assert table["selection"]["final"] == fp32["label"] and "precision" not in meta
        assert "not faster than float32" in card["precisions"]["int8"]["reason"]


def test_fp16_timed_on_a_cpu_is_never_shipped():
    table = _table({"0000": ("fp32", 0.9, 100, True), "0000 fp16": ("fp16", 0.9, 50, True)})
    for model in table.models:
        model["latency"]["device"] = "cpu"
    sel = choose_precision(table, select_model(table, parse_rule("tpr@1e-4")))
    assert sel.precision == "fp32" and "no float16 kernels" in sel.precision_reasons["fp16"]

