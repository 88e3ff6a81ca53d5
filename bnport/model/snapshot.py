"""BN-state snapshots: read, write, check and apply the BatchNorm buffers of a model.

A snapshot is `RUN/snapshots/NNNN.safetensors` (running_mean, running_var, num_batches_tracked of every BN, nothing
else) plus `NNNN.json` (step, images seen per source, drift against the baseline). Snapshot 0000 is the untouched
baseline. An exact-mode run also keeps `NNNN.resume.safetensors` (its float64 sums, written first) to continue from.
The JSON is written last, so a snapshot counts as complete only when both files exist; every write is atomic (temp
file + rename). Paths and completeness come from `bnport.runs.Run`. `load_snapshot_model` rebuilds the run's base
model and applies a snapshot to it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from bnport.atomic import atomic_write_bytes, json_bytes
from bnport.errors import BnportError
from bnport.runs import Run

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


SCRIPT_BN_NAMES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm")


def is_script_bn(module: nn.Module) -> bool:
    """A BatchNorm inside a TorchScript model (compiled modules keep only their original class name)."""
    return isinstance(module, torch.jit.ScriptModule) and getattr(module, "original_name", "") in SCRIPT_BN_NAMES


def bn_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BatchNorm (1d/2d/3d/Sync) that tracks running statistics, in module order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The BN buffers of `model` as a flat dict `layer.buffer -> tensor` (cloned, on CPU)."""
    return {f"{name}.{b}": getattr(m, b).detach().cpu().clone() for name, m in bn_modules(model) for b in BN_BUFFERS}


def check_bn_state(state: dict[str, torch.Tensor]) -> None:
    """Refuse statistics a deployed model must not carry: NaN/Inf anywhere, or a negative variance."""
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        layer = key.rsplit(".", 1)[0]
        if not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).nonzero()[0])
            raise BnportError(f"BN layer {layer}: {key.rsplit('.', 1)[1]} has NaN/Inf (channel {bad})",
                              "check the weights and data for NaN, and the noise settings (e.g. gauss std)")
        if key.endswith("running_var") and (value < 0).any():
            bad = int((value < 0).nonzero()[0])
            raise BnportError(f"BN layer {layer}: running_var is negative in channel {bad}",
                              "this snapshot is corrupt; recalibrate")


def apply_bn_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy snapshot buffers into `model` in place; a layer missing on either side is an error naming it."""
    modules = dict(bn_modules(model))
    layers = {k.rsplit(".", 1)[0] for k in state}
    missing, unexpected = sorted(set(modules) - layers), sorted(layers - set(modules))
    if missing or unexpected:
        raise BnportError(f"snapshot does not fit the model: missing BN layers {missing[:5]}, unknown {unexpected[:5]}",
                          "apply a snapshot to the model its run was made with")
    for key, value in state.items():
        layer, buf = key.rsplit(".", 1)
        target = getattr(modules[layer], buf)
        if target.shape != value.shape:
            raise BnportError(f"snapshot layer {layer}.{buf} has shape {tuple(value.shape)}, "
                              f"model {tuple(target.shape)}",
                              "apply a snapshot to the model its run was made with")
        target.copy_(value.to(target.device, target.dtype))


def drift(state: dict[str, torch.Tensor], baseline: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per layer: relative change ||P1 - P0|| / ||P0|| of running_mean and running_var against the baseline."""
    out: dict[str, dict[str, float]] = {}
    for key, value in state.items():
        layer, buf = key.rsplit(".", 1)
        if buf == "num_batches_tracked":
            continue
        p0, p1 = baseline[key].double(), value.double()
        denom = float(p0.norm())
        out.setdefault(layer, {})[buf] = float((p1 - p0).norm()) / denom if denom > 0 else float((p1 - p0).norm())
    return out


def snapshot_paths(run_dir: Path, index: int) -> tuple[Path, Path]:
    """(tensors, JSON) paths of snapshot `index` of the run in `run_dir`."""
    ref = Run(run_dir).snapshot(index)
    return ref.tensors, ref.meta_path


