"""Tests for `bnport report`: the numbers behind each plot (drift from the snapshot files, BN outputs from a direct
float64 computation, ROC from the saved scores) and the files written (real PNGs, report.md naming them, the bundle
carrying them)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from bnport.cli import cli
from bnport.export.settings import ExportSettings
from bnport.model.snapshot import load_snapshot_model
from bnport.report.data import bn_outputs, consistency_series, drift_series, report_data, roc_curves
from bnport.runs import Run
from bnport.score import ScoreSettings, score
from bnport.score.metrics import compute_roc
from tests.helpers.benchdata import write_bin_pack
from tests.helpers.runs import copy_run


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, shared_ema_run):
    """A copy of the shared EMA run (16 images, fractal noise, snapshots 0000 to 0003) scored into its own score/."""
    root = copy_run(shared_ema_run, tmp_path_factory.mktemp("report") / "world")
    write_bin_pack(root / "lfw.bin", 30)
    score([str(root / "run")],
          ScoreSettings.of([str(root / "lfw.bin")], cache_dir=root / "cache", fprs="1e-2,1e-1", select="tpr@1e-1",
                           bootstrap=20),
          device="cpu", export=ExportSettings(exporter="torchscript"), progress=False, log=lambda m: None)
    return root / "run"


def test_drift_series_equals_the_snapshot_tensors(scored_run):
    run = Run.open(scored_run)
    series = drift_series(run)
    assert series.snapshots == [s.id for s in run.snapshots()][1:]
    base = load_file(str(run.snapshot(0).tensors))
    for row, snap in enumerate(run.snapshots()[1:]):
        state = load_file(str(snap.tensors))
        for col, layer in enumerate(series.layers):
            for buf, values in (("running_mean", series.mean), ("running_var", series.var)):
                p0 = base[f"{layer}.{buf}"].double().numpy()
                p1 = state[f"{layer}.{buf}"].double().numpy()
                assert values[row, col] == pytest.approx(np.linalg.norm(p1 - p0) / np.linalg.norm(p0), rel=1e-9)


def test_consistency_series_holds_each_layers_worst_channel_from_the_snapshots(scored_run, tmp_path):
    import shutil

    run = Run.open(scored_run)
    snaps = run.snapshots()
    series = consistency_series([(s.id, s) for s in snaps] + [("again", snaps[0])])
    assert series.labels == [s.id for s in snaps] + ["again"]
    for row, snap in enumerate(snaps):
        layers = snap.meta()["consistency"]["held_out"]["layers"]
        assert series.layers == list(layers)
        np.testing.assert_array_equal(series.values[row], [max(f["mean_worst"], f["var_worst"])
                                                           for f in layers.values()])
    copy = tmp_path / "run"
    shutil.copytree(scored_run, copy, ignore=shutil.ignore_patterns("score", "exports"))
    for meta in (copy / "snapshots").glob("[0-9][0-9][0-9][0-9].json"):  # as an older bnport wrote them
        data = json.loads(meta.read_text())
        data.pop("consistency")
        meta.write_text(json.dumps(data))
    data = report_data(Run.open(copy), analysis_images=4)
    assert data.consistency is None and any("BN consistency not drawn" in n for n in data.notes)


def test_bn_outputs_equal_a_direct_float64_computation(scored_run):
    from bnport.export.parity import load_parity_images

    run = Run.open(scored_run)
    out = bn_outputs(run, 2, samples=10 ** 9)
    assert out.layers[:2] == ["bn1", "layer1.0.bn1"] and out.layers[-1] == "features"
    module = load_snapshot_model(run.snapshot(2).tensors).module.double()
    x = load_parity_images(run.manifest()["data"]["src"], InputSpecOf(run), limit=32).double()
    bn = module.bn1
    with torch.no_grad():
        pre = module.conv1(x)
        direct = (pre - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var[None, :, None, None] +
                                                                          bn.eps)
        direct = direct * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    np.testing.assert_allclose(out.clean["bn1"], direct.flatten().numpy(), rtol=1e-4, atol=1e-4)
    assert out.n_clean == 16 and out.n_noise > 0 and out.noise_kinds == ["fractal"]
    assert not np.allclose(out.noise["bn1"][:100], out.clean["bn1"][:100])


def InputSpecOf(run: Run):
    from bnport.data.transforms import InputSpec

    return InputSpec.from_dict(run.manifest()["input_spec"])


def test_roc_curves_come_from_the_saved_scores(scored_run):
    table = json.loads((scored_run / "score" / "table.json").read_text())
    curves = roc_curves(table, "lfw", ["0000 (baseline)", "0002"], points=10 ** 6)
    assert [c.model for c in curves] == ["0000 (baseline)", "0002"]
    result = next(r for r in table["results"] if r["model"] == "0002")
    reference = compute_roc(np.load(result["labels_file"]), np.load(result["scores_file"]))
    np.testing.assert_array_equal(curves[1].fpr, reference.fpr)
    np.testing.assert_array_equal(curves[1].tpr, reference.tpr)
    assert curves[1].intervals is not None and len(curves[1].intervals) == 2


def test_report_writes_real_plots_and_markdown_and_fills_the_bundle(scored_run):
    result = CliRunner().invoke(cli, ["report", str(scored_run)])
    assert result.exit_code == 0, result.output
    files = [line for line in result.stdout.splitlines() if line]
    names = sorted(p.rsplit("/", 1)[1] for p in files)
    assert names == ["bn_outputs.png", "centre_cosine.png", "centre_distance.png", "consistency.png", "drift.png",
                     "gain_lfw.png", "likelihood.png", "likelihood_per_snapshot.png", "report.md", "roc_lfw.png",
                     "tpr_lfw.png"]
    assert report_sections(scored_run) == ["## Selection", "## BatchNorm statistics",
                                           "## How the BN layers see clean and noise inputs", "## lfw",
                                           "## Parity of each exported file"]
    for f in files:
        if f.endswith(".png"):
            with Image.open(f) as image:
                assert image.format == "PNG" and image.width > 400 and image.height > 200
    report = (scored_run / "report" / "report.md").read_text()
    for name in ("drift.png", "bn_outputs.png", "consistency.png", "tpr_lfw.png", "gain_lfw.png", "roc_lfw.png"):
        assert f"]({name})" in report
    assert "## Selection" in report and "## Parity of each exported file" in report
    bundle = sorted(p.name for p in (scored_run / "score" / "handoff").iterdir())
    assert bundle == ["bn_outputs.png", "centre_cosine.png", "centre_distance.png", "consistency.png", "drift.png",
                      "gain_lfw.png", "likelihood.png", "likelihood_per_snapshot.png", "model.json", "model.onnx",
                      "report.md", "roc_lfw.png", "scores.md", "tpr_lfw.png"]


def report_sections(run) -> list[str]:
    """report.md's section headings (the bench heading cut at its first space), one per line as Markdown needs."""
    lines = (run / "report" / "report.md").read_text().splitlines()
    return [line if not line.startswith("## lfw") else "## lfw" for line in lines if line.startswith("## ")]


