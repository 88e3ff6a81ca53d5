"""Sequential mode and the consistency figure, checked against plain re-implementations: a layer-by-layer loop of
eval-mode forwards with a hook on the layer measured, and the figure computed from captured BN inputs."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from bnport.calibrate import engine, sequential
from bnport.calibrate.consistency import bn_consistency
from bnport.calibrate.noise import NoiseMix
from bnport.calibrate.sampler import BatchPlan, RankBatches, global_batches, load_batches
from bnport.calibrate.settings import CalibrationSettings
from bnport.cli import cli as bnport_cli
from bnport.data import open_images
from bnport.data.transforms import InputSpec
from bnport.errors import BnportError
from bnport.model.arch import create_model
from bnport.model.load import load_model
from bnport.model.snapshot import bn_modules
from tests.helpers.images import write_images
from tests.helpers.models import randomize_bn, realistic_bn

QUIET = {"progress": False, "log": lambda m: None, "device": "cpu"}


def tiny(seed: int = 0):
    loaded = load_model("iresnet_tiny")
    torch.manual_seed(seed)
    for p in loaded.module.parameters():
        torch.nn.init.normal_(p, 0, 0.2) if p.dim() > 1 else None
    randomize_bn(loaded.module, seed)
    return loaded


def with_module(loaded, module):
    import dataclasses

    return dataclasses.replace(loaded, module=module)


class InplaceNet(torch.nn.Module):
    """A torchvision-style residual block: in-place ReLUs and `out += identity` write into their inputs."""

    def __init__(self):
        super().__init__()
        self.conv0, self.bn0 = torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6)
        self.relu = torch.nn.ReLU(inplace=True)
        self.conv1, self.bn1 = torch.nn.Conv2d(6, 6, 3, padding=1), torch.nn.BatchNorm2d(6)
        self.conv2, self.bn2 = torch.nn.Conv2d(6, 6, 3, padding=1), torch.nn.BatchNorm2d(6)
        self.head = torch.nn.BatchNorm1d(6)

    def forward(self, x):
        x = self.relu(self.bn0(self.conv0(x)))
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        out = torch.relu_(out)
        return self.head(out.mean((2, 3)))


class SharedBn(torch.nn.Module):
    """One BN called at two sites of each forward (torch.fx cannot stand for it: the hook runner runs), one BN the
    forward never calls."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.conv_b = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(3, 4, 5)
        self.first, self.bn = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(4)
        self.unused, self.used = torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.first(x)
        a = self.bn(self.conv_a(x))
        b = self.bn(self.conv_b(x))
        return self.used(a[..., 1:-1, 1:-1] + b)


class Branchy(InplaceNet):
    """Python control flow on a value: torch.fx cannot trace it, so the hook runner runs."""

    def forward(self, x):
        x = self.bn0(self.conv0(x))
        if float(x.mean()) > -1e9:
            x = self.relu(x)
        return self.head(self.bn2(self.conv2(self.bn1(self.conv1(x)))).mean((2, 3)))


