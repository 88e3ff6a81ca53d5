"""Tests for bnport.export.onnx_export and `bnport export`: what lands on disk (or does not), the metadata (the parity
bound that decided, noise-only parity inputs), the exporter fallback, snapshots, a verdict that does not depend on the
thread count, and the coverage promise over face, torchvision and timm architectures with randomised BN statistics.

Peer BN counts (TorchScript exporter + onnxsim, dynamo exporter, torch.fx `fuse`) take minutes to produce, so they
come from the golden file tests/fixtures/peer_bn_counts.json, written by tests/benchmarks/peer_bn_counts.py; the live
comparison runs in tests/benchmarks/bench_export.py.
"""
from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torchvision
from click.testing import CliRunner
from safetensors.torch import load_file

import bnport.export.fold_torch
from bnport.calibrate.engine import calibrate
from bnport.calibrate.settings import CalibrationSettings
from bnport.cli import cli
from bnport.data.transforms import InputSpec
from bnport.errors import BnportError
from bnport.export.fold_onnx import count_bn_nodes
from bnport.export.onnx_export import NOISE_ONLY_WARNING, export_model, export_onnx
from bnport.export.settings import ExportSettings
from bnport.model.arch import create_model
from bnport.model.load import load_model
from bnport.model.options import ModelOptions
from bnport.runtime.sessions import create_session
from tests.helpers.models import realistic_bn
from tests.helpers.paths import FIXTURES
from tests.helpers.zoo import TinyLevit, TinyMixNet, TinyRepVgg, offset_kept_model, register_norm_act