def save_snapshot(run_dir: Path, index: int, state: dict[str, torch.Tensor], meta: dict,
                  extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Check and write snapshot `index` atomically (tensors, then JSON). `extra` tensors (resume accumulators) go to
    `NNNN.resume.safetensors`, kept apart so the snapshot itself holds BN buffers only."""
    from safetensors.torch import save

    check_bn_state(state)
    # serialised before anything is written, so metadata that cannot be saved leaves the old snapshot whole
    meta_bytes = json_bytes({"id": f"{index:04d}", "index": index, **meta})
    ref = Run(run_dir).snapshot(index)
    if extra:
        atomic_write_bytes(ref.resume_path, save({k: v.contiguous() for k, v in extra.items()}))
    atomic_write_bytes(ref.tensors, save({k: v.contiguous() for k, v in state.items()},
                                         metadata={"format": "bnport-bn-snapshot", "index": str(index)}))
    atomic_write_bytes(ref.meta_path, meta_bytes)
    return ref.tensors


def list_snapshots(run_dir: Path) -> list[int]:
    """Indices of complete snapshots (tensors and JSON both present), ascending."""
    return [ref.index for ref in Run(run_dir).snapshots()]


def load_snapshot(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read one snapshot (give its .safetensors or .json path): BN state and its JSON metadata."""
    from safetensors.torch import load_file

    path = Path(path)
    tensors_path, json_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
    if not tensors_path.is_file() or not json_path.is_file():
        raise BnportError(f"snapshot not found or incomplete: {path}",
                          "give RUN/snapshots/NNNN.safetensors of a run made by bnport calibrate")
    try:
        state = load_file(str(tensors_path))
        meta = json.loads(json_path.read_text())
    except Exception as e:
        raise BnportError(f"could not read snapshot {path}: {e}", "the file is damaged; recalibrate") from e
    check_bn_state(state)
    return state, meta


def load_resume_state(run_dir: Path, index: int) -> dict[str, torch.Tensor]:
    """The resume accumulators of snapshot `index` (`NNNN.resume.safetensors`); a BnportError naming the file when it
    is missing or cannot be read."""
    from safetensors.torch import load_file

    path = Run(run_dir).snapshot(index).resume_path
    if not path.is_file():
        raise BnportError(f"{path} is missing", "a calibration in exact mode resumes from its snapshot's sums")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise BnportError(f"cannot read {path}: {e}", "the file is damaged or half-written") from None


def load_snapshot_model(path: str | Path, *, weights: str | Path | None = None):
    """The run's base model (spec, weights, input spec from run.json) with snapshot `path` applied; eval mode.

    `weights`: where the run's weights file is now, when it moved since calibration (its sha256 must equal the one
    run.json records); None = the path run.json records. `provenance` holds the snapshot id, the run folder, the
    calibration settings and the data it was made on."""
    from bnport.data.transforms import InputSpec
    from bnport.atomic import sha256_file
    from bnport.model.load import load_model

    path = Path(path)
    run_folder, _ = Run.of_snapshot(path)
    run_dir = run_folder.path
    run = run_folder.manifest()
    model = run["model"]
    recorded = model.get("weights")
    if weights is not None and not recorded:
        raise BnportError(f"the run in {run_dir} was calibrated without weights, so --weights cannot apply",
                          "drop --weights")
    weights = str(weights) if weights is not None else recorded
    if weights and not Path(weights).is_file():
        raise BnportError(f"the run's weights file {weights} (recorded in {run_folder.manifest_path}) is missing",
                          "restore it there, or give its new location with --weights (it must be the same file: "
                          "its sha256 is checked against the run's)")
    # Checked before loading: a replaced file may not even fit the architecture, and that error would mislead.
    if weights and model.get("weights_sha256") not in (None, sha256_file(weights)):
        if weights == recorded:
            raise BnportError(f"weights {weights} changed since the run was made (sha256 differs from "
                              f"{run_folder.manifest_path})", "restore the original weights file; the snapshot only "
                              "fits those")
        raise BnportError(f"weights {weights} are not the ones the run was made with (sha256 differs from "
                          f"{run_folder.manifest_path})", "give the original weights file; the snapshot only fits "
                          "those")
    loaded = load_model(model["spec"], weights=weights, weights_key=model.get("weights_key"),
                        strict=model.get("strict", True), trust_pickle=model.get("trust_pickle", False),
                        input_spec=InputSpec.from_dict(run["input_spec"]))
    state, meta = load_snapshot(path)
    apply_bn_state(loaded.module, state)
    loaded.module.eval()
    loaded.provenance = {"snapshot": meta["id"], "run": str(run_dir), "step": meta.get("step"),
                         "images_seen": meta.get("images_seen"), "calibration": run.get("calibration"),
                         "data": run.get("data", {}).get("src")}
    return loaded
