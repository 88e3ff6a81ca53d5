"""Calibration engine: statistics checked against independent float64 computations on captured BN inputs."""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from bnport.calibrate.engine import BnCalibrator, calibrate
from bnport.calibrate.sampler import global_batches
from bnport.calibrate.settings import CalibrationSettings
from bnport.cli import cli as bnport_cli
from bnport.data import open_images
from bnport.errors import BnportError
from bnport.model.load import load_model
from bnport.model.snapshot import bn_modules
from tests.helpers.images import write_images
from tests.helpers.models import randomize_bn


def tiny(seed: int = 0):
    loaded = load_model("iresnet_tiny")
    torch.manual_seed(seed)
    for p in loaded.module.parameters():
        torch.nn.init.normal_(p, 0, 0.2) if p.dim() > 1 else None
    randomize_bn(loaded.module, seed)
    return loaded


def captured_inputs(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Run `model` with BN in train mode (as calibration does) and record every BN's input per batch, in float64."""
    model = copy.deepcopy(model).eval()
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, bn in bn_modules(model):
        bn.train()
        def record(m, inputs, name=name):
            seen.setdefault(name, []).append(inputs[0].double())
        hooks.append(bn.register_forward_pre_hook(record))
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    return seen


def channel_view(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def last_snapshot(run: Path) -> dict[str, torch.Tensor]:
    files = sorted((run / "snapshots").glob("[0-9][0-9][0-9][0-9].safetensors"))
    return load_file(str(files[-1]))


def stack(dataset, indices) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in indices])


def test_exact_one_batch_equals_that_batch_statistics(image_folder, tmp_path):
    loaded = tiny()
    original = copy.deepcopy(loaded.module)
    run = tmp_path / "run"
    calibrate(loaded, image_folder, run, CalibrationSettings(mode="exact", batch_size=24, epochs=1, workers=0),
              progress=False, log=lambda m: None)
    dataset = open_images(image_folder, loaded.input_spec)
    seen = captured_inputs(original, [stack(dataset, range(24))])
    state = last_snapshot(run)
    assert len(seen) == 19
    for name, (x,) in seen.items():
        flat = channel_view(x)
        mean, var = flat.mean(1), flat.var(1, unbiased=True)
        scale = var.abs().max().item() + 1
        assert torch.allclose(state[f"{name}.running_mean"].double(), mean, atol=2e-5 * scale, rtol=1e-5), name
        assert torch.allclose(state[f"{name}.running_var"].double(), var, atol=2e-5 * scale, rtol=1e-4), name


def test_exact_pools_batches_including_spread_between_batch_means(image_folder, tmp_path):
    loaded = tiny(1)
    original = copy.deepcopy(loaded.module)
    run = tmp_path / "run"
    calibrate(loaded, image_folder, run, CalibrationSettings(mode="exact", batch_size=8, epochs=1, seed=3, workers=0),
              progress=False, log=lambda m: None)
    dataset = open_images(image_folder, loaded.input_spec)
    batches = [stack(dataset, b) for b in global_batches(24, 8, 3, 0, 3)]
    seen = captured_inputs(original, batches)
    state = last_snapshot(run)
    naive_differs = False
    for name, xs in seen.items():
        pooled = torch.cat([channel_view(x) for x in xs], 1)
        mean, var = pooled.mean(1), pooled.var(1, unbiased=True)
        scale = var.abs().max().item() + 1
        got = state[f"{name}.running_var"].double()
        assert torch.allclose(state[f"{name}.running_mean"].double(), mean, atol=2e-5 * scale, rtol=1e-5), name
        assert torch.allclose(got, var, atol=2e-5 * scale, rtol=1e-4), name
        averaged = torch.stack([channel_view(x).var(1, unbiased=True) for x in xs]).mean(0)
        naive_differs |= not torch.allclose(averaged, var, atol=1e-3 * scale, rtol=1e-3)
    assert naive_differs, "test data too uniform: averaging per-batch variances should differ from pooling"
    assert int(state["features.num_batches_tracked"]) == 3