def channel_view(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def reference_sequential(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The definition, by brute force: for each BN in the order the forward first calls it, an eval-mode forward over
    every batch (earlier BNs holding their reference statistics) captures its inputs; their float64 mean and unbiased
    variance become its statistics."""
    model = copy.deepcopy(model).eval()
    bns = dict(bn_modules(model))
    order: list[str] = []
    hooks = [bn.register_forward_pre_hook(lambda m, i, name=name: order.append(name) if name not in order else None)
             for name, bn in bns.items()]
    with torch.no_grad():
        model(batches[0])
    for h in hooks:
        h.remove()
    for name in order:
        seen: list[torch.Tensor] = []
        hook = bns[name].register_forward_pre_hook(lambda m, i, seen=seen: seen.append(channel_view(i[0].double())))
        with torch.no_grad():
            for x in batches:
                model(x.clone())
        hook.remove()
        values = torch.cat(seen, 1)
        bns[name].running_mean.copy_(values.mean(1))
        bns[name].running_var.copy_(values.var(1, unbiased=True))
    return {name: (bn.running_mean.clone(), bn.running_var.clone()) for name, bn in bns.items()}


def run_batches(folder: Path, loaded, settings: CalibrationSettings) -> list[torch.Tensor]:
    """The batches a single-process run with `settings` calibrates on, noise mixed in (bnport's own loader)."""
    dataset = open_images(folder, loaded.input_spec)
    plan = BatchPlan(len(dataset), settings.batch_size, settings.seed)
    length = settings.length(plan.per_epoch, 1)
    mix = NoiseMix(settings.sources(), loaded.input_spec, seed=settings.seed)
    return [b.images for b in load_batches(dataset, RankBatches(plan, range(length.total_steps)), mix=mix)]


def last_snapshot(run: Path) -> tuple[dict[str, torch.Tensor], dict]:
    files = sorted((run / "snapshots").glob("[0-9][0-9][0-9][0-9].safetensors"))
    return load_file(str(files[-1])), json.loads(files[-1].with_suffix(".json").read_text())


def small_images(folder: Path, n: int, size: int = 24) -> Path:
    from PIL import Image

    g = np.random.default_rng(5)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(g.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


@pytest.mark.parametrize("case", ["cached", "part-cached", "uncached", "hooks", "inplace-uncached", "shared-bn",
                                  "untraceable"])
def test_sequential_equals_a_plain_layer_by_layer_loop(case, image_folder, tmp_path, monkeypatch):
    """Whatever ran (the torch.fx cache advancing at every layer, only once the live values fit, never with the
    images read again for every layer, the hook runner), the statistics are the definition's."""
    settings = CalibrationSettings(mode="sequential", batch_size=8, epochs=1, seed=3, workers=0,
                                   noise=["fractal:ratio=0.25", "blur:p=0.3"])
    folder = image_folder
    if case in ("inplace-uncached", "shared-bn", "untraceable"):
        torch.manual_seed(0)
        module = {"inplace-uncached": InplaceNet, "shared-bn": SharedBn, "untraceable": Branchy}[case]()
        module = randomize_bn(module).eval()
        loaded = with_module(load_model("iresnet_tiny", input_spec=InputSpec(24, 24)), module)
        folder = small_images(tmp_path / "small", 20)
    else:
        loaded = tiny(1)
    budget = {"part-cached": 3 << 20, "uncached": 0, "inplace-uncached": 0}.get(case)
    if budget is not None:
        monkeypatch.setattr(engine, "memory_budget", lambda device: budget)
    if case == "hooks":
        def refuse(*args, **kw):
            raise BnportError("forced by the test")
        monkeypatch.setattr(sequential.GraphRunner, "__init__", refuse)
    original = copy.deepcopy(loaded.module)
    engine.calibrate(loaded, folder, tmp_path / "run", settings, **QUIET)
    expected = reference_sequential(original, run_batches(folder, loaded, settings))
    state, meta = last_snapshot(tmp_path / "run")
    report = meta["sequential"]
    assert report["runner"] == ("hooks" if case in ("hooks", "shared-bn", "untraceable") else "fx"), report
    if case in ("shared-bn", "untraceable"):
        assert ("several sites" if case == "shared-bn" else "cannot trace") in report["why_hooks"]
    if case == "cached":
        assert report["passes_from_images"] == 1 and report["images_held"]
    elif case == "part-cached":
        assert report["passes_from_images"] > 1 and report["passes_from_cache"] > 1, report
    elif case.endswith("uncached"):
        assert report["passes_from_cache"] == 0 and not report["images_held"]
    for name, (mean, var) in expected.items():
        if name == "unused":
            assert torch.equal(state[f"{name}.running_mean"], original.unused.running_mean), "never called: kept"
            continue
        scale = float(var.max()) + 1
        assert torch.allclose(state[f"{name}.running_mean"], mean, rtol=1e-5, atol=1e-6 * scale), name
        assert torch.allclose(state[f"{name}.running_var"], var, rtol=1e-5, atol=1e-6 * scale), name
    assert meta["step"] == 3 and meta["batches"] == 3 and meta["mode"] == "sequential"
    assert sorted(p.name for p in (tmp_path / "run/snapshots").glob("*.json")) == ["0000.json", "0001.json"]
    assert not (tmp_path / "run" / sequential.PROGRESS).exists()


def independent_figure(module: torch.nn.Module, batches: list[torch.Tensor]) -> dict:
    """The consistency figure from captured inputs, with numpy: per channel |m - mu| / sqrt(s2 + eps) and
    |v - s2| / (s2 + eps), worst and median channel, worst and median layer."""
    module = copy.deepcopy(module).eval()
    seen: dict[str, list[np.ndarray]] = {}
    hooks = [bn.register_forward_pre_hook(
        lambda m, i, name=name: seen.setdefault(name, []).append(channel_view(i[0]).double().numpy()))
        for name, bn in bn_modules(module)]
    with torch.no_grad():
        for x in batches:
            module(x)
    for h in hooks:
        h.remove()
    layers = {}
    for name, bn in bn_modules(module):
        if name not in seen:
            continue
        values = np.concatenate(seen[name], axis=1)
        mu, s2 = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
        mean_err = np.abs(values.mean(1) - mu) / np.sqrt(s2 + bn.eps)
        var_err = np.abs(values.var(1, ddof=1) - s2) / (s2 + bn.eps)
        layers[name] = (mean_err.max(), np.median(mean_err), var_err.max(), np.median(var_err))
    return layers


@pytest.mark.parametrize("kind", ["tiny", "shared-bn"])
def test_consistency_figure_equals_an_independent_computation(kind):
    torch.manual_seed(2)
    if kind == "tiny":
        module, size = randomize_bn(tiny(2).module, 4), 112
    else:
        module, size = randomize_bn(SharedBn(), 4), 16
    batches = [torch.randn(n, 3, size, size) * 0.8 + 0.1 for n in (4, 5, 3)]
    module.train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    got = bn_consistency(module, batches)
    expected = independent_figure(module, batches)
    assert got["images"] == 12 and set(got["layers"]) == set(expected)
    for name, (mean_worst, mean_median, var_worst, var_median) in expected.items():
        f = got["layers"][name]
        assert f["mean_worst"] == pytest.approx(mean_worst, rel=1e-9, abs=1e-12), name
        assert f["mean_median"] == pytest.approx(mean_median, rel=1e-9, abs=1e-12), name
        assert f["var_worst"] == pytest.approx(var_worst, rel=1e-9, abs=1e-12), name
        assert f["var_median"] == pytest.approx(var_median, rel=1e-9, abs=1e-12), name
    worst = {name: max(e[0], e[2]) for name, e in expected.items()}
    assert got["worst_layer"] == max(worst, key=worst.get) and got["worst"] == pytest.approx(max(worst.values()))
    assert got["median_layer"] == pytest.approx(float(np.median(list(worst.values()))))
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items()), "the module is left as it was"
    assert module.training, "its modes are put back"


def per_layer(figure: dict) -> list[float]:
    return [max(f["mean_worst"], f["var_worst"]) for f in figure["layers"].values()]


def test_sequential_figure_is_float32_rounding_where_exact_grows_with_depth(tmp_path):
    """On the run's own images (consistency full) sequential's statistics are those of the activations the eval
    forward gives every layer; exact's are right at the first layer only (its input does not depend on any BN) and
    drift further from the deployed activations in the deeper layers of an 18-layer IResNet."""
    folder = tmp_path / "images"
    write_images(folder, 48)
    model = realistic_bn(create_model("iresnet18", width=8, num_features=32))
    loaded = with_module(load_model("iresnet_tiny"), model)
    figures = {}
    for mode in ("exact", "sequential"):
        engine.calibrate(loaded, folder, tmp_path / mode, CalibrationSettings(
            mode=mode, batch_size=8, steps=4, workers=0, consistency="full"), **QUIET)
        _, meta = last_snapshot(tmp_path / mode)
        figures[mode] = meta["consistency"]
    seq, exact = per_layer(figures["sequential"]["calibration"]), per_layer(figures["exact"]["calibration"])
    assert len(seq) == len(exact) == 31
    assert max(seq) < 1e-5, seq
    assert exact[0] < 1e-5 and min(exact[1:]) > 1e-2, exact
    third = len(exact) // 3
    assert np.mean(exact[-third:]) > 1.1 * np.mean(exact[1:third + 1]), exact
    held = figures["sequential"]["held_out"]
    used = set(sum(global_batches(48, 8, 0, 0, 4), []))
    held_items = sum(global_batches(48, 8, 0, 4, 4), [])  # batches 4, 5 of epoch 0 and 0, 1 of epoch 1
    assert held["images"] == held["items"] == 32
    assert held["unseen"] == sum(i not in used for i in held_items) >= 16
    assert held["worst"] > max(seq), "other images add their sampling spread"


def test_consistency_setting_and_held_out_coverage(image_folder, tmp_path):
    engine.calibrate(tiny(), image_folder, tmp_path / "off", CalibrationSettings(
        mode="exact", batch_size=4, steps=2, workers=0, consistency="off"), **QUIET)
    assert all("consistency" not in json.loads(p.read_text()) for p in (tmp_path / "off/snapshots").glob("*.json"))
    engine.calibrate(tiny(), image_folder, tmp_path / "held", CalibrationSettings(
        mode="ema", batch_size=4, steps=2, snapshot_every=1, workers=0), **QUIET)
    metas = [json.loads(p.read_text()) for p in sorted((tmp_path / "held/snapshots").glob("*.json"))]
    assert len(metas) == 3 and all(set(m["consistency"]) == {"held_out"} for m in metas), "0000 has one too"
    held = metas[0]["consistency"]["held_out"]
    assert (held["images"], held["items"], held["unseen"]) == (16, 16, 16), "batches 2-5 of 6: none used"
    assert held["worst"] > 0 and held["layers"].keys() == dict(bn_modules(tiny().module)).keys()
    assert json.loads((tmp_path / "held/run.json").read_text())["calibration"]["consistency"] == "held-out"


def crash_after(layers: int):
    """A save_progress that raises once it has recorded `layers` layers: a run killed there."""
    real = sequential.save_progress

    def save(run_dir, state, done):
        real(run_dir, state, done)
        if done == layers:
            raise KeyboardInterrupt("killed")
    return save


def test_resume_of_a_sequential_run_equals_an_uninterrupted_one(image_folder, tmp_path, monkeypatch):
    settings = CalibrationSettings(mode="sequential", batch_size=8, epochs=1, seed=4, workers=0,
                                   noise=["fractal:ratio=0.25", "gauss-add:std=0.1"])
    engine.calibrate(tiny(3), image_folder, tmp_path / "full", settings, **QUIET)
    reference, ref_meta = last_snapshot(tmp_path / "full")
    run = tmp_path / "run"
    monkeypatch.setattr(engine, "PROGRESS_SECONDS", 0.0)  # a record after every layer
    monkeypatch.setattr(engine, "save_progress", crash_after(7))
    with pytest.raises(KeyboardInterrupt):
        engine.calibrate(tiny(3), image_folder, run, settings, **QUIET)
    monkeypatch.undo()
    assert (run / sequential.PROGRESS).is_file() and [p.name for p in (run / "snapshots").glob("*.json")] == \
        ["0000.json"]
    assert sequential.load_progress(run)[1] == 7
    with pytest.raises(BnportError, match="--resume"):
        engine.calibrate(tiny(3), image_folder, run, settings, **QUIET)
    result = engine.calibrate(tiny(3), image_folder, run, settings, resume=True, **QUIET)
    assert result.resumed_from == 0 and result.images_seen == ref_meta["images_seen"]
    got, meta = last_snapshot(run)
    assert sorted(got) == sorted(reference) and all(torch.equal(got[k], reference[k]) for k in reference)
    assert meta["sequential"]["layers"] == 19 and meta["images_seen"] == ref_meta["images_seen"]
    assert not (run / sequential.PROGRESS).exists()
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    # killed after its snapshot, before the progress file was removed: resuming finds the run complete
    sequential.save_progress(run, reference, 19)
    again = engine.calibrate(tiny(3), image_folder, run, settings, resume=True, **QUIET)
    assert again.steps == 0 and all(torch.equal(last_snapshot(run)[0][k], reference[k]) for k in reference)
    assert not (run / sequential.PROGRESS).exists()
    # a half-written progress file: the layers start again, to the same result
    (run / "snapshots" / "0001.json").unlink()
    (run / sequential.PROGRESS).write_bytes(b"half")
    engine.calibrate(tiny(3), image_folder, run, settings, resume=True, **QUIET)
    assert all(torch.equal(last_snapshot(run)[0][k], reference[k]) for k in reference)


def in_process(*args: str) -> subprocess.CompletedProcess:
    result = CliRunner().invoke(bnport_cli, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def test_sequential_refuses_momentum_and_snapshot_every(image_folder, tmp_path):
    out = tmp_path / "run"
    base = ["calibrate", "iresnet_tiny", "--data", str(image_folder), "--out", str(out), "--mode", "sequential"]
    proc = in_process(*base, "--momentum", "0.1")
    assert proc.returncode == 2 and "--momentum has no effect with --mode sequential" in proc.stderr
    proc = in_process(*base, "--snapshot-every", "2")
    assert proc.returncode == 2 and "--snapshot-every has no effect with --mode sequential" in proc.stderr
    assert "drop --snapshot-every" in proc.stderr
    with pytest.raises(BnportError, match="--momentum has no effect with --mode sequential"):
        CalibrationSettings(mode="sequential", momentum=0.1)
    with pytest.raises(BnportError, match="unknown consistency"):
        CalibrationSettings(consistency="sometimes")
    assert not out.exists()
    help_text = in_process("calibrate", "--help").stdout
    assert "sequential" in help_text and "held-out" in help_text


def test_torchrun_sequential_equals_single_process(image_folder, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not installed")
    args = ["calibrate", "iresnet_tiny", "--data", str(image_folder), "--mode", "sequential", "--batch-size", "5",
            "--epochs", "1", "--seed", "11", "--workers", "0", "--device", "cpu", "--noise", "gauss-append:ratio=0.2",
            "--consistency", "full"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "bnport", *args, "--out", str(tmp_path / "single")],
                            capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr
    dist = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "bnport", *args,
                           "--out", str(tmp_path / "dist")], capture_output=True, text=True, env=env, timeout=300)
    assert dist.returncode == 0, dist.stderr[-3000:]
    (a, meta_a), (b, meta_b) = last_snapshot(tmp_path / "single"), last_snapshot(tmp_path / "dist")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-6, atol=1e-7), k
    assert meta_a["images_seen"] == meta_b["images_seen"] and meta_a["images_seen"]["data"] == 24
    for entry in ("held_out", "calibration"):
        fa, fb = meta_a["consistency"][entry], meta_b["consistency"][entry]
        assert fa["images"] == fb["images"] and fa["worst_layer"] == fb["worst_layer"], entry
        assert fa["worst"] == pytest.approx(fb["worst"], rel=1e-3, abs=1e-6), entry
    assert meta_b["consistency"]["calibration"]["worst"] < 1e-5
