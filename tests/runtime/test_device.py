"""Library calls under a device that copies on every move (tests/helpers/devicemoves.py), as a GPU does: each call must
work, and leave the caller's module as it found it (device and tensors, no inference tensors, train/eval flags,
requires_grad). Before the fix these failed on the CPU with the GPU's own messages ("Inplace update to inference
tensor outside InferenceMode", "Inference tensors cannot be saved for backward")."""
from __future__ import annotations

import json

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bnport.data.transforms import InputSpec
from bnport.export.onnx_export import export_onnx
from bnport.export.parity import ParityReference, build_parity_inputs
from bnport.export.settings import ExportSettings
from bnport.model.arch import create_model
from bnport.model.snapshot import apply_bn_state, bn_state
from tests.helpers.benchdata import write_bin_pack
from tests.helpers.devicemoves import copying_moves, module_state
from tests.helpers.images import write_images
from tests.helpers.models import realistic_bn, write_trained_weights
from tests.helpers.pipeline import pipeline_config, write_pipeline_inputs
from tests.helpers.runs import copy_run


def _caller_module() -> torch.nn.Module:
    """A tiny IResNet as a caller may hold it: one BN left in train mode, one parameter frozen."""
    model = realistic_bn(create_model("iresnet_tiny"))
    model.bn1.train()
    model.fc.weight.requires_grad_(False)
    return model


def test_the_simulated_device_copies_on_every_move():
    t = torch.ones(3)
    module = torch.nn.Linear(2, 2)
    weight = module.weight
    with copying_moves():
        assert t.to("cpu") is not t and torch.equal(t.to("cpu"), t)
        assert t.to(torch.float32) is t  # a dtype that is already right is no move
        module.to("cpu")
        assert copying_moves.count >= 3
    assert t.to("cpu") is t
    assert module.weight is weight  # Module.to keeps the Parameter object, as on a GPU; its data is new


@pytest.mark.parametrize("moves", ["cpu", "simulated device"])
def test_copy_on_copies_each_tensor_once_and_keeps_flags_and_ties(moves):
    from bnport.runtime.device import copy_on

    model = _caller_module()
    model.tied = torch.nn.Linear(4, 4)
    model.tied2 = torch.nn.Linear(4, 4)
    model.tied2.weight = model.tied.weight  # one parameter at two places stays one parameter in the copy
    before = module_state(model)
    unique = {id(t) for t in (*model.parameters(), *model.buffers())}
    with copying_moves() if moves == "simulated device" else _nothing():
        copy = copy_on(model, "cpu")
        copies = copying_moves.count
    if moves == "simulated device":
        assert copies == len(unique)  # every tensor moved once, straight to the device: no host clone first
    assert module_state(model) == before
    for (name, p), (_, q) in zip(model.named_parameters(), copy.named_parameters()):
        assert q.data_ptr() != p.data_ptr() and q.requires_grad == p.requires_grad, name
        assert q.dtype == p.dtype and torch.equal(q, p)
    assert copy.tied2.weight is copy.tied.weight and copy.tied.weight is not model.tied.weight
    assert copy.bn1.num_batches_tracked.dtype == torch.long  # integer buffers keep their dtype
    assert copy.bn1.training and not copy.fc.weight.requires_grad
    with torch.no_grad():
        copy.bn1.running_mean.add_(1.0)
    assert not torch.equal(copy.bn1.running_mean, model.bn1.running_mean)
    wide = copy_on(model, "cpu", torch.float64)  # a dtype applies to floating tensors only
    assert wide.fc.weight.dtype == torch.float64 and wide.bn1.num_batches_tracked.dtype == torch.long
    assert torch.equal(wide.fc.weight, model.fc.weight.double())


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_parity_reference_leaves_the_callers_module_as_it_was():
    model = _caller_module()
    before = module_state(model)
    inputs, counts = build_parity_inputs(InputSpec(), n_gaussian=2, constants=(128,), n_uniform=1)
    with copying_moves():
        reference = ParityReference(model, inputs, counts=counts)
        reference.outputs("cpu")
        exact, note = reference.exact_outputs("cpu")
        assert exact is not None, note
        assert module_state(model) == before
        apply_bn_state(model, bn_state(model))  # an in-place update, as the next snapshot of a run makes
        with torch.no_grad():
            model.bn1.running_mean.add_(0.0)


