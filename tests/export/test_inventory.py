"""`bnport inspect`: the BN inventory through the real command line (click's CliRunner on `bnport.cli.cli`)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from bnport.cli import cli
from bnport.export.inventory import inspect_model
from bnport.model.load import load_model

USER_MODELS = """
    import torch
    import torch.nn as nn

    def bn_relu_conv():
        return nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))


    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.spare = nn.BatchNorm2d(4)  # defined, never called

        def forward(self, x):
            return self.bn(self.conv(x))


    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
                x = -x
            return self.bn(self.conv(x))


    def with_spare():
        return WithSpare()


    def branchy():
        return Branchy()
"""


@pytest.fixture
def user_file(tmp_path) -> Path:
    path = tmp_path / "user_models.py"
    path.write_text(textwrap.dedent(USER_MODELS))
    return path


def invoke(*args: str):
    return CliRunner().invoke(cli, ["inspect", *args])


def test_iresnet_tiny_json_every_bn_folds():
    result = invoke("iresnet_tiny", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"] == "iresnet_tiny" and report["input_size"] == [112, 112] and report["traced"]
    assert report["bn_count"] == 19 and report["foldable"] == 19 and report["kept"] == 0
    assert len(report["layers"]) == 19
    assert {layer["action"] for layer in report["layers"]} == {"fold"}
    patterns = {layer["name"]: layer["pattern"] for layer in report["layers"]}
    assert set(patterns.values()) >= {"conv->bn", "bn->padded-conv", "bn->flatten->linear", "linear->bn1d"}
    assert patterns["layer1.0.bn1"] == "bn->padded-conv"
    assert patterns["bn2"] == "bn->flatten->linear"
    assert patterns["features"] == "linear->bn1d"
    assert patterns["layer1.0.downsample.1"] == "conv->bn"
    head = next(layer for layer in report["layers"] if layer["name"] == "bn2")
    assert head["consumer"] == "flatten" and head["kind"] == "BatchNorm2d" and head["channels"] == 64
    assert all(layer["reason"] for layer in report["layers"])


def test_text_output_has_a_table(user_file):
    result = invoke("iresnet_tiny")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "iresnet_tiny: 19 BatchNorm layers, 19 fold exactly, 0 kept"
    assert lines[1].split() == ["#", "bn", "type", "ch", "producer", "consumer", "plan", "why"]
    assert set(lines[2].replace(" ", "")) == {"-"}
    assert len(lines) == 3 + 19
    assert lines[3].split()[:4] == ["0", "bn1", "BatchNorm2d", "8"]


def test_bn_relu_conv_is_kept_with_a_reason(user_file):
    result = invoke(f"{user_file}:bn_relu_conv", "--json")
    assert result.exit_code == 0, result.output
    rows = {layer["name"]: layer for layer in json.loads(result.stdout)["layers"]}
    assert rows["0"]["action"] == "keep"
    assert "ReLU" in rows["0"]["reason"]
    assert rows["3"]["action"] == "fold" and rows["3"]["pattern"] == "conv->bn"
    text = invoke(f"{user_file}:bn_relu_conv").stdout
    row = next(line for line in text.splitlines() if line.split()[:2] == ["0", "0"])
    assert "keep" in row.split() and "ReLU" in row


def test_unused_bn_is_listed_not_a_crash(user_file):
    result = invoke(f"{user_file}:with_spare", "--json")
    assert result.exit_code == 0, result.output
    rows = {layer["name"]: layer for layer in json.loads(result.stdout)["layers"]}
    assert rows["bn"]["action"] == "fold"
    assert rows["spare"]["action"] == "keep" and rows["spare"]["reason"].startswith("not in the traced graph")
    assert rows["spare"]["producer"] is None and rows["spare"]["consumer"] is None


def test_untraceable_model_keeps_every_bn_and_says_why(user_file):
    result = invoke(f"{user_file}:branchy")
    assert result.exit_code == 0, result.output
    assert "torch.fx could not trace the model" in result.stdout
    report = json.loads(invoke(f"{user_file}:branchy", "--json").stdout)
    assert report["traced"] is False and report["trace_error"]
    assert [layer["action"] for layer in report["layers"]] == ["keep"]


def test_missing_model_file_is_one_line_exit_1(tmp_path):
    for spec in (f"{tmp_path / 'missing.py'}:build", str(tmp_path / "missing.pt"), "no_such_model"):
        result = invoke(spec)
        assert result.exit_code == 1, (spec, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bnport: error:"), (spec, result.stderr)
        assert "Traceback" not in result.output and result.stdout == ""
    assert "model file not found" in invoke(f"{tmp_path / 'missing.py'}:build").stderr


def test_input_size_option_reaches_the_plan(user_file):
    report = json.loads(invoke(f"{user_file}:bn_relu_conv", "--json", "--input-size", "64x48").stdout)
    assert report["input_size"] == [64, 48] and report["bn_count"] == 2
    # MobileFaceNet's 7x7 GDC head needs 112x112: another size is a user error, not a traceback
    result = invoke("mobilefacenet_tiny", "--input-size", "96x96")
    assert result.exit_code == 1 and result.stderr.startswith("bnport: error:")
    assert "(1, 3, 96, 96)" in result.stderr and "Traceback" not in result.output


def test_library_call_matches_the_command():
    inventory = inspect_model(load_model("iresnet_tiny"))
    assert inventory.folds == 19 and inventory.to_dict() == json.loads(invoke("iresnet_tiny", "--json").stdout)


REPVGG = """
    import torch
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv_kxk, self.bn_kxk = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            self.conv_1x1, self.bn_1x1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
            self.identity = nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(self.bn_kxk(self.conv_kxk(x)) + self.bn_1x1(self.conv_1x1(x)) + self.identity(x))

    def repvgg():
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Block(4), Block(4))
"""


def test_identity_branch_merges_are_named(tmp_path):
    path = tmp_path / "repvgg.py"
    path.write_text(textwrap.dedent(REPVGG))
    result = invoke(f"{path}:repvgg", "--input-size", "16x16")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"{path}:repvgg: 6 BatchNorm layers, 6 fold exactly, 0 kept"
    assert result.stdout.splitlines()[-1] == ("identity-branch BNs merged into a sibling conv (RepVGG re-"
                                              "parameterisation): 1.identity -> 1.conv_1x1, 2.identity -> 2.conv_1x1")
    report = json.loads(invoke(f"{path}:repvgg", "--input-size", "16x16", "--json").stdout)
    assert report["identity_merges"] == {"1.identity": "1.conv_1x1", "2.identity": "2.conv_1x1"}
    rows = {layer["name"]: layer for layer in report["layers"]}
    assert rows["1.identity"]["pattern"] == "bn-identity->conv" and "1.conv_1x1" in rows["1.identity"]["reason"]
