"""Tests for `bnport run` with several calibration recipes ([[calibrate.recipe]]): one run folder per recipe, every
snapshot of every recipe and the shared baseline in one table with a recipe column, one selection across them, a
bundle and scores.md that name the recipe, a report across recipes, and resuming per recipe after a kill -9."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bnport.cli import cli
from tests.helpers.pipeline import assert_same_scores, pipeline_config, write_pipeline_inputs
from tests.helpers.processes import bnport, kill_when

CALIBRATE = """
mode = "exact"
batch_size = 4
steps = 40
snapshot_every = 8
workers = 0

[[calibrate.recipe]]
name = "blur"
noise = ["blur:p=0.3,sigma=1-2"]

[[calibrate.recipe]]
name = "fractal"
noise = ["fractal:ratio=0.25"]

[[calibrate.recipe]]
name = "seq"
mode = "sequential"
steps = 6
"""
RECIPES = ["blur", "fractal", "seq"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_pipeline_inputs(tmp_path_factory.mktemp("recipes"))


def _config(root: Path, out: str) -> Path:
    path = root / f"{out}.toml"
    path.write_text(pipeline_config(out, CALIBRATE))
    return path


@pytest.fixture(scope="module")
def whole(inputs):
    """The three recipes run once, uninterrupted: (out folder, the CLI's result)."""
    result = CliRunner().invoke(cli, ["run", str(_config(inputs, "whole"))])
    assert result.exit_code == 0, result.output
    return inputs / "whole", result


def test_one_table_with_every_recipe_and_the_shared_baseline(whole):
    out, result = whole
    for name in RECIPES:
        assert json.loads((out / "recipes" / name / "run.json").read_text())["status"] == "complete"
    assert not (out / "run.json").exists()
    table = json.loads((out / "score" / "table.json").read_text())
    labels = [m["label"] for m in table["models"]]
    expected = ["0000 (baseline)"] + [f"{r}/{i:04d}" for r in ("blur", "fractal") for i in range(1, 6)] + ["seq/0001"]
    assert labels == expected  # one baseline, shared: the other recipes' 0000 are the same model
    assert [m["recipe"] for m in table["models"]] == [None] + ["blur"] * 5 + ["fractal"] * 5 + ["seq"]
    assert {r["model"] for r in table["results"]} == set(labels)
    header = next(line for line in result.stdout.splitlines() if line.startswith("model"))
    assert header.split()[:3] == ["model", "recipe", "parity"] and "BN consistency" in header
    assert result.stderr.count("decoded ") == 1  # the benchmark is decoded once for every recipe


def test_the_consistency_column_is_each_snapshots_held_out_figure(whole):
    out, result = whole
    table = json.loads((out / "score" / "table.json").read_text())
    for model in table["models"]:
        run = Path(model["run"])
        figure = json.loads((run / "snapshots" / f"{model['snapshot']}.json").read_text())["consistency"]["held_out"]
        assert model["consistency"]["worst"] == figure["worst"]
        row = next(line for line in result.stdout.splitlines() if line.startswith(model["label"] + " "))
        assert f"{figure['worst']:.1e}" in row.split()
    assert len({m["consistency"]["worst"] for m in table["models"]}) == len(table["models"])


def test_one_selection_across_recipes_and_a_bundle_that_names_the_recipe(whole):
    out, result = whole
    table = json.loads((out / "score" / "table.json").read_text())
    selection = table["selection"]
    values = selection["values"]
    best = max(values.values())
    assert values[selection["selected"]] == best  # ties go to the earlier model, across recipes too
    assert selection["selected"] == next(label for label in values if values[label] == best)
    card = json.loads((out / "score" / "handoff" / "model.json").read_text())
    chosen = next(m for m in table["models"] if m["label"] == selection["final"])
    assert card["model"]["label"] == chosen["label"] and card["provenance"]["recipe"] == chosen["recipe"]
    if chosen["recipe"]:
        assert card["provenance"]["run"] == str((out / "recipes" / chosen["recipe"]).resolve())
    outcome = card["recipes"]
    assert outcome[0].startswith("recipes compared by") and any(line.startswith("outcome:") for line in outcome)
    for name in RECIPES:
        mine = {m["label"]: values[m["label"]] for m in table["models"] if m["recipe"] == name}
        top = max(mine, key=mine.get)
        assert any(line.startswith(f"recipe {name}: best {top} {100 * mine[top]:.2f} (") for line in outcome)
    scores_md = (out / "score" / "handoff" / "scores.md").read_text()
    assert "## Recipes" in scores_md and "| recipe |" in scores_md.replace("  ", " ")
    assert "outcome:" in result.stdout


def test_the_report_compares_recipes(whole):
    out, _ = whole
    report = out / "report"
    for name in ("recipes_metric.png", "recipes_drift.png", "consistency.png", "drift.png", "report.md"):
        assert (report / name).stat().st_size > 0, name
        assert (out / "score" / "handoff" / name).is_file(), name
    text = (report / "report.md").read_text()
    assert "## Recipes" in text and "Recipes compared: blur, fractal, seq" in text
    again = CliRunner().invoke(cli, ["report", str(out), "--out", str(out / "report2")])
    assert again.exit_code == 0, again.output
    assert (out / "report2" / "recipes_metric.png").is_file()


def test_the_report_data_holds_each_recipes_drift_and_consistency(whole):
    from bnport.pipeline import report_runs
    from bnport.report.data import report_data

    run, recipes = report_runs(whole[0])
    assert [r.path.name for r in recipes] == RECIPES
    data = report_data(run, score_dir=whole[0] / "score", recipes=recipes, analysis_images=4)
    assert list(data.recipes) == RECIPES
    for name, drift in data.recipes.items():
        snaps = [s for s in recipes[RECIPES.index(name)].snapshots() if s.index > 0]
        assert drift.snapshots == [s.id for s in snaps]
        meta = snaps[-1].meta()["drift"]
        np.testing.assert_allclose(drift.mean[-1], [meta[layer]["running_mean"] for layer in drift.layers])
    assert data.consistency.labels[0] == "0000 (baseline)"
    for name in RECIPES:
        assert any(label.startswith(f"{name}/") for label in data.consistency.labels)


def test_a_rerun_redoes_nothing_and_a_kill_resumes_the_recipe_it_stopped_in(inputs, whole):
    again = CliRunner().invoke(cli, ["run", str(_config(inputs, "whole"))])
    assert again.exit_code == 0
    for name in RECIPES:
        assert f"calibration ({name}): {inputs / 'whole' / 'recipes' / name} is complete" in again.stderr
    config = _config(inputs, "killed")
    # killed inside the second recipe's calibration, the first complete and the third not begun
    kill_when(inputs / "killed" / "recipes" / "fractal" / "snapshots" / "0002.json", "run", str(config))
    recipes = inputs / "killed" / "recipes"
    assert json.loads((recipes / "blur" / "run.json").read_text())["status"] == "complete"
    assert json.loads((recipes / "fractal" / "run.json").read_text())["status"] == "running"
    assert not (recipes / "seq").exists() and not (inputs / "killed" / "score").exists()
    resumed = bnport("run", str(config))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"calibration (blur): {recipes / 'blur'} is complete" in resumed.stderr
    assert f"calibration (fractal): resuming the run in {recipes / 'fractal'}" in resumed.stderr
    assert_same_scores(inputs / "killed" / "score", inputs / "whole" / "score")


def test_a_single_run_folder_and_a_recipe_folder_are_not_mixed(inputs, whole):
    single = inputs / "single.toml"
    single.write_text(pipeline_config("whole", CALIBRATE[:CALIBRATE.index("[[calibrate.recipe]]")]))
    result = CliRunner().invoke(cli, ["run", str(single)])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "holds a recipe comparison (recipes/), and this config has no recipe" in result.stderr
    (inputs / "one").mkdir()
    (inputs / "one" / "run.json").write_text("{}")
    result = CliRunner().invoke(cli, ["run", str(_config(inputs, "one"))])
    assert result.exit_code == 1 and "holds a single run, and this config compares recipes" in result.stderr
    assert not (inputs / "one" / "recipes").exists()


def test_a_recipe_dropped_from_the_config_leaves_the_table_and_the_report(inputs, whole):
    out, _ = whole
    two = CALIBRATE[:CALIBRATE.index('[[calibrate.recipe]]\nname = "seq"')]
    (inputs / "two.toml").write_text(pipeline_config("whole", two))
    result = CliRunner().invoke(cli, ["run", str(inputs / "two.toml")])
    assert result.exit_code == 0, result.output
    assert "calibration (seq)" not in result.stderr and (out / "recipes" / "seq").is_dir()  # kept, not scored
    table = json.loads((out / "score" / "table.json").read_text())
    assert {m["recipe"] for m in table["models"]} == {None, "blur", "fractal"}
    assert "Recipes compared: blur, fractal;" in (out / "report" / "report.md").read_text()


def test_a_later_recipes_missing_noise_images_stop_the_run_before_any_calibration(inputs):
    late = CALIBRATE + '\n[[calibrate.recipe]]\nname = "ood"\nnoise = ["ood:no_such_folder,ratio=0.1"]\n'
    (inputs / "late.toml").write_text(pipeline_config("late", late))
    result = CliRunner().invoke(cli, ["run", str(inputs / "late.toml")])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "recipe 'ood': bad noise spec" in result.stderr and "no_such_folder does not exist" in result.stderr
    assert not (inputs / "late").exists()  # not even the first recipe began
    elsewhere = CALIBRATE + '\n[[calibrate.recipe]]\nname = "other-data"\ndata = "nowhere"\n'
    (inputs / "late.toml").write_text(pipeline_config("late", elsewhere))
    result = CliRunner().invoke(cli, ["run", str(inputs / "late.toml")])
    assert result.exit_code == 1 and f"recipe 'other-data': data path not found: {inputs / 'nowhere'}" in result.stderr
    assert not (inputs / "late").exists()