GOLDEN = json.loads((FIXTURES / "peer_bn_counts.json").read_text())["models"]
IMAGENET_64 = InputSpec(64, 64, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    return realistic_bn(create_model("iresnet_tiny"))


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _torch(module: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return module(x).numpy()


def test_export_writes_a_verified_file_with_metadata(tiny, tmp_path):
    out = tmp_path / "tiny.onnx"
    report = export_onnx(tiny, out, ExportSettings(exporter="torchscript"), device="cpu",
                         metadata={"source": "iresnet_tiny", "weights_sha256": "ab" * 32})
    assert report and report.passed and report.output == str(out)
    model = onnx.load(out)
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["data"] and len(model.graph.output) == 1
    assert _dims(model.graph.input[0]) == ["batch", 3, 112, 112]
    assert _dims(model.graph.output[0])[0] == "batch"
    assert count_bn_nodes(model) == 0 == report.bn_onnx
    assert report.bn_before == 19 and report.bn_torch_after == 0 and report.simplified

    props = {p.key: p.value for p in model.metadata_props}
    assert props["bnport_version"] and props["source"] == "iresnet_tiny" and props["weights_sha256"] == "ab" * 32
    assert InputSpec.from_dict(json.loads(props["input_spec"])) == InputSpec()
    parity = json.loads(props["parity"])
    assert parity["passed"] and parity["max_abs"] == report.parity.max_abs
    assert parity["session_settings"]["use"] == "parity gate"  # on CUDA: TF32 off, heuristic cuDNN search
    assert json.loads(props["fold"])["bn_onnx"] == 0
    assert report.sha256 and len(report.sha256) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"], "no temp or rejected files left"
    assert (out.stat().st_mode & 0o777) != 0o600

    session = create_session(out, device="cpu")
    for batch in (1, 5):
        x = torch.randn(batch, 3, 112, 112)
        np.testing.assert_allclose(session.run(x.numpy()), _torch(tiny, x), rtol=0, atol=1e-4)
    text = str(report)
    for needle in ("wrote", "torchscript (as asked)", "parity PASS", "onnxruntime providers",
                   "19 in the model, 0 left after the PyTorch fold, 0 BatchNormalization nodes in the file"):
        assert needle in text
    json.dumps(report.to_dict(), default=str)


def test_static_batch_and_no_simplify(tiny, tmp_path):
    report = export_onnx(tiny, tmp_path / "static.onnx",
                         ExportSettings(exporter="torchscript", static_batch=True, simplify=False), device="cpu")
    assert report and not report.simplified and report.parity.batch_sizes == [1]
    model = onnx.load(tmp_path / "static.onnx")
    assert _dims(model.graph.input[0]) == [1, 3, 112, 112]


def test_auto_uses_dynamo_when_it_works(tiny, tmp_path):
    report = export_onnx(tiny, tmp_path / "dyn.onnx", ExportSettings(exporter="auto"), device="cpu")
    assert report and report.exporter == "dynamo" and [a.exporter for a in report.attempts] == ["dynamo"]
    assert "dynamo (the default)" in report.exporter_note
    assert report.bn_onnx == 0


class DataDependent(nn.Module):
    """torch.export cannot guard on a tensor value and torch.fx cannot trace it; TorchScript tracing can."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > -1e30:
            y = torch.relu(y)
        return y.mean((2, 3))


def test_auto_falls_back_to_torchscript_and_the_onnx_pass_folds_what_torch_could_not(tmp_path):
    spec = InputSpec(16, 16)
    model = realistic_bn(DataDependent(), size=(16, 16))
    report = export_onnx(model, tmp_path / "dd.onnx", ExportSettings(exporter="auto"), input_spec=spec, device="cpu")
    assert report and report.exporter == "torchscript"
    assert [(a.exporter, a.ok) for a in report.attempts] == [("dynamo", False), ("torchscript", True)]
    assert "because dynamo failed to export" in report.exporter_note
    assert "export failed" in report.attempts[0].note
    # torch.fx could not trace it, so PyTorch kept the BN; the ONNX pass folded it
    assert report.bn_torch_after == 1 and report.bn_onnx == 0
    assert "trace" in report.remaining[0].reason and report.remaining[0].where == "pytorch"


def _break_one_fold(monkeypatch):
    """Fault injection: a fold that gets one conv's output channel 1% wrong."""
    real = bnport.export.fold_torch.fold_bn

    def wrong(model, **kwargs):
        folded = real(model, **kwargs)
        conv = next(m for m in folded.modules() if isinstance(m, nn.Conv2d))
        with torch.no_grad():
            conv.weight[0] *= 1.01
        return folded

    monkeypatch.setattr(bnport.export.fold_torch, "fold_bn", wrong)


def test_failing_parity_writes_no_file_only_a_rejected_one(tiny, tmp_path, monkeypatch):
    _break_one_fold(monkeypatch)
    out = tmp_path / "bad.onnx"
    report = export_onnx(tiny, out, ExportSettings(exporter="torchscript"), device="cpu")
    assert not report and report.output is None
    assert not out.exists()
    rejected = tmp_path / "bad.onnx.rejected"
    assert report.rejected == str(rejected) and rejected.is_file()
    saved = json.loads((tmp_path / "bad.onnx.rejected.json").read_text())
    assert saved["passed"] is False and saved["parity"]["failures"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx.rejected", "bad.onnx.rejected.json"]
    assert "export FAILED" in str(report) and "parity FAIL" in str(report)


def test_cli_export_json_and_failure_exit_status(tiny, tmp_path, monkeypatch):
    runner = CliRunner()
    out = tmp_path / "cli.onnx"
    weights = tmp_path / "backbone.pth"
    torch.save(tiny.state_dict(), weights)
    result = runner.invoke(cli, ["export", "iresnet_tiny", "--weights", str(weights), "--fold-bn", "-o", str(out),
                                 "--exporter", "torchscript", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and report["bn_onnx"] == 0 and report["parity"]["providers"] == ["CPUExecutionProvider"]
    # a plain MODEL without --parity-data is checked on noise alone: one warning line on stderr, and the card says it
    assert result.stderr.splitlines() == [f"bnport: warning: {NOISE_ONLY_WARNING}"]
    assert report["parity_inputs"] == "noise only" and report["parity"]["noise_only"]
    props = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert props["parity_inputs"] == "noise only"
    assert props["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert props["source"] == "iresnet_tiny" and len(props["source_sha256"]) == 64
    x = torch.randn(2, 3, 112, 112)
    got = create_session(out, device="cpu").run(x.numpy())
    np.testing.assert_allclose(got, _torch(tiny, x), rtol=0, atol=1e-4 * np.abs(got).max())

    _break_one_fold(monkeypatch)
    bad = tmp_path / "bad.onnx"
    args = ["export", "iresnet_tiny", "--fold-bn", "-o", str(bad), "--exporter", "torchscript", "--device", "cpu"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 1 and "export FAILED" in result.output
    assert not bad.exists() and (tmp_path / "bad.onnx.rejected.json").is_file()
    # the tolerances are the user's to loosen: wide enough, the same broken fold passes and the file is written
    result = runner.invoke(cli, [*args, "--atol", "1", "--rtol", "1", "--min-cos", "0.9"])
    assert result.exit_code == 0 and bad.is_file() and not (tmp_path / "bad.onnx.rejected.json").exists()


def test_cli_user_errors_are_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["export", "iresnet_tiny", "-o", str(tmp_path / "x.txt"), "--device", "cpu"])
    assert result.exit_code == 1 and "does not end in .onnx" in result.output and "Traceback" not in result.output
    from bnport.runtime.sessions import cuda_status

    if not cuda_status()[0]:
        result = runner.invoke(cli, ["export", "iresnet_tiny", "-o", str(tmp_path / "x.onnx"), "--device", "cuda"])
        assert result.exit_code == 1
        assert "CUDA was requested but onnxruntime could not use it" in result.output
        assert not (tmp_path / "x.onnx").exists()


def test_snapshot_export_applies_the_snapshot_and_uses_the_run_data(image_folder, tmp_path):
    loaded = load_model("iresnet_tiny")
    run = tmp_path / "run"
    calibrate(loaded, image_folder, run, CalibrationSettings(mode="exact", batch_size=8, epochs=1, workers=0),
              progress=False, log=lambda m: None)
    snapshot = max((run / "snapshots").glob("[0-9][0-9][0-9][0-9].safetensors"))
    out = tmp_path / "snap.onnx"
    warnings_seen: list[str] = []
    report = export_model(str(snapshot), out, settings=ExportSettings(exporter="torchscript"), device="cpu",
                          warn=warnings_seen.append)
    assert report, str(report)
    assert report.parity.inputs["real"] == 16  # the run's calibration images, capped at 16
    assert report.parity_inputs == "real images and noise" and warnings_seen == []

    props = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert props["snapshot_id"] == snapshot.stem.lstrip("0") or props["snapshot_id"] == snapshot.stem
    assert props["parity_inputs"] == "real images and noise"
    assert json.loads(props["calibration"])["data"] == str(image_folder)

    # independent check: the base model with the snapshot's BN buffers loaded by hand
    base = load_model("iresnet_tiny").module
    calibrated = load_model("iresnet_tiny").module
    calibrated.load_state_dict(load_file(str(snapshot)), strict=False)
    calibrated.eval()
    x = torch.randn(3, 3, 112, 112)
    got = create_session(out, device="cpu").run(x.numpy())
    want = _torch(calibrated, x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    assert np.abs(got - _torch(base, x)).max() > 1e-2 * np.abs(want).max(), "the snapshot must change the model"
    # --weights with a snapshot says where the run's weights are now: another file is refused by its sha256
    with pytest.raises(BnportError, match="are not the ones the run was made with|calibrated without weights"):
        export_model(str(snapshot), tmp_path / "x.onnx", options=ModelOptions(weights=str(snapshot)))


FACE = ["iresnet18", "iresnet50", "iresnet100", "mobilefacenet"]
TORCHVISION = ["resnet50", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "shufflenet_v2_x1_0",
               "mnasnet1_0", "googlenet", "densenet121"]


@pytest.mark.slow
@pytest.mark.parametrize("name", FACE)
def test_face_models_fold_every_bn_and_pass_parity(name, tmp_path):
    torch.manual_seed(0)
    model = realistic_bn(create_model(name))
    # dynamo on one real architecture keeps the default path covered; TorchScript is faster for the rest
    report = export_onnx(model, tmp_path / f"{name}.onnx",
                         ExportSettings(exporter="auto" if name == "iresnet18" else "torchscript"), device="cpu")
    assert report, str(report)
    # every peer leaves the BNs in front of IResNet's zero-padded convs (best peer: 9, 25 and 50 of them)
    assert report.bn_before == GOLDEN[name]["bn_modules"]
    assert report.bn_onnx == 0 and report.remaining == []


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_models_pass_parity_and_leave_no_more_bn_than_peers(name, tmp_path):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None)
    model = realistic_bn(model, size=(64, 64))
    report = export_onnx(model, tmp_path / f"{name}.onnx", ExportSettings(exporter="torchscript"),
                         input_spec=IMAGENET_64, device="cpu")
    assert report, str(report)
    assert report.bn_onnx <= GOLDEN[f"torchvision:{name}"]["best_peer"], str(report)
    if name == "densenet121":
        # only its pre-activation BNs (BN -> ReLU -> conv, and the final BN -> ReLU -> pool) stay
        assert report.bn_onnx == len([r for r in report.remaining if r.where == "onnx"])
        assert all("output feeds Relu" in r.reason for r in report.remaining if r.where == "onnx")


def test_requested_opset_is_honoured_or_the_exporter_is_skipped(tmp_path):
    out = tmp_path / "op11.onnx"
    report = export_model("iresnet_tiny", out, settings=ExportSettings(opset=11), device="cpu")
    assert report and report.exporter == "torchscript"  # dynamo writes opset >= 18, so auto moves on
    assert "requested 11" in " ".join(a.note for a in report.attempts)
    assert next(o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")) == 11


def test_snapshot_whose_calibration_data_is_gone_asks_for_parity_data(tmp_path):
    from tests.helpers.images import write_images

    data = tmp_path / "faces"
    write_images(data, 8)
    calibrate(load_model("iresnet_tiny"), data, tmp_path / "run", CalibrationSettings(batch_size=4, workers=0),
              progress=False, log=lambda m: None)
    data.rename(tmp_path / "moved")
    with pytest.raises(BnportError, match="calibration data .* is gone") as err:
        export_model(str(tmp_path / "run/snapshots/0001.safetensors"), tmp_path / "m.onnx", device="cpu")
    assert "--parity-data" in str(err.value)
    assert not (tmp_path / "m.onnx").exists()
    report = export_model(str(tmp_path / "run/snapshots/0001.safetensors"), tmp_path / "m.onnx",
                          settings=ExportSettings(exporter="torchscript", parity_data=str(tmp_path / "moved")),
                          device="cpu")
    assert report and (tmp_path / "m.onnx").is_file()


# --- issue 9 -------------------------------------------------------------------------------------------------------

ZOO_SPEC = InputSpec(16, 16)


@pytest.mark.parametrize("build, n_bn", [(TinyMixNet, 2), (TinyLevit, 4), (TinyRepVgg, 7)],
                         ids=["norm+act, concat(convs)", "LinearNorm, NormLinear", "identity branches"])
def test_zoo_patterns_export_with_no_bn_left(build, n_bn, tmp_path, monkeypatch):
    register_norm_act(monkeypatch)
    torch.manual_seed(0)
    model = realistic_bn(build(), size=(16, 16))
    report = export_onnx(model, tmp_path / "zoo.onnx", ExportSettings(exporter="torchscript"), input_spec=ZOO_SPEC,
                         device="cpu")
    assert report, str(report)
    assert report.bn_before == n_bn and report.bn_torch_after == 0 and report.bn_onnx == 0
    assert report.remaining == []


def test_thread_count_does_not_change_the_verdict(tmp_path):
    """An ill-conditioned model whose file is as far from float64 as PyTorch float32 is (1e-4 of the scale) exported
    twice, with one and with two threads: the same verdict, far from its bound both times, and the card says which
    bound decided."""
    model = offset_kept_model()
    reports = [export_onnx(model, tmp_path / f"t{threads}.onnx",
                           ExportSettings(exporter="torchscript", threads=threads), input_spec=InputSpec(16, 16),
                           device="cpu") for threads in (1, 2)]
    for report in reports:
        assert report, str(report)
        (output,) = report.parity.outputs
        assert report.parity.bound == "float32 noise" and output.max_abs < 0.5 * output.tolerance * output.scale
        props = {p.key: p.value for p in onnx.load(report.output).metadata_props}
        assert props["parity_bound"].startswith("float32 noise (4 x PyTorch float32's own error ")
        assert json.loads(props["parity"])["bound"] == "float32 noise"
    assert reports[0].parity.bound == reports[1].parity.bound
    assert "bound: float32 noise" in str(reports[0])


def test_card_says_atol_decided_on_a_well_conditioned_model(tiny, tmp_path):
    report = export_onnx(tiny, tmp_path / "tiny.onnx", ExportSettings(exporter="torchscript"), device="cpu")
    props = {p.key: p.value for p in onnx.load(report.output).metadata_props}
    assert props["parity_bound"].startswith("atol (0.0001 x scale; 4 x PyTorch float32's own error would be ")
    assert props["parity_inputs"] == "noise only" and report.parity_inputs == "noise only"
    assert "warning: parity is checked on noise inputs only" in str(report)
    assert json.loads(props["parity"])["reference"] == "float64"


TIMM = ["mixnet_s", "levit_128s", "repvgg_a0"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM)
def test_timm_models_fold_every_bn_and_pass_parity(name, tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    size = tuple(GOLDEN[f"timm:{name}"]["input_size"])
    model = realistic_bn(timm.create_model(name, pretrained=False), size=size)
    spec = InputSpec(*size, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
    report = export_onnx(model, tmp_path / f"{name}.onnx", ExportSettings(exporter="torchscript"), input_spec=spec,
                         device="cpu")
    assert report, str(report)
    assert report.bn_before == GOLDEN[f"timm:{name}"]["bn_modules"]
    assert report.bn_torch_after == 0 and report.bn_onnx == 0 < GOLDEN[f"timm:{name}"]["best_peer"]


def test_export_help_states_the_noise_multiple():
    from bnport.export.parity import NOISE_MULTIPLE

    result = CliRunner().invoke(cli, ["export", "--help"])
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and f"{NOISE_MULTIPLE:g}x PyTorch float32's own error" in text
