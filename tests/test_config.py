"""Tests for bnport.config: the TOML config of `bnport run` (checked keys and types, paths from the config's folder,
defaults shared with the CLI) and the commented example."""
from __future__ import annotations

from pathlib import Path

import click
import pytest
import tomllib
from click.testing import CliRunner

from bnport.cli import cli
from bnport.config import SECTIONS, defaults, example_config, load_config, parse_config
from bnport.errors import BnportError

MINIMAL = {"out": "o", "model": {"spec": "iresnet_tiny"}, "calibrate": {"data": "d"}, "score": {"bench": ["a.bin"]}}


def test_defaults_are_filled_and_paths_resolved(tmp_path):
    config = parse_config(MINIMAL, base=tmp_path)
    assert config.out == tmp_path / "o"
    assert config.data == str(tmp_path / "d") and config.calibrate.mode == "ema"
    assert config.calibrate.batch_size == 32 and config.score.rule.short() == "strict:tpr@1e-4,confident"
    assert config.score.benches == (str(tmp_path / "a.bin"),)
    assert config.spec == "iresnet_tiny"  # a registry name is not a path


def test_specs_holding_paths_are_resolved_and_others_left(tmp_path):
    (tmp_path / "net.py").write_text("")
    data = {**MINIMAL, "model": {"spec": "net.py:build", "mean": [123.7, 116.3, 103.5]},
            "calibrate": {"data": "/abs/d", "noise": ["ood:other,ratio=0.1", "fractal:ratio=0.05"]},
            "score": {"bench": ["ijbc:IJBC,faceness=off", "pairs:p/pairs.csv", "/x/lfw.bin"]}}
    config = parse_config(data, base=tmp_path)
    assert config.spec == f"{tmp_path / 'net.py'}:build"
    assert config.model.mean == (123.7, 116.3, 103.5)
    assert config.data == "/abs/d"
    assert config.calibrate.noise == (f"ood:{tmp_path / 'other'},ratio=0.1", "fractal:ratio=0.05")
    assert config.score.benches == (f"ijbc:{tmp_path / 'IJBC'},faceness=off", f"pairs:{tmp_path / 'p/pairs.csv'}",
                                    "/x/lfw.bin")


@pytest.mark.parametrize("data, message", [
    ({**MINIMAL, "colour": "red"}, "unknown key 'colour'"),
    ({**MINIMAL, "calibrate": {"data": "d", "stepz": 3}}, "unknown key 'stepz' in [calibrate]"),
    ({**MINIMAL, "calibrate": {"data": "d", "steps": "3"}}, "calibrate.steps: expected an integer, got str"),
    ({**MINIMAL, "calibrate": {"data": "d", "steps": True}}, "calibrate.steps: expected an integer"),
    ({**MINIMAL, "calibrate": {"data": "d", "mode": "fast"}}, "'fast' is not one of ema, exact"),
    ({**MINIMAL, "calibrate": {"data": "d", "batch_size": 1}}, "out of range (must be at least 2)"),
    ({**MINIMAL, "score": {"bench": "a.bin", "guard": "0.1"}}, "score.guard: expected a number"),
    ({**MINIMAL, "calibrate": {"data": "d", "momentum": 0}}, "out of range (must be above 0)"),
    ({**MINIMAL, "score": {"bench": ["a.bin"], "fpr": ["1e-4"]}}, "score.fpr: expected a list of numbers"),
    ({**MINIMAL, "model": {}}, "model.spec is required"),
    ({**MINIMAL, "score": {}}, "score.bench is required"),
    ({**MINIMAL, "model": "iresnet50"}, "model must be a table"),
])
def test_bad_configs_name_the_key(tmp_path, data, message):
    with pytest.raises(BnportError, match=None) as err:
        parse_config(data, base=tmp_path)
    assert message in str(err.value)


def test_a_single_bench_string_is_a_list(tmp_path):
    assert parse_config({**MINIMAL, "score": {"bench": "a.bin"}}, base=tmp_path).score.benches == (
        str(tmp_path / "a.bin"),)


