"""The one model resolver: every command takes its MODEL through bnport.model.resolve (registry name, file or module
factory, TorchScript, snapshot, and for score an .onnx file), so the same spec means the same model everywhere."""
from __future__ import annotations

import json
import shutil

import onnx
import pytest
import torch
from click.testing import CliRunner

from bnport.cli import cli
from bnport.data.transforms import InputSpec
from bnport.errors import BnportError
from bnport.export.onnx_export import export_onnx
from bnport.export.settings import ExportSettings
from bnport.model.load import LoadedModel, load_model
from bnport.model.options import ModelOptions
from bnport.model.resolve import OnnxModel, open_onnx, resolve_model
from tests.helpers.benchdata import write_bin_pack
from tests.helpers.models import write_trained_weights
from tests.helpers.runs import copy_run


def test_a_model_file_imports_the_modules_beside_it(tmp_path):
    (tmp_path / "blocks.py").write_text("import torch.nn as nn\n\n\ndef stem():\n"
                                        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))\n")
    (tmp_path / "net.py").write_text("import torch.nn as nn\nfrom blocks import stem\n\n\ndef build():\n"
                                     "    return nn.Sequential(stem(), nn.Flatten())\n")
    loaded = resolve_model(f"{tmp_path / 'net.py'}:build")
    assert isinstance(loaded, LoadedModel) and isinstance(loaded.module[0][1], torch.nn.BatchNorm2d)
    result = CliRunner().invoke(cli, ["inspect", f"{tmp_path / 'net.py'}:build", "--input-size", "16x16"])
    assert result.exit_code == 0 and "0.1" in result.stdout


@pytest.fixture(scope="module")
def run_dir(shared_exact_run):
    """The shared exact run, calibrated without a weights file; read only (tests that change it copy it)."""
    return shared_exact_run / "run"


def test_a_snapshot_resolves_to_its_runs_model_with_its_state(run_dir):
    loaded = resolve_model(str(run_dir / "snapshots" / "0001.safetensors"), ModelOptions(input_size=(112, 112)))
    assert loaded.provenance["snapshot"] == "0001" and loaded.input_spec == InputSpec()
    with pytest.raises(BnportError, match="calibrated without weights, so --weights cannot apply"):
        resolve_model(str(run_dir / "snapshots" / "0001.safetensors"), ModelOptions(weights="w.pt"))
    with pytest.raises(BnportError, match=r"snapshot not found or incomplete: .*0009.safetensors \(the run in .* has "
                                          r"snapshots 0000\.\.\d{4}\)"):
        resolve_model(str(run_dir / "snapshots" / "0009.safetensors"))


def test_a_run_whose_weights_moved_says_where_it_looked_and_takes_the_new_place(shared_ema_run, tmp_path):
    root = copy_run(shared_ema_run, tmp_path / "world")  # a run made with a weights file, whose copy is moved here
    moved = (root / "w.safetensors").rename(tmp_path / "moved.safetensors")
    snapshot = str(root / "run" / "snapshots" / "0001.safetensors")
    with pytest.raises(BnportError, match=r"the run's weights file .*w.safetensors \(recorded in .*run.json\) is "
                                          r"missing \(restore it there, or give its new location with --weights"):
        resolve_model(snapshot)
    assert resolve_model(snapshot, ModelOptions(weights=moved)).provenance["snapshot"] == "0001"
    other = write_trained_weights(tmp_path / "other.safetensors", seed=1)
    with pytest.raises(BnportError, match="are not the ones the run was made with"):
        resolve_model(snapshot, ModelOptions(weights=other))


def test_a_snapshot_whose_run_json_is_gone_says_so_in_every_command(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "run.json").unlink()
    snapshot = str(copy / "snapshots" / "0001.safetensors")
    write_bin_pack(tmp_path / "lfw.bin", 4)
    for args in (["export", snapshot, "--fold-bn", "-o", str(tmp_path / "x.onnx")], ["inspect", snapshot],
                 ["score", snapshot, "--bench", str(tmp_path / "lfw.bin")]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1, args
        assert f"no run manifest: {copy / 'run.json'} is missing" in result.stderr, (args, result.stderr)
        assert "TorchScript" not in result.stderr


def test_onnx_files_are_for_score_only(tmp_path):
    with pytest.raises(BnportError, match="is an ONNX file; this command needs the PyTorch model"):
        resolve_model(str(tmp_path / "m.onnx"))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    spec = InputSpec(112, 112, mean=(120.0, 110.0, 100.0), std=(60.0, 60.0, 60.0), bgr=True)
    assert export_onnx(load_model("iresnet_tiny").module, path, ExportSettings(exporter="torchscript"), input_spec=spec,
                       device="cpu")
    return path, spec


def test_open_onnx_reads_the_spec_bnport_wrote_and_overrides_win(tiny_onnx):
    path, spec = tiny_onnx
    model = open_onnx(path)
    assert isinstance(model, OnnxModel) and model.input_spec == spec and model.spec_source == "bnport metadata"
    assert model.parity["passed"] and model.input_name == "data"
    overridden = open_onnx(path, mean=(127.5,), bgr=False)
    assert overridden.input_spec.mean == (127.5, 127.5, 127.5) and not overridden.input_spec.bgr
    assert overridden.spec_source == "bnport metadata, overridden on the command line"


def test_a_foreign_onnx_takes_its_size_from_its_input_and_refuses_a_wrong_one(tiny_onnx, tmp_path):
    model = onnx.load(str(tiny_onnx[0]))
    del model.metadata_props[:]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value, dims[3].dim_value = 112, 112
    foreign = tmp_path / "foreign.onnx"
    onnx.save(model, str(foreign))
    opened = open_onnx(foreign)
    assert opened.input_spec == InputSpec() and opened.parity is None
    assert opened.spec_source == "the file's input shape; default normalisation"
    with pytest.raises(BnportError, match=r"height 112 \(expected 96\), width 112 \(expected 96\)"):
        open_onnx(foreign, input_size=(96, 96))
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(BnportError, match="is not a readable ONNX file"):
        open_onnx(tmp_path / "bad.onnx")
    json.dumps(opened.metadata)
