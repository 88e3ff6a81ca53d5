"""Tests for `bnport run CONFIG.toml` (end to end, and resumed after a kill -9 with the same result as a run that was
never interrupted) and `bnport demo` on the embedded model."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from bnport.cli import cli
from tests.helpers.pipeline import assert_same_scores, pipeline_config, write_pipeline_inputs
from tests.helpers.processes import bnport, kill_when

CALIBRATE = """
noise = ["blur:p=0.2,sigma=1-2", "fractal:ratio=0.2"]
mode = "exact"
batch_size = 4
steps = {steps}
snapshot_every = {every}
workers = 0
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_pipeline_inputs(tmp_path_factory.mktemp("pipeline"))


def _config(root: Path, out: str, *, steps: int = 6, every: int = 2) -> Path:
    path = root / f"{out}.toml"
    path.write_text(pipeline_config(out, CALIBRATE.format(steps=steps, every=every)))
    return path


def test_run_goes_from_config_to_bundle_and_report(inputs):
    result = CliRunner().invoke(cli, ["run", str(_config(inputs, "full"))])
    assert result.exit_code == 0, result.output
    out = inputs / "full"
    assert "TPR (%) at FPR, strict rule" in result.stdout
    assert f"handoff bundle: {out / 'score' / 'handoff'}" in result.stdout
    bundle = sorted(p.name for p in (out / "score" / "handoff").iterdir())
    assert {"model.onnx", "model.json", "report.md", "scores.md", "drift.png", "bn_outputs.png"} <= set(bundle)
    table = json.loads((out / "score" / "table.json").read_text())
    assert [m["label"] for m in table["models"]] == ["0000 (baseline)", "0001", "0002", "0003"]
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    again = CliRunner().invoke(cli, ["run", str(_config(inputs, "full"))])
    assert again.exit_code == 0 and "is complete (4 snapshots, same settings); going on to scoring" in again.stderr
    assert "cached full export" in again.stdout and "cached graph reused" in again.stdout


def test_a_config_that_no_longer_matches_its_run_is_refused_naming_what_changed(inputs):
    assert CliRunner().invoke(cli, ["run", str(_config(inputs, "changed"))]).exit_code == 0
    edited = inputs / "changed.toml"
    edited.write_text(edited.read_text().replace('"fractal:ratio=0.2"', '"fractal:ratio=0.5"').replace(
        "steps = 6", "steps = 8"))
    result = CliRunner().invoke(cli, ["run", str(edited)])
    assert result.exit_code == 1
    assert "holds a run made with other settings than this config (calibration.noise, calibration.total_steps " \
           "differ)" in result.stderr and "set another out folder" in result.stderr


@pytest.mark.parametrize("line, message", [('bench = ["lfw.bin"]', 'bench = ["missing.bin"]'),
                                           ('select = "tpr@1e-1"', 'select = "tpr@1e-1,bench=nothere"'),
                                           ('fpr = [1e-2, 1e-1]', 'precision = ["fp8"]')])
def test_score_settings_are_checked_before_calibrating(inputs, line, message):
    config = _config(inputs, "early")
    config.write_text(config.read_text().replace(line, message if "precision" not in message else
                                                 line + "\n" + message))
    result = CliRunner().invoke(cli, ["run", str(config)])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert not (inputs / "early").exists()  # nothing was calibrated


def test_run_resumes_after_kill_with_the_result_of_an_uninterrupted_run(inputs):
    config = _config(inputs, "killed", steps=40, every=8)
    kill_when(inputs / "killed" / "snapshots" / "0002.json", "run", str(config))
    manifest = json.loads((inputs / "killed" / "run.json").read_text())
    assert manifest["status"] == "running" and not (inputs / "killed" / "score").exists()
    resumed = bnport("run", str(config))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming the run" in resumed.stderr
    whole = CliRunner().invoke(cli, ["run", str(_config(inputs, "whole", steps=40, every=8))])
    assert whole.exit_code == 0, whole.output
    assert_same_scores(inputs / "killed" / "score", inputs / "whole" / "score")


def test_demo_runs_the_embedded_model_end_to_end(tmp_path):
    """What the README's first command runs: the table printed, a bundle on disk, under the stated time."""
    began = time.perf_counter()
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "demo"), "--device", "cpu"])
    seconds = time.perf_counter() - began
    assert result.exit_code == 0, result.output
    out = tmp_path / "demo"
    assert "digits (bin" in result.stdout and "pairs (pairs" in result.stdout
    assert f"handoff bundle: {out / 'score' / 'handoff'}" in result.stdout
    table = json.loads((out / "score" / "table.json").read_text())
    assert len(table["models"]) == 10 and all(m["passed"] for m in table["models"])
    assert [m["recipe"] for m in table["models"]] == [None] + [r for r in ("blur", "noise-images", "fractal")
                                                               for _ in range(3)]
    for recipe, noise in (("blur", "blur"), ("noise-images", "gauss-append"), ("fractal", "fractal")):
        manifest = json.loads((out / "recipes" / recipe / "run.json").read_text())
        assert [n["name"] for n in manifest["calibration"]["noise"]] == [noise]
    card = json.loads((out / "score" / "handoff" / "model.json").read_text())
    assert card["selection"]["bench"] == "pairs" and card["model"]["label"] == table["selection"]["selected"]
    assert card["provenance"]["recipe"] == next(m["recipe"] for m in table["models"]
                                                if m["label"] == card["model"]["label"])
    assert any(line.startswith("outcome:") for line in card["recipes"]) and "outcome:" in result.stdout
    assert seconds < 300