def test_ema_follows_momentum_update(image_folder, tmp_path):
    loaded = tiny(2)
    original = copy.deepcopy(loaded.module)
    calibrate(loaded, image_folder, tmp_path / "run",
              CalibrationSettings(mode="ema", momentum=0.3, batch_size=8, epochs=1, seed=5, workers=0), progress=False,
              log=lambda m: None)
    dataset = open_images(image_folder, loaded.input_spec)
    seen = captured_inputs(original, [stack(dataset, b) for b in global_batches(24, 8, 5, 0, 3)])
    state = last_snapshot(tmp_path / "run")
    for name, bn in bn_modules(original):
        mean, var = bn.running_mean.double(), bn.running_var.double()
        for x in seen[name]:
            flat = channel_view(x)
            mean = 0.7 * mean + 0.3 * flat.mean(1)
            var = 0.7 * var + 0.3 * flat.var(1, unbiased=True)
        assert torch.allclose(state[f"{name}.running_mean"].double(), mean, atol=1e-5, rtol=1e-5), name
        assert torch.allclose(state[f"{name}.running_var"].double(), var, atol=1e-5, rtol=1e-4), name
    assert loaded.module.features.momentum == original.features.momentum, "the model's own momentum is restored"


USER_MODEL = '''
import torch.nn as nn

DROPOUT_MODES = []  # module-global: calibration runs on a copy of the model, and this list is shared with it

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.9)
        self.head = nn.Conv2d(4, 2, 1)
        self.bn2 = nn.BatchNorm2d(2)

    def forward(self, x):
        if self.bn.training:  # the forwards of a calibration
            DROPOUT_MODES.append(self.drop.training)
        return self.bn2(self.head(self.drop(self.bn(self.conv(x)))))

def build():
    return Net()

def no_bn():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
'''


def test_only_bn_trains_params_frozen_snapshot_holds_bn_buffers_only(image_folder, tmp_path):
    (tmp_path / "mymodel.py").write_text(USER_MODEL)
    loaded = load_model(f"{tmp_path}/mymodel.py:build")
    params = {k: v.clone() for k, v in loaded.module.named_parameters()}
    noise = ["gauss-append:ratio=0.25,std=1", "blur:p=0.5"]
    result = calibrate(loaded, image_folder, tmp_path / "run",
                       CalibrationSettings(noise=noise, mode="ema", batch_size=8, epochs=2, snapshot_every=2,
                                           workers=0),
                       progress=False, log=lambda m: None)
    dropout_modes = type(loaded.module).forward.__globals__["DROPOUT_MODES"]
    assert len(dropout_modes) == 6 and not any(dropout_modes), "dropout must stay in eval mode"
    for k, v in loaded.module.named_parameters():
        assert torch.equal(v, params[k]), k
    assert not loaded.module.training
    assert result.snapshots == [0, 1, 2, 3]
    state = load_file(str(tmp_path / "run/snapshots/0003.safetensors"))
    assert sorted(state) == sorted(f"{layer}.{b}" for layer in ("bn", "bn2")
                                   for b in ("running_mean", "running_var", "num_batches_tracked"))
    meta = json.loads((tmp_path / "run/snapshots/0003.json").read_text())
    assert meta["images_seen"]["data"] == 48 and meta["step"] == 6
    assert 0 < meta["images_seen"]["gauss-append"] < 48 and 0 < meta["images_seen"]["blur"] < 48
    assert set(meta["drift"]) == {"bn", "bn2"} and meta["drift"]["bn"]["running_mean"] > 0
    baseline = load_file(str(tmp_path / "run/snapshots/0000.safetensors"))
    assert torch.equal(baseline["bn.running_var"], torch.ones(4)), "snapshot 0000 is the untouched model"
    run = json.loads((tmp_path / "run/run.json").read_text())
    assert run["status"] == "complete" and run["data"]["fingerprint"]["count"] == 24
    assert "directory listing" in run["data"]["fingerprint"]["covers"]
    assert run["model"]["spec"].endswith("mymodel.py:build") and run["calibration"]["noise"]


def test_model_without_bn_is_refused(tmp_path):
    (tmp_path / "mymodel.py").write_text(USER_MODEL)
    with pytest.raises(BnportError, match="no BatchNorm"):
        BnCalibrator(load_model(f"{tmp_path}/mymodel.py:no_bn").module)


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "bnport", *args], capture_output=True, text=True, env=env, **kw)


def calib_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["calibrate", "iresnet_tiny", "--data", str(data), "--out", str(out), "--mode", "exact",
            "--batch-size", "4", "--epochs", "3", "--snapshot-every", "2", "--seed", "7", "--workers", "0",
            "--noise", "gauss-append:ratio=0.25", "--noise", "fractal:ratio=0.25", *extra]


