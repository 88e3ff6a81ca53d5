"""BN snapshots: round trips of BN buffers only, atomic writes, refused statistics, drift against numpy, and the
run's model rebuilt with a snapshot applied."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bnport.atomic import atomic_write_bytes, atomic_write_json
from bnport.calibrate.engine import calibrate
from bnport.calibrate.settings import CalibrationSettings
from bnport.errors import BnportError
from bnport.model.load import load_model
from bnport.model.snapshot import (
    apply_bn_state,
    bn_modules,
    bn_state,
    check_bn_state,
    drift,
    list_snapshots,
    load_snapshot,
    load_snapshot_model,
    save_snapshot,
    snapshot_paths,
)
from tests.helpers.models import randomize_bn


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    return bn_state(randomize_bn(load_model("iresnet_tiny").module, seed))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


def test_bn_state_holds_bn_buffers_only():
    model = load_model("iresnet_tiny").module
    state = bn_state(model)
    assert len(bn_modules(model)) == 19
    assert len(state) == 19 * 3
    assert {k.rsplit(".", 1)[1] for k in state} == {"running_mean", "running_var", "num_batches_tracked"}
    assert "layer1.0.bn1.running_mean" in state and "features.running_var" in state
    assert not any(k.endswith(("weight", "bias")) for k in state)
    state["bn1.running_mean"].add_(1)  # a copy: the model is untouched
    assert torch.equal(model.bn1.running_mean, torch.zeros(8))


def test_save_load_round_trip(tmp_path):
    state = tiny_state(1)
    meta = {"step": 5, "images_seen": {"data": 40, "gauss-append": 2}, "drift": {"bn1": {"running_mean": 0.5}}}
    path = save_snapshot(tmp_path, 3, state, meta)
    assert path == tmp_path / "snapshots" / "0003.safetensors"
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == ["0003.json", "0003.safetensors"]
    on_disk = load_file(str(path))  # read independently of bnport: exactly the BN buffers, nothing else
    assert on_disk.keys() == state.keys() and all(torch.equal(on_disk[k], state[k]) for k in state)
    loaded, loaded_meta = load_snapshot(path)
    assert all(torch.equal(loaded[k], state[k]) and loaded[k].dtype == state[k].dtype for k in state)
    assert loaded_meta == {"id": "0003", "index": 3, **meta}
    assert load_snapshot(path.with_suffix(".json"))[1]["id"] == "0003"  # either file names the snapshot
    assert leftovers(tmp_path) == []


def test_resume_tensors_stay_out_of_the_snapshot(tmp_path):
    state = tiny_state()
    save_snapshot(tmp_path, 1, state, {"step": 1}, extra={"bn1.sums": torch.ones(3, 8, dtype=torch.float64)})
    tensors, _ = snapshot_paths(tmp_path, 1)
    assert load_file(str(tensors)).keys() == state.keys()
    assert load_file(str(tensors.with_suffix(".resume.safetensors"))).keys() == {"bn1.sums"}
    assert list_snapshots(tmp_path) == [1]


def test_apply_round_trip_into_a_fresh_model():
    state = tiny_state(2)
    model = load_model("iresnet_tiny").module
    apply_bn_state(model, state)
    assert all(torch.equal(v, bn_state(model)[k]) for k, v in state.items())


def test_atomic_write_failure_leaves_the_old_file(tmp_path):
    path = tmp_path / "run.json"
    atomic_write_json(path, {"status": "running", "value": 1})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        atomic_write_json(path, {"status": "done", "oops": object()})
    assert path.read_bytes() == before
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "text, not bytes")  # fails inside the write, after the temp file exists
    assert path.read_bytes() == before
    assert json.loads(path.read_text()) == {"status": "running", "value": 1}
    assert leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and leftovers(tmp_path) == []


def test_failed_snapshot_write_keeps_the_previous_one(tmp_path):
    state = tiny_state(0)
    save_snapshot(tmp_path, 1, state, {"step": 1})
    tensors, meta_path = snapshot_paths(tmp_path, 1)
    before = tensors.read_bytes(), meta_path.read_bytes()
    with pytest.raises(TypeError):
        save_snapshot(tmp_path, 1, tiny_state(5), {"step": 2, "bad": object()})
    assert (tensors.read_bytes(), meta_path.read_bytes()) == before  # the pair stays consistent
    assert load_snapshot(tensors)[1]["step"] == 1
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("buffer, value, what", [("running_mean", math.nan, "NaN/Inf"),
                                                 ("running_var", math.inf, "NaN/Inf"),
                                                 ("running_var", -0.25, "negative")])
def test_bad_statistics_are_refused_naming_the_layer(tmp_path, buffer, value, what):
    state = tiny_state()
    state[f"layer2.0.bn3.{buffer}"][5] = value
    with pytest.raises(BnportError) as err:
        save_snapshot(tmp_path, 1, state, {"step": 1})
    assert "layer2.0.bn3" in err.value.message and what in err.value.message and "channel 5" in err.value.message
    assert not (tmp_path / "snapshots").exists() or list((tmp_path / "snapshots").iterdir()) == []
    with pytest.raises(BnportError, match="layer2.0.bn3"):
        check_bn_state(state)


def test_tampered_snapshot_file_is_refused_on_load(tmp_path):
    state = tiny_state()
    path = save_snapshot(tmp_path, 0, state, {"step": 0})
    state["features.running_var"][0] = -1.0
    save_file(state, str(path))
    with pytest.raises(BnportError, match="BN layer features: running_var is negative in channel 0"):
        load_snapshot(path)


def test_missing_or_incomplete_snapshot_is_an_error(tmp_path):
    with pytest.raises(BnportError, match="not found or incomplete"):
        load_snapshot(tmp_path / "snapshots" / "0001.safetensors")
    path = save_snapshot(tmp_path, 1, tiny_state(), {"step": 1})
    path.with_suffix(".json").unlink()
    with pytest.raises(BnportError, match="not found or incomplete"):
        load_snapshot(path)


def test_apply_into_another_architecture_is_refused():
    mbf = load_model("mobilefacenet_tiny").module
    with pytest.raises(BnportError) as err:
        apply_bn_state(mbf, tiny_state())
    assert "does not fit the model" in err.value.message and "layers.0.layers.1" in err.value.message
    wider = load_model("iresnet_tiny").module
    narrow_state = bn_state(randomize_bn(type(wider)(type(wider.layer1[0]), [1, 1, 1, 1], width=4,
                                                     num_features=32)))
    with pytest.raises(BnportError, match=r"snapshot layer bn1.running_mean has shape \(4,\), model \(8,\)"):
        apply_bn_state(wider, narrow_state)


def test_list_snapshots_ignores_incomplete_ones(tmp_path):
    assert list_snapshots(tmp_path) == []
    for i in (0, 1, 2, 3):
        save_snapshot(tmp_path, i, tiny_state(i), {"step": i})
    snapshot_paths(tmp_path, 1)[1].unlink()  # tensors without JSON: a write that was killed half-way
    snapshot_paths(tmp_path, 3)[1].unlink()
    snapshot_paths(tmp_path, 2)[0].unlink()  # JSON without tensors
    (tmp_path / "snapshots" / ".0004.safetensors.abc.tmp").write_bytes(b"partial")
    assert list_snapshots(tmp_path) == [0]


def test_drift_against_numpy():
    p0, p1 = tiny_state(0), tiny_state(1)
    p0["features.running_mean"].zero_()  # a zero baseline: drift falls back to the absolute change
    result = drift(p1, p0)
    assert set(result) == {k.rsplit(".", 1)[0] for k in p0}
    for layer, values in result.items():
        assert set(values) == {"running_mean", "running_var"}
        for buf, got in values.items():
            a = p0[f"{layer}.{buf}"].numpy().astype(np.float64)
            b = p1[f"{layer}.{buf}"].numpy().astype(np.float64)
            norm0 = np.sqrt((a ** 2).sum())
            want = np.sqrt(((b - a) ** 2).sum()) / (norm0 if norm0 > 0 else 1.0)
            assert got == pytest.approx(want, rel=1e-12), (layer, buf)
    assert result["bn1"]["running_var"] > 0
    assert drift(p0, p0)["layer1.0.bn2"] == {"running_mean": 0.0, "running_var": 0.0}


@pytest.fixture
def run_dir(tmp_path, image_folder) -> tuple[Path, Path]:
    """A real exact-mode calibration run of iresnet_tiny with its own weights file: (run folder, weights)."""
    weights = tmp_path / "backbone.pth"
    torch.save(randomize_bn(load_model("iresnet_tiny").module, seed=4).state_dict(), weights)
    run = tmp_path / "run"
    calibrate(load_model("iresnet_tiny", weights=weights), image_folder, run,
              CalibrationSettings(mode="exact", batch_size=8, epochs=1, workers=0), progress=False, log=lambda m: None)
    return run, weights


def test_load_snapshot_model_rebuilds_the_run_model(run_dir):
    run, weights = run_dir
    indices = list_snapshots(run)
    assert indices == [0, 1, 2, 3]
    path = snapshot_paths(run, indices[-1])[0]
    loaded = load_snapshot_model(path)
    assert not loaded.module.training
    on_disk = load_file(str(path))
    model_state = bn_state(loaded.module)
    assert model_state.keys() == on_disk.keys() and all(torch.equal(model_state[k], on_disk[k]) for k in on_disk)
    # the calibrated statistics really differ from the weights file's ones
    base = load_model("iresnet_tiny", weights=weights).module
    assert not torch.allclose(base.layer2[0].bn1.running_mean, loaded.module.layer2[0].bn1.running_mean)
    # everything but BN buffers comes from the weights file
    base_sd, got_sd = base.state_dict(), loaded.module.state_dict()
    assert all(torch.equal(got_sd[k], v) for k, v in base_sd.items() if k not in on_disk)
    assert loaded.provenance["snapshot"] == "0003" and loaded.provenance["run"] == str(run)
    assert loaded.provenance["step"] == 3 and loaded.provenance["images_seen"] == {"data": 24}
    assert loaded.provenance["calibration"]["mode"] == "exact"
    assert loaded.weights_sha256 == json.loads((run / "run.json").read_text())["model"]["weights_sha256"]
    baseline = load_snapshot_model(snapshot_paths(run, 0)[1])
    assert torch.equal(baseline.module.features.running_var, base.features.running_var)


def test_load_snapshot_model_refuses_changed_weights(run_dir):
    run, weights = run_dir
    sd = torch.load(weights)
    sd["fc.bias"] = sd["fc.bias"] + 1e-3
    torch.save(sd, weights)
    with pytest.raises(BnportError) as err:
        load_snapshot_model(snapshot_paths(run, 1)[0])
    assert "changed since the run was made" in err.value.message and "restore" in err.value.hint
    # a replacement that does not even fit the architecture gets the same, true diagnosis
    torch.save(load_model("mobilefacenet_tiny").module.state_dict(), weights)
    with pytest.raises(BnportError, match="changed since the run was made"):
        load_snapshot_model(snapshot_paths(run, 1)[0])


def test_load_snapshot_model_needs_a_run(tmp_path):
    path = save_snapshot(tmp_path / "loose", 0, tiny_state(), {"step": 0})
    with pytest.raises(BnportError, match="has no run manifest: .*run.json is missing"):
        load_snapshot_model(path)
