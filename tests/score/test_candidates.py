"""Tests for bnport.score.candidates with several runs: the snapshots of several runs of one model (recipes) share
one baseline that keeps its plain name, are labelled RUNNAME/NNNN and carry their run's name as `recipe`; two whole
runs keep a baseline each."""
from __future__ import annotations

import numpy as np

from bnport.export.settings import ExportSettings
from bnport.score import ScoreSettings, score
from tests.helpers.benchdata import write_bin_pack
from tests.helpers.runs import copy_run


def _score(targets: list, tmp_path, out: str):
    settings = ScoreSettings.of([str(tmp_path / "lfw.bin")], cache_dir=tmp_path / "cache", fprs="1e-1",
                                select="tpr@1e-1", handoff=False)
    return score([str(t) for t in targets], settings, device="cpu", export=ExportSettings(exporter="torchscript"),
                 out=tmp_path / out, progress=False, log=lambda m: None)


def test_runs_of_one_model_share_the_baseline_and_name_their_run(shared_ema_run, tmp_path):
    runs = {}
    for name in ("blur", "fractal"):  # two copies of one run, under the names a recipe comparison gives them
        copy_run(shared_ema_run, tmp_path / name)
        runs[name] = (tmp_path / name / "run").rename(tmp_path / name / name)
    write_bin_pack(tmp_path / "lfw.bin", 30)
    later = sorted(p for p in (runs["fractal"] / "snapshots").glob("[0-9][0-9][0-9][0-9].safetensors")
                   if p.stem != "0000")
    result = _score([runs["blur"], *later], tmp_path, "shared")
    models = result.table.models
    assert [m["label"] for m in models] == ["0000 (baseline)", "blur/0001", "blur/0002", "blur/0003",
                                            "fractal/0001", "fractal/0002", "fractal/0003"]
    assert [m["recipe"] for m in models] == [None, "blur", "blur", "blur", "fractal", "fractal", "fractal"]
    assert result.selection.baseline == "0000 (baseline)"
    scores = {r.model: np.load(r.scores_file) for r in result.table.results}
    for k in (1, 2, 3):  # the same snapshot in two folders: the same scores, computed twice
        np.testing.assert_allclose(scores[f"blur/000{k}"], scores[f"fractal/000{k}"], rtol=0, atol=1e-6)
    both = _score([runs["blur"], runs["fractal"]], tmp_path, "two")
    labels = [m["label"] for m in both.table.models]
    assert labels[0] == "blur/0000 (baseline)" and "fractal/0000 (baseline)" in labels  # a baseline each