def test_load_config_errors(tmp_path):
    with pytest.raises(BnportError, match="config file not found"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nspec = 1")
    with pytest.raises(BnportError, match="is not valid TOML"):
        load_config(bad)


def test_printed_example_is_a_valid_config_with_every_key():
    text = example_config()
    config = parse_config(tomllib.loads(text), base=Path("/base"))
    assert config.spec == "iresnet50" and config.score.guard == 0.1
    for section, table in SECTIONS.items():
        for s in table:
            assert f"{s.key} = " in text, (section, s.key)


def test_print_config_from_the_cli_and_a_bad_config_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["run", "--print-config"])
    assert result.exit_code == 0 and result.stdout == example_config()
    bad = tmp_path / "run.toml"
    bad.write_text('out = "o"\n[model]\nspec = "iresnet_tiny"\nweightz = "w.pt"\n')
    result = CliRunner().invoke(cli, ["run", str(bad)])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"bnport: error: {bad}: unknown key 'weightz' in [model] (known keys there: bgr, input_size, mean, "
        "non_strict, spec, std, trust_pickle, weights, weights_key)"]
    assert CliRunner().invoke(cli, ["run"]).exit_code == 2


def test_cli_defaults_come_from_the_shared_definitions():
    """Every option of the calibrate, export and score commands that has a setting of the same name takes its
    default from bnport.config."""
    commands = {"calibrate": ["calibrate"], "export": ["export"], "score": ["score", "export"]}
    for command, sections in commands.items():
        params = {p.name: p for p in cli.commands[command].params if isinstance(p, click.Option)}
        for section in sections:
            for key, default in defaults(section).items():
                if key in params and not params[key].multiple and not isinstance(default, list):
                    assert params[key].default == default, (command, section, key)
    precision = next(p for p in cli.commands["score"].params if p.name == "precision")
    assert precision.default.split(",") == defaults("score")["precision"]  # the CLI's comma form of the list


def test_recipes_take_the_calibrate_section_and_override_its_keys(tmp_path):
    data = {**MINIMAL, "calibrate": {"data": "d", "mode": "exact", "steps": 12, "noise": ["blur:p=0.1,sigma=1-2"],
                                     "recipe": [{"name": "blur"},
                                                {"name": "ood", "noise": ["ood:other,ratio=0.05"], "steps": 8},
                                                {"name": "seq", "mode": "sequential", "data": "d2"}]}}
    given = {**data, "calibrate": {**data["calibrate"], "recipe": list(data["calibrate"]["recipe"])}}
    config = parse_config(given, base=tmp_path)
    assert given == data  # the caller's dict is left as it was
    assert [r.name for r in config.recipes] == ["blur", "ood", "seq"]
    blur, ood, seq = config.recipes
    assert blur.calibrate == config.calibrate and blur.data == str(tmp_path / "d")
    assert ood.calibrate.noise == (f"ood:{tmp_path / 'other'},ratio=0.05",) and ood.calibrate.steps == 8
    assert ood.calibrate.mode == "exact"
    assert seq.calibrate.mode == "sequential" and seq.calibrate.steps == 12 and seq.data == str(tmp_path / "d2")
    assert parse_config(MINIMAL, base=tmp_path).recipes == ()


@pytest.mark.parametrize("recipes, message", [
    ([{"noise": []}], "recipe 1 needs a unique name"),
    ([{"name": "a"}, {"name": "a"}], "recipe 2 needs a unique name"),
    ([{"name": "../up"}], "recipe 1 needs a unique name"),
    ([{"name": "a", "stepz": 3}], "recipe 'a': unknown key 'stepz' in [calibrate]"),
    ([{"name": "a", "mode": "fast"}], "recipe 'a': calibrate.mode"),
    ({"name": "a"}, "calibrate.recipe must be a list of tables"),
])
def test_bad_recipes_name_the_recipe_and_key(tmp_path, recipes, message):
    data = {**MINIMAL, "calibrate": {"data": "d", "recipe": recipes}}
    with pytest.raises(BnportError) as err:
        parse_config(data, base=tmp_path)
    assert message in str(err.value)


def test_the_printed_example_shows_recipes_that_parse_when_uncommented():
    text = example_config()
    assert "# [[calibrate.recipe]]" in text
    lines = text.splitlines()
    start = lines.index("# [[calibrate.recipe]]")
    recipe_lines = [line.removeprefix("# ") for line in lines[start:] if line.startswith(("# [[", "# name", "# noise",
                                                                                         "# mode"))][:9]
    # the recipe block sits right after [calibrate]: uncommented, it must join that section
    rest = "\n".join(lines[:start] + recipe_lines + lines[start + 9:])
    config = parse_config(tomllib.loads(rest), base=Path("/base"))
    assert [r.name for r in config.recipes] == ["blur", "noise-images", "sequential"]
    assert config.recipes[2].calibrate.mode == "sequential"