def test_gain_plot_shows_each_snapshot_minus_the_baseline_with_its_paired_interval(scored_run):
    from bnport.report.plots import paired_gains
    from bnport.score.table import ScoreTable

    table = ScoreTable.from_dict(json.loads((scored_run / "score" / "table.json").read_text()))
    gains = dict(paired_gains(table, "lfw"))
    baseline = table.result("0000 (baseline)", "lfw")
    assert sorted(gains) == ["0001", "0002", "0003"]  # every snapshot, not the baseline itself
    for label, paired in gains.items():
        own = table.result(label, "lfw")
        assert paired["delta"] == pytest.approx(own.tpr["strict"]["1e-1"] - baseline.tpr["strict"]["1e-1"],
                                                abs=1e-12)
        assert paired["low"] <= paired["delta"] <= paired["high"] and paired["replicates"] == 20


def test_report_without_scores_draws_the_calibration_and_says_so(scored_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(scored_run, copy, ignore=shutil.ignore_patterns("score", "exports"))
    data = report_data(Run.open(copy))
    assert data.table is None and any("no score table" in n for n in data.notes)
    result = CliRunner().invoke(cli, ["report", str(copy), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "bn_outputs.png", "centre_cosine.png", "centre_distance.png", "consistency.png", "drift.png",
        "likelihood.png", "likelihood_per_snapshot.png", "report.md"]


def test_report_of_a_folder_that_is_not_a_run(tmp_path):
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "run.json is missing" in result.stderr