def test_resume_after_kill_reaches_the_same_final_snapshot(image_folder, tmp_path):
    full = tmp_path / "full"
    assert cli(*calib_args(image_folder, full)).returncode == 0
    reference = last_snapshot(full)
    # killed in mid-snapshot (resume sums of 0002 written, its tensors and JSON maybe not), and between snapshots
    for kill_after in ("0002.resume.safetensors", "0001.json", "0004.json"):
        run = tmp_path / f"killed-{kill_after}"
        proc = subprocess.Popen([sys.executable, "-m", "bnport", *calib_args(image_folder, run)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 120
        while not (run / "snapshots" / kill_after).exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done = cli(*calib_args(image_folder, run, "--resume"))
        assert done.returncode == 0, done.stderr
        got = last_snapshot(run)
        assert sorted(got) == sorted(reference)
        for k in reference:
            assert torch.allclose(got[k].double(), reference[k].double(), rtol=1e-12, atol=0), k
        assert json.loads((run / "run.json").read_text())["status"] == "complete"
        assert json.loads(sorted((run / "snapshots").glob("*[0-9].json"))[-1].read_text())["images_seen"] == \
            json.loads(sorted((full / "snapshots").glob("*[0-9].json"))[-1].read_text())["images_seen"]


def test_resume_ignores_half_written_files(image_folder, tmp_path):
    run = tmp_path / "run"
    assert cli(*calib_args(image_folder, run)).returncode == 0
    reference = last_snapshot(run)
    snaps = run / "snapshots"
    for p in sorted(snaps.glob("000[5-9]*")) + sorted(snaps.glob("001*")):
        p.unlink()
    (snaps / "0005.safetensors").write_bytes(b"half a file")  # tensors written, JSON not yet: incomplete
    (snaps / ".0005.json.abc.tmp").write_text("{")
    done = cli(*calib_args(image_folder, run, "--resume"))
    assert done.returncode == 0, done.stderr
    got = last_snapshot(run)
    for k in reference:
        assert torch.allclose(got[k].double(), reference[k].double(), rtol=1e-12, atol=0), k


def test_torchrun_two_processes_equals_single_process(image_folder, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not installed")
    args = ["calibrate", "iresnet_tiny", "--data", str(image_folder), "--mode", "exact", "--batch-size", "5",
            "--epochs", "1", "--seed", "11", "--workers", "0", "--device", "cpu", "--noise", "gauss-append:ratio=0.2"]
    single = cli(*args, "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    dist = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "bnport", *args,
                           "--out", str(tmp_path / "dist")], capture_output=True, text=True, env=env, timeout=300)
    assert dist.returncode == 0, dist.stderr[-3000:]
    a, b = last_snapshot(tmp_path / "single"), last_snapshot(tmp_path / "dist")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-9, atol=1e-9), k
    meta_a = json.loads(sorted((tmp_path / "single/snapshots").glob("*[0-9].json"))[-1].read_text())
    meta_b = json.loads(sorted((tmp_path / "dist/snapshots").glob("*[0-9].json"))[-1].read_text())
    assert meta_a["images_seen"] == meta_b["images_seen"] and meta_a["images_seen"]["data"] == 24
    assert json.loads((tmp_path / "dist/run.json").read_text())["calibration"]["world_size"] == 2


def in_process(*args: str) -> subprocess.CompletedProcess:
    """The CLI run in this process (CliRunner): same parsing and error path as `bnport`, without a torch start-up."""
    result = CliRunner().invoke(bnport_cli, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("bnport: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_cli_errors_are_one_line_and_write_nothing(image_folder, tmp_path):
    (tmp_path / "mymodel.py").write_text(USER_MODEL)
    out = tmp_path / "out"
    line = one_error_line(cli("calibrate", "iresnet_tiny", "--data", str(tmp_path / "nope"), "--out", str(out)))
    assert "nope" in line
    line = one_error_line(in_process("calibrate", f"{tmp_path}/mymodel.py:no_bn", "--data", str(image_folder),
                                     "--out", str(out)))
    assert "no BatchNorm" in line
    state = {"conv.weight": torch.zeros(4, 3, 3, 3), "extra.bias": torch.zeros(2)}
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    line = one_error_line(in_process("calibrate", f"{tmp_path}/mymodel.py:build", "--weights", str(tmp_path / "w.pt"),
                              "--data", str(image_folder), "--out", str(out)))
    assert "missing" in line and "bn.running_mean" in line and "extra.bias" in line and "--non-strict" in line
    line = one_error_line(in_process("calibrate", "iresnet_tiny", "--data", str(image_folder), "--out", str(out),
                                     "--noise", "blur:p=7"))
    assert "blur:p=7" in line
    assert not out.exists()
    if not torch.cuda.is_available():
        line = one_error_line(in_process("calibrate", "iresnet_tiny", "--data", str(image_folder), "--out", str(out),
                                         "--device", "cuda"))
        assert "CUDA" in line and "--device cpu" in line
        assert not out.exists()


def test_nan_statistics_are_refused_naming_the_layer(image_folder, tmp_path):
    loaded = tiny()
    state = loaded.module.state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    proc = in_process("calibrate", "iresnet_tiny", "--weights", str(tmp_path / "nan.pt"), "--data", str(image_folder),
               "--out", str(tmp_path / "run"), "--workers", "0", "--mode", "exact", "--batch-size", "8")
    line = one_error_line(proc)
    assert "layer2.0.bn2" in line and "NaN" in line
    assert sorted(p.name for p in (tmp_path / "run/snapshots").iterdir()) == ["0000.json", "0000.resume.safetensors",
                                                                               "0000.safetensors"]


def test_existing_run_needs_resume_and_strict_data_names_the_file(image_folder, tmp_path):
    run = tmp_path / "run"
    assert in_process("calibrate", "iresnet_tiny", "--data", str(image_folder), "--out", str(run), "--workers", "0",
                      "--steps", "1").returncode == 0
    line = one_error_line(in_process("calibrate", "iresnet_tiny", "--data", str(image_folder), "--out", str(run)))
    assert "--resume" in line
    (image_folder / "id00" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    line = one_error_line(in_process("calibrate", "iresnet_tiny", "--data", str(image_folder), "--out",
                                     str(tmp_path / "r2"), "--workers", "0", "--strict-data", "--batch-size", "25"))
    assert "broken.jpg" in line
    done = cli("calibrate", "iresnet_tiny", "--data", str(image_folder), "--out", str(tmp_path / "r3"),
               "--workers", "2", "--batch-size", "25", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["skipped"] == 1 and summary["images_seen"]["data"] == 24
    assert json.loads((tmp_path / "r3/run.json").read_text())["skipped_images"]["first"][0].endswith("broken.jpg")


def test_torchrun_ema_averages_running_statistics_after_every_step(image_folder, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "bnport", "calibrate",
                           "iresnet_tiny", "--data", str(image_folder), "--mode", "ema", "--momentum", "0.2",
                           "--batch-size", "5", "--epochs", "1", "--seed", "4", "--workers", "0", "--device", "cpu",
                           "--out", str(tmp_path / "dist")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    original = load_model("iresnet_tiny")  # the same seeded initialisation the ranks built
    dataset = open_images(image_folder, original.input_spec)
    batches = [stack(dataset, b) for b in global_batches(24, 5, 4, 0, 5)]  # rank r takes batches r, r+2, r+4
    seen = captured_inputs(original.module, batches)
    state = last_snapshot(tmp_path / "dist")
    for name, bn in bn_modules(original.module):
        mean, var = bn.running_mean.double(), bn.running_var.double()
        for step in range(3):
            per_rank = []
            for g in (2 * step, 2 * step + 1):
                if g < len(batches):
                    flat = channel_view(seen[name][g])
                    per_rank.append((0.8 * mean + 0.2 * flat.mean(1), 0.8 * var + 0.2 * flat.var(1, unbiased=True)))
                else:  # a rank with no batch left keeps the averaged statistics
                    per_rank.append((mean, var))
            mean = sum(m for m, _ in per_rank) / 2
            var = sum(v for _, v in per_rank) / 2
        assert torch.allclose(state[f"{name}.running_mean"].double(), mean, atol=1e-5, rtol=1e-5), name
        assert torch.allclose(state[f"{name}.running_var"].double(), var, atol=1e-5, rtol=1e-4), name


def test_last_batch_of_one_joins_the_one_before_and_every_image_is_pooled(tmp_path):
    folder = tmp_path / "images"
    write_images(folder, 25)  # 25 = 6 x 4 + 1
    loaded = tiny(3)
    original = copy.deepcopy(loaded.module)
    result = calibrate(loaded, folder, tmp_path / "run",
                       CalibrationSettings(mode="exact", batch_size=4, epochs=1, seed=2, workers=0), progress=False,
                       log=lambda m: None)
    assert result.images_seen["data"] == 25
    batches = global_batches(25, 4, 2, 0, 6)
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4, 5] and sorted(sum(batches, [])) == list(range(25))
    dataset = open_images(folder, loaded.input_spec)
    seen = captured_inputs(original, [stack(dataset, b) for b in batches])
    state = last_snapshot(tmp_path / "run")
    for name, xs in seen.items():
        pooled = torch.cat([channel_view(x) for x in xs], 1)
        scale = pooled.var(1).abs().max().item() + 1
        assert torch.allclose(state[f"{name}.running_var"].double(), pooled.var(1, unbiased=True),
                              atol=2e-5 * scale, rtol=1e-4), name
    with pytest.raises(BnportError, match="at least 2"):
        calibrate(tiny(), folder, tmp_path / "one", CalibrationSettings(batch_size=1, workers=0), progress=False,
                  log=lambda m: None)
    assert in_process("calibrate", "iresnet_tiny", "--data", str(folder), "--out", str(tmp_path / "b1"),
                      "--batch-size", "1").returncode == 2
    assert in_process("calibrate", "iresnet_tiny", "--data", str(folder), "--out", str(tmp_path / "m5"),
                      "--momentum", "5").returncode == 2


def test_unusable_data_fails_the_run_and_a_fresh_run_can_replace_it(image_folder, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"not an image")
    (bad / "y.png").write_bytes(b"")
    run = tmp_path / "run"
    line = one_error_line(in_process("calibrate", "iresnet_tiny", "--data", str(bad), "--out", str(run),
                                     "--workers", "0", "--batch-size", "2"))
    assert "no usable batch" in line and "2 unreadable" in line
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    done = in_process("calibrate", "iresnet_tiny", "--data", str(image_folder), "--out", str(run), "--workers", "0",
                      "--steps", "2")
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    assert json.loads((run / "snapshots/0002.json").read_text())["images_seen"]["data"] == 2 * 24


def test_wrong_input_size_and_torchscript_models_are_one_line_errors(image_folder, tmp_path):
    out = tmp_path / "run"
    line = one_error_line(in_process("calibrate", "iresnet_tiny", "--data", str(image_folder), "--out", str(out),
                                     "--input-size", "8x8"))
    assert "8x8" in line and "--input-size" in line
    assert not out.exists()
    script = torch.jit.trace(tiny().module, torch.zeros(2, 3, 112, 112))
    script.save(str(tmp_path / "tiny_ts.pt"))
    line = one_error_line(in_process("calibrate", str(tmp_path / "tiny_ts.pt"), "--data", str(image_folder),
                                     "--out", str(out)))
    assert "TorchScript" in line and "--weights" in line
    line = one_error_line(in_process("inspect", str(tmp_path / "tiny_ts.pt")))
    assert "TorchScript" in line
    assert not out.exists()


def test_snapshot_of_a_file_model_exports_from_another_folder(image_folder, tmp_path, monkeypatch):
    (tmp_path / "mymodel.py").write_text(USER_MODEL)
    monkeypatch.chdir(tmp_path)
    assert in_process("calibrate", "mymodel.py:build", "--data", str(image_folder), "--out", "run", "--workers", "0",
                      "--steps", "1").returncode == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    done = in_process("export", "../run/snapshots/0001.safetensors", "--fold-bn", "-o", "m.onnx", "--input-size",
                      "112x112", "--exporter", "torchscript")
    assert done.returncode == 0, done.stderr
    assert (elsewhere / "m.onnx").is_file()


def short_exact(data: Path, out: Path, *extra: str) -> list[str]:
    """A 6-step exact run with snapshots 0001..0003 (and the fractal source, whose images come from numpy)."""
    return ["calibrate", "iresnet_tiny", "--data", str(data), "--out", str(out), "--mode", "exact", "--batch-size", "4",
            "--epochs", "1", "--snapshot-every", "2", "--seed", "5", "--workers", "0", "--device", "cpu",
            "--noise", "fractal:ratio=0.25", *extra]


@pytest.mark.parametrize("damage", ["sidecar_lost", "sidecar_half_written", "tensors_half_written"])
def test_resume_falls_back_past_a_last_snapshot_that_is_not_whole(image_folder, tmp_path, damage):
    full = tmp_path / "full"
    assert in_process(*short_exact(image_folder, full)).returncode == 0
    reference = last_snapshot(full)
    run = tmp_path / "run"
    shutil.copytree(full, run)
    (run / "snapshots" / "0003.json").unlink()  # killed before its last snapshot: 0002 is the last one
    (run / "snapshots" / "0003.safetensors").unlink()
    (run / "snapshots" / "0003.resume.safetensors").unlink()
    last = run / "snapshots" / ("0002.safetensors" if damage == "tensors_half_written" else "0002.resume.safetensors")
    if damage == "sidecar_lost":
        last.unlink()
    else:
        last.write_bytes(last.read_bytes()[:100])
    done = in_process(*short_exact(image_folder, run, "--resume"))
    assert done.returncode == 0, done.stderr
    note = [line for line in done.stderr.splitlines() if "cannot be resumed" in line]
    assert len(note) == 1 and note[0].startswith("snapshot 0002 cannot be resumed from: ") and str(last) in note[0]
    assert "resumed from snapshot 0001" in done.stdout
    got = last_snapshot(run)
    for k in reference:
        assert torch.allclose(got[k].double(), reference[k].double(), rtol=1e-12, atol=0), k
    for i in (2, 3):  # written again, whole
        assert load_file(str(run / f"snapshots/000{i}.resume.safetensors")).keys() == \
            load_file(str(full / f"snapshots/000{i}.resume.safetensors")).keys()


def test_resume_with_another_number_of_processes_is_refused(image_folder, tmp_path):
    run = tmp_path / "run"
    args = ["calibrate", "iresnet_tiny", "--data", str(image_folder), "--out", str(run), "--mode", "exact",
            "--batch-size", "4", "--steps", "2", "--workers", "0", "--device", "cpu"]
    assert in_process(*args).returncode == 0
    manifest = json.loads((run / "run.json").read_text())
    manifest["status"] = "running"  # what `torchrun --nproc-per-node 2` records for the same command, killed
    manifest["calibration"].update(world_size=2, total_batches=4)
    (run / "run.json").write_text(json.dumps(manifest))
    line = one_error_line(in_process(*args, "--resume"))
    assert "calibrated by 2 processes and this run has 1 process" in line and "--nproc-per-node 2" in line


def test_momentum_with_exact_mode_is_a_usage_error(image_folder, tmp_path):
    out = tmp_path / "run"
    proc = in_process("calibrate", "iresnet_tiny", "--data", str(image_folder), "--out", str(out), "--mode", "exact",
                      "--momentum", "0.1")
    assert proc.returncode == 2 and "--momentum" in proc.stderr and "--mode ema" in proc.stderr
    with pytest.raises(BnportError, match="--momentum has no effect with --mode exact"):
        calibrate(tiny(), image_folder, out, CalibrationSettings(mode="exact", momentum=0.1, workers=0), progress=False,
                  log=lambda m: None)
    with pytest.raises(BnportError, match="--momentum"):
        BnCalibrator(tiny().module, CalibrationSettings(mode="exact", momentum=0.1))
    assert not out.exists()


def test_library_calibrate_leaves_the_callers_module_as_it_was(image_folder, tmp_path):
    loaded = tiny(4)
    loaded.module.train()
    loaded.module.fc.weight.requires_grad_(False)  # a caller's own choice, kept too
    before = copy.deepcopy(loaded.module.state_dict())
    flags = {k: p.requires_grad for k, p in loaded.module.named_parameters()}
    calibrate(loaded, image_folder, tmp_path / "run",
              CalibrationSettings(mode="exact", batch_size=8, epochs=1, workers=0), progress=False, log=lambda m: None)
    module = loaded.module
    assert module.training and all(m.training for m in module.modules())
    assert {k: p.requires_grad for k, p in module.named_parameters()} == flags
    after = module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert {p.device.type for p in module.parameters()} == {"cpu"}
    module.eval()
    module(torch.randn(2, 3, 112, 112)).sum().backward()  # still trainable: gradients reach the parameters
    assert module.conv1.weight.grad is not None and module.fc.weight.grad is None
    assert not torch.equal(bn_modules(module)[3][1].running_mean,
                           last_snapshot(tmp_path / "run")[f"{bn_modules(module)[3][0]}.running_mean"])


def bad_recordio(folder: Path, damage: str) -> Path:
    """insightface-layout RecordIO of 24 PNG faces, then damaged: a middle record's framing broken, or cut short."""
    import struct

    from tests.helpers.recordio import png_bytes, record, write_rec

    folder.mkdir()
    records = [record(b"", [25.0, 26.0])] + [record(png_bytes(10 * k), [float(k % 3), 0.0]) for k in range(24)]
    offsets = write_rec(folder / "train.rec", records)
    (folder / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in enumerate(offsets)))
    raw = bytearray((folder / "train.rec").read_bytes())
    if damage == "framing":
        raw[offsets[9]:offsets[9] + 4] = struct.pack("<I", 0x12345678)
    else:
        raw = raw[:offsets[20] + 30]
    (folder / "train.rec").write_bytes(bytes(raw))
    return folder


def test_damaged_recordio_is_one_error_line_with_workers(tmp_path):
    data = bad_recordio(tmp_path / "framing", "framing")
    run = tmp_path / "run"
    line = one_error_line(in_process("calibrate", "iresnet_tiny", "--data", str(data), "--out", str(run),
                                     "--workers", "2", "--batch-size", "8", "--input-size", "112x112"))
    assert "bad RecordIO magic at offset" in line and str(data / "train.rec") in line
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    data = bad_recordio(tmp_path / "cut", "cut")
    run = tmp_path / "run2"
    line = one_error_line(in_process("calibrate", "iresnet_tiny", "--data", str(data), "--out", str(run),
                                     "--workers", "2", "--batch-size", "8"))
    assert f"{data / 'train.idx'} points past the end of {data / 'train.rec'}" in line
    assert not run.exists(), "found when the data is opened, before anything is written"


def test_calibration_inside_a_callers_process_group_equals_a_single_process(image_folder, tmp_path):
    import torch.distributed as dist

    single = calibrate(tiny(5), image_folder, tmp_path / "single",
                       CalibrationSettings(mode="exact", batch_size=5, epochs=1, noise=["gauss-append:ratio=0.2"],
                                           workers=0),
                       progress=False, log=lambda m: None)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:  # the collectives (tally, exact sums) really run, through the same code a CUDA group uses
        grouped = calibrate(tiny(5), image_folder, tmp_path / "grouped",
                            CalibrationSettings(mode="exact", batch_size=5, epochs=1,
                                                noise=["gauss-append:ratio=0.2"], workers=0),
                            progress=False, log=lambda m: None)
        assert dist.is_initialized(), "a group the caller made is left to the caller"
    finally:
        dist.destroy_process_group()
    assert grouped.images_seen == single.images_seen and grouped.snapshots == single.snapshots
    a, b = last_snapshot(tmp_path / "single"), last_snapshot(tmp_path / "grouped")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_checks_the_data_fingerprint(image_folder, tmp_path):
    run = tmp_path / "run"
    args = ["calibrate", "iresnet_tiny", "--data", str(image_folder), "--out", str(run), "--batch-size", "8",
            "--steps", "1", "--workers", "0", "--device", "cpu"]
    assert in_process(*args).returncode == 0
    write_images(image_folder / "late", 1, seed=9)  # the listing changed: other data, however few files
    line = one_error_line(in_process(*args, "--resume"))
    assert "was made with other settings (data.count, data.sha256 differ)" in line


def test_find_resume_point_alone(tmp_path):
    from bnport.calibrate.run_record import find_resume_point
    from bnport.model.snapshot import bn_state, save_snapshot
    from bnport.runs import Run

    run = Run(tmp_path / "run")
    module = tiny(6).module
    exact = BnCalibrator(copy.deepcopy(module), CalibrationSettings(mode="exact"))
    ema = BnCalibrator(copy.deepcopy(module), CalibrationSettings(mode="ema"))
    assert find_resume_point(run, exact) is None
    state = bn_state(module)
    for i in range(3):
        sums = {f"{name}.sums": torch.full_like(s, float(i)) for name, s in exact.sums.items()}
        save_snapshot(run.path, i, state, {"step": 2 * i, "images_seen": {"data": 8 * i}}, sums)
    point = find_resume_point(run, exact)
    assert (point.snapshot.index, point.step, point.notes) == (2, 4, [])
    assert all(torch.equal(s, torch.full_like(s, 2.0)) for s in point.sums.values())
    run.snapshot(2).resume_path.unlink()
    point = find_resume_point(run, exact)
    assert point.snapshot.index == 1 and len(point.notes) == 1 and str(run.snapshot(2).resume_path) in point.notes[0]
    assert find_resume_point(run, ema).snapshot.index == 2 and find_resume_point(run, ema).sums is None
    other = {f"{name}.sums": torch.zeros(3, 1, dtype=torch.float64) for name, _ in exact.bns}
    save_snapshot(run.path, 1, state, {"step": 2}, other)  # sums of another model
    point = find_resume_point(run, exact)
    assert point.snapshot.index == 0 and point.step == 0 and "does not hold the sums" in point.notes[1]
    assert all(not s.any() for s in point.sums.values()), "the baseline resumes from zero sums, with no sidecar"


class _SharedBn(torch.nn.Module):
    """One BN called at two sites of each forward, and one the forward never calls."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.conv_b = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(3, 4, 5)
        self.bn = torch.nn.BatchNorm2d(4)
        self.unused = torch.nn.BatchNorm2d(4)
        self.used = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.bn(self.conv_a(x))
        b = self.bn(self.conv_b(x))
        return self.used(a[..., 1:-1, 1:-1] + b)


class _UnusedBn(torch.nn.Module):
    """Every BN it calls runs once; one BN is never called."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.unused = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def _pooled(inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.cat([channel_view(x) for x in inputs], dim=1)
    return values.mean(1), values.var(1, unbiased=True)


@pytest.mark.parametrize("model_kind", ["fused", "per-call", "fused-unused"])
def test_exact_sums_equal_the_pooled_statistics_of_every_call(model_kind):
    """The fused update (one float64 step for every channel after the first step, read from the running buffers)
    and the per-call hooks (a BN called at two sites) both give the pooled mean and unbiased variance of every
    value each BN saw; a BN the forward never calls keeps its statistics."""
    torch.manual_seed(3)
    model = {"fused": lambda: tiny(4).module, "per-call": lambda: _SharedBn().eval(),
             "fused-unused": lambda: _UnusedBn().eval()}[model_kind]()
    size = 112 if model_kind == "fused" else 12
    batches = [torch.randn(n, 3, size, size) for n in (4, 6, 5)]  # batch sizes change: counts follow them
    seen = captured_inputs(model, batches)
    calibrator = BnCalibrator(copy.deepcopy(model), CalibrationSettings(mode="exact"))
    before = calibrator.module.unused.running_mean.clone() if model_kind != "fused" else None
    for x in batches:
        calibrator.update(x)
    assert (calibrator._positions is not None) == model_kind.startswith("fused")
    state = calibrator.state()
    for name, inputs in seen.items():
        mean, var = _pooled(inputs)
        assert torch.allclose(state[f"{name}.running_mean"].double(), mean, atol=1e-6, rtol=1e-5), name
        assert torch.allclose(state[f"{name}.running_var"].double(), var, atol=1e-6, rtol=1e-4), name
    if model_kind == "per-call":
        assert len(seen["bn"]) == 6, "two calls a batch"
    if before is not None:
        assert torch.equal(state["unused.running_mean"], before) and torch.isfinite(calibrator._flat).all()


def test_noise_mixed_in_loader_workers_equals_the_main_process(image_folder, tmp_path):
    """The noise is mixed where the batch is collated, in the loader's worker processes when there are some: seeded
    by each batch's global index, the snapshots are the same with 0 or 2 workers."""
    snapshots = {}
    for workers in (0, 2):
        calibrate(tiny(5), image_folder, tmp_path / f"w{workers}",
                  CalibrationSettings(mode="exact", batch_size=6, epochs=1, seed=4, workers=workers,
                                      noise=("fractal:ratio=0.3", "blur:p=0.5", "gauss-add:std=0.1")),
                  device="cpu", progress=False, log=lambda m: None)
        snapshots[workers] = last_snapshot(tmp_path / f"w{workers}")
        manifest = json.loads((tmp_path / f"w{workers}" / "snapshots" / "0004.json").read_text())
        assert manifest["images_seen"]["fractal"] > 0
    for key, value in snapshots[0].items():
        assert torch.equal(value, snapshots[2][key]), key