def test_export_twice_on_one_module_leaves_it_exportable(tmp_path):
    model = _caller_module()
    before = module_state(model)
    with copying_moves():
        for name in ("a", "b"):
            report = export_onnx(model, tmp_path / f"{name}.onnx", device="cpu")
            assert report, str(report)
            assert module_state(model) == before
    assert report.exporter == "dynamo"


def test_calibrate_leaves_the_callers_module_as_it_was(tmp_path):
    from bnport.calibrate.engine import calibrate
    from bnport.calibrate.settings import CalibrationSettings
    from bnport.model.load import load_model

    write_images(tmp_path / "calib", 8)
    loaded = load_model("iresnet_tiny", weights=write_trained_weights(tmp_path / "w.safetensors"))
    loaded.module.fc.weight.requires_grad_(False)
    before = module_state(loaded.module)
    with copying_moves():
        result = calibrate(loaded, tmp_path / "calib", tmp_path / "run",
                           CalibrationSettings(mode="exact", batch_size=4, epochs=1, workers=0), device="cpu",
                           progress=False, log=lambda m: None)
    assert result.snapshots == [0, 1, 2]
    assert module_state(loaded.module) == before


def test_score_of_a_run_exports_every_snapshot_reusing_the_graph(shared_ema_run, tmp_path):
    from bnport.score import ScoreSettings, score

    root = copy_run(shared_ema_run, tmp_path / "world")  # snapshots 0000 to 0003; scoring writes into the run
    write_bin_pack(tmp_path / "lfw.bin", 12)
    with copying_moves():
        result = score([str(root / "run")],
                       ScoreSettings.of([str(tmp_path / "lfw.bin")], fprs="1e-1", cache_dir=tmp_path / "cache"),
                       device="cpu", export=ExportSettings(exporter="torchscript"), progress=False,
                       log=lambda m: None)
    hows = [c.how for c in result.candidates]
    assert len(hows) == 4 and all(c.passed for c in result.candidates), [c.failure for c in result.candidates]
    assert hows[0] == "full export" and set(hows[1:]) == {"graph reused"}
    assert result.handoff is not None


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_both_precision_gates_run_under_copying_moves(tmp_path, precision):
    from bnport.export.precision import make_precision

    model = realistic_bn(create_model("iresnet_tiny"))
    assert export_onnx(model, tmp_path / "m.onnx", ExportSettings(exporter="torchscript"), device="cpu")
    images, _ = build_parity_inputs(InputSpec(), n_gaussian=24, constants=(), n_uniform=0, seed=3)
    with copying_moves():
        result = make_precision(tmp_path / "m.onnx", precision, calibration_images=images[:16],
                                parity_images=images[16:], device="cpu", min_cos=0.5)
    assert result.passed, str(result)


CALIBRATE = """
noise = ["fractal:ratio=0.2"]
mode = "exact"
batch_size = 4
steps = 2
snapshot_every = 1
workers = 0
"""


RECIPES = """
[[calibrate.recipe]]
name = "exact"

[[calibrate.recipe]]
name = "sequential"
mode = "sequential"
"""


@pytest.mark.parametrize("recipes", ["", RECIPES], ids=["one run", "two recipes"])
def test_bnport_run_goes_through_under_copying_moves(tmp_path: Path, recipes: str):
    """With recipes, one loaded model goes through every calibration (exact and sequential) and the exports of
    every run: a device move made inside inference_mode would leave inference tensors that the next recipe trips
    over."""
    from bnport.cli import cli

    write_pipeline_inputs(tmp_path, images=12, pairs=12)
    (tmp_path / "run.toml").write_text(pipeline_config("out", CALIBRATE + recipes, fpr="[1e-1]"))
    with copying_moves():
        result = CliRunner().invoke(cli, ["run", str(tmp_path / "run.toml")])
    assert result.exit_code == 0, result.output + str(result.exception)
    assert copying_moves.count > 0  # the moves really copied
    assert (tmp_path / "out" / "score" / "handoff" / "model.onnx").is_file()
    assert np.load(tmp_path / "out" / "score" / "scores" / "lfw.labels.npy").size == 12
    table = json.loads((tmp_path / "out" / "score" / "table.json").read_text())
    assert {m["recipe"] for m in table["models"]} == ({None, "exact", "sequential"} if recipes else {None})
