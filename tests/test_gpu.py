"""Checks that need a working CUDA device (marked `gpu`, skipped without one; tests/gpu_check.sh runs them): the ORT
CUDA provider really active, the IOBinding path, CUDA parity with TF32 off, calibration on CUDA against CPU, and
torchrun with nccl through snapshots."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bnport.calibrate.engine import calibrate
from bnport.calibrate.settings import CalibrationSettings
from bnport.export.settings import ExportSettings
from bnport.model.load import load_model
from bnport.runtime.device import cuda_works
from bnport.runtime.sessions import GATE, create_session, cuda_status
from tests.helpers.models import realistic_bn
from tests.helpers.onnxgraphs import gemm_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cuda_works()[0], reason="needs a working CUDA device (torch)")]


def needs_ort_cuda() -> None:
    usable, reason = cuda_status()
    if not usable:
        pytest.fail(f"torch sees CUDA but onnxruntime cannot use it: {reason}")


def test_ort_cuda_provider_is_really_active_and_iobinding_runs_every_batch_size():
    needs_ort_cuda()
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(64, 256)).astype(np.float32), rng.normal(size=64).astype(np.float32)
    session = create_session(gemm_model(weight, bias), device="cuda", use=GATE)  # TF32 off: float32 exact
    assert session.device == "cuda" and session.providers[0] == "CUDAExecutionProvider"
    assert session.session.get_providers()[0] == "CUDAExecutionProvider"  # what ORT itself says ran it
    for batch in (1, 7, 64, 3):  # one binding, rebound for each shape
        x = rng.normal(size=(batch, 256)).astype(np.float32)
        y, r = session.run_all(x)
        expected = x.astype(np.float64) @ weight.T.astype(np.float64) + bias
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
        np.testing.assert_array_equal(r, np.maximum(y, 0))
    assert session._binding is not None, "CUDA sessions run through IOBinding"


def test_each_session_use_reaches_the_cuda_provider():
    from bnport.runtime.sessions import CHECK, DEPLOY

    needs_ort_cuda()
    rng = np.random.default_rng(0)
    model = gemm_model(rng.normal(size=(8, 16)).astype(np.float32), np.zeros(8, np.float32))
    seen = {}
    for use in (GATE, CHECK, DEPLOY):
        options = create_session(model, device="cuda", use=use).session.get_provider_options()
        seen[use.name] = options["CUDAExecutionProvider"]
    assert seen[GATE.name]["use_tf32"] == "0" and seen[GATE.name]["cudnn_conv_algo_search"] == "HEURISTIC"
    assert seen[CHECK.name]["use_tf32"] == "1", "a float16 file never has TF32 forced off"
    assert seen[DEPLOY.name]["use_tf32"] == "1" and seen[DEPLOY.name]["cudnn_conv_algo_search"] == "EXHAUSTIVE"


def test_cuda_parity_runs_with_tf32_off(tmp_path):
    from bnport.export.onnx_export import export_onnx
    from bnport.export.parity import ParityReference

    needs_ort_cuda()
    model = realistic_bn(load_model("iresnet_tiny").module)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # what a user's script may set
    try:
        report = export_onnx(model, tmp_path / "m.onnx", ExportSettings(exporter="torchscript"), device="cuda")
        assert report, str(report)
        assert "CUDAExecutionProvider" in report.runtime
        # the reference itself: CUDA with TF32 off equals float64 to float32 precision, TF32 would not
        inputs = torch.randn(8, 3, 112, 112, generator=torch.Generator().manual_seed(0))
        cuda_out = ParityReference(model, inputs, batch_sizes=[8]).outputs("cuda")[0][0]
        with torch.no_grad():
            exact = model.double()(inputs.double()).numpy()
        model.float()
        scale = np.abs(exact).max()
        assert np.abs(cuda_out - exact).max() < 1e-4 * scale
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32, "the user's flags restored"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def test_calibration_on_cuda_equals_cpu_and_leaves_the_module_exportable(image_folder, tmp_path):
    from bnport.export.onnx_export import export_onnx

    runs = {}
    for device in ("cpu", "cuda"):
        loaded = load_model("iresnet_tiny")
        realistic_bn(loaded.module)
        flags = {name: p.requires_grad for name, p in loaded.module.named_parameters()}  # the builder freezes some
        calibrate(loaded, image_folder, tmp_path / device,
                  CalibrationSettings(mode="exact", batch_size=8, epochs=1, noise=["gauss-append:ratio=0.25"],
                                      workers=0),
                  device=device, progress=False, log=lambda m: None)
        runs[device] = load_file(str(sorted((tmp_path / device / "snapshots").glob("*[0-9].safetensors"))[-1]))
        # the caller's module stays where it was, trainable, and exports (it once stayed on CUDA, frozen)
        assert {p.device.type for p in loaded.module.parameters()} == {"cpu"}
        assert {name: p.requires_grad for name, p in loaded.module.named_parameters()} == flags
    assert export_onnx(loaded.module, tmp_path / "after.onnx", ExportSettings(exporter="torchscript"), device="cuda")
    assert json.loads((tmp_path / "cuda" / "run.json").read_text())["device"].startswith("cuda")
    # the same images and noise (mixed on the CPU before the batch moves); convs may use TF32 on CUDA (torch's
    # default for cuDNN), so the statistics agree to about 1e-3
    for key, value in runs["cpu"].items():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(value, runs["cuda"][key])
            continue
        scale = value.abs().max().item() + 1
        assert torch.allclose(runs["cuda"][key], value, rtol=1e-2, atol=1e-2 * scale), key


def torchrun() -> str:
    found = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if found is None:
        pytest.skip("torchrun not installed")
    return found


def run_cli(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [*(launcher or [sys.executable]), "-m", "bnport", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("mode", ["exact", "ema"])
def test_torchrun_one_process_with_nccl_through_snapshots(image_folder, tmp_path, mode):
    args = ["calibrate", "iresnet_tiny", "--data", str(image_folder), "--mode", mode, "--batch-size", "6", "--steps",
            "3", "--snapshot-every", "1", "--seed", "2", "--workers", "0", "--device", "cuda"]
    plain = run_cli(*args, "--out", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr[-3000:]
    # one process under torchrun joins a real group (nccl for CUDA tensors): every collective runs through it
    proc = run_cli(*args, "--out", str(tmp_path / "dist"),
                   launcher=[torchrun(), "--standalone", "--nproc-per-node", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((tmp_path / "dist" / "run.json").read_text())
    assert run["status"] == "complete" and run["device"] == "cuda:0" and run["calibration"]["world_size"] == 1
    for index in (1, 2, 3):
        a = load_file(str(tmp_path / f"plain/snapshots/000{index}.safetensors"))
        b = load_file(str(tmp_path / f"dist/snapshots/000{index}.safetensors"))
        for key in a:
            assert torch.allclose(a[key].double(), b[key].double(), rtol=1e-6, atol=1e-6), (index, key)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (nccl refuses two ranks on one device)")
def test_torchrun_two_gpus_equals_single_process(image_folder, tmp_path):
    """The case that failed before issue 8: CPU counters all-reduced on an nccl-only group at the first snapshot."""
    args = ["calibrate", "iresnet_tiny", "--data", str(image_folder), "--mode", "exact", "--batch-size", "5",
            "--epochs", "1", "--seed", "11", "--workers", "0", "--device", "cuda", "--noise", "fractal:ratio=0.2"]
    single = run_cli(*args, "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr[-3000:]
    proc = run_cli(*args, "--out", str(tmp_path / "dist"),
                   launcher=[torchrun(), "--standalone", "--nproc-per-node", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(sorted((tmp_path / "single/snapshots").glob("*[0-9].safetensors"))[-1]))
    b = load_file(str(sorted((tmp_path / "dist/snapshots").glob("*[0-9].safetensors"))[-1]))
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), rtol=1e-5, atol=1e-5), key
