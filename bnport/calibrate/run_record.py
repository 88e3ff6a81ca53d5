"""What a calibration run records in `run.json` and how a later call on the same folder is judged: the manifest of
what was asked (model, input spec, settings) and what was seen (the data's fingerprint), the identity a resumed run
must share with it, the settings named when they differ, and the snapshot a resumed run continues from.
"""
from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bnport import __version__
from bnport.calibrate.settings import CalibrationSettings, RunLength
from bnport.errors import BnportError
from bnport.model.load import LoadedModel
from bnport.model.snapshot import load_resume_state, load_snapshot
from bnport.runs import Run, SnapshotRef


def open_data(data, spec):
    """(dataset, src): `data` opened as a Data SRC (bnport.data.open_images), or a dataset given as it is (src None);
    an error when it holds no image."""
    from bnport.data import open_images

    src = str(data) if isinstance(data, (str, Path)) else None
    dataset = open_images(data, spec) if src is not None else data
    if len(dataset) == 0:
        raise BnportError(f"no images in {src or 'the dataset'}",
                          "point --data at a folder, list, .rec or .bin with images")
    return dataset, src


def new_manifest(loaded: LoadedModel, dataset, data_src: str | None, mix, length: RunLength, *, world: int,
                 device: torch.device, settings: CalibrationSettings) -> dict:
    """run.json of a new run: what was asked (model, input spec, calibration settings) and what was seen (data)."""
    s = settings
    return {
        "format": "bnport-run/1", "command": " ".join(sys.argv), "started": now(),
        "model": {"spec": portable_spec(loaded.spec), "weights": loaded.weights and str(Path(loaded.weights).resolve()),
                  "weights_sha256": loaded.weights_sha256, "source_sha256": loaded.source_sha256,
                  **loaded.load_options},
        "input_spec": loaded.input_spec.to_dict(),
        "data": {"src": data_src and str(Path(data_src).resolve()), "fingerprint": _fingerprint(dataset)},
        "calibration": {"mode": s.mode, "momentum": s.momentum, "batch_size": s.batch_size,
                        "total_steps": length.total_steps, "total_batches": length.total_batches,
                        "snapshot_every": length.snapshot_every, "seed": s.seed, "noise": mix.describe(),
                        "world_size": world, "workers": s.workers, "strict_data": s.strict_data,
                        "consistency": s.consistency},
        "device": str(device), "versions": _versions(), "status": "running"}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def portable_spec(spec: str) -> str:
    """A MODEL spec that still works from another folder: file paths in it made absolute."""
    target, sep, name = spec.rpartition(":")
    if sep and target.endswith(".py"):
        return f"{Path(target).resolve()}:{name}"
    if Path(spec).is_file():
        return str(Path(spec).resolve())
    return spec


def _fingerprint(dataset) -> dict:
    fp = getattr(dataset, "fingerprint", None)
    if callable(fp):
        return fp()
    return {"kind": type(dataset).__name__, "count": len(dataset), "covers": "the item count only"}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import numpy

    try:  # read from the package metadata: importing torchvision costs seconds (it imports torch._dynamo)
        torchvision = version("torchvision")
    except PackageNotFoundError:
        torchvision = None
    return {"bnport": __version__, "torch": torch.__version__, "torchvision": torchvision,
            "numpy": numpy.__version__, "python": platform.python_version()}


def identity(manifest: dict) -> dict:
    """The settings a resumed run must share with the original."""
    c = manifest["calibration"]
    return {"model": {k: manifest["model"].get(k) for k in ("spec", "weights_sha256", "source_sha256")},
            "input_spec": manifest["input_spec"], "data": manifest["data"].get("fingerprint"),
            "calibration": {k: c.get(k) for k in ("mode", "momentum", "batch_size", "total_steps", "snapshot_every",
                                                  "seed", "noise", "world_size")}}


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the entries where two identity dicts differ."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, name + ".")
        elif a != b:
            out.append(name)
    return out


def run_differences(run: Run, loaded: LoadedModel, data, settings: CalibrationSettings, *, world: int = 1
                    ) -> list[str]:
    """Which settings (model, input spec, data fingerprint, calibration) of the run in `run` differ from a
    calibration of `loaded` on `data` with `settings`, as dotted names (empty: the same run). Reads the data's index,
    runs nothing."""
    from bnport.calibrate.noise import NoiseMix
    from bnport.calibrate.sampler import BatchPlan

    dataset, data_src = open_data(data, loaded.input_spec)
    length = settings.length(BatchPlan(len(dataset), settings.batch_size, settings.seed).per_epoch, world)
    mix = NoiseMix(settings.sources(), loaded.input_spec, seed=settings.seed)
    manifest = new_manifest(loaded, dataset, data_src, mix, length, world=world, device=torch.device("cpu"),
                            settings=settings)
    return differences(identity(run.manifest()), identity(manifest))


def _processes(world: int) -> str:
    return "1 process" if world == 1 else f"{world} processes"


def check_run_folder(run: Run, manifest: dict, *, resume: bool) -> dict | None:
    """Check that `run` may take this calibration: a new run needs an unused folder (or one whose run failed before
    its first snapshot and, in sequential mode, its first layer), a resumed one a run made with the same settings.
    Returns the old manifest when resuming."""
    if run.path.exists() and not run.path.is_dir():
        raise BnportError(f"{run.path} exists and is not a folder", "choose another --out")
    if not resume:
        from bnport.calibrate.sequential import PROGRESS

        progressed = [s.index for s in run.snapshots()] != [0] or (run.path / PROGRESS).is_file()
        if run.exists() and (run.status != "failed" or progressed):
            raise BnportError(f"{run.path} already holds a run",
                              "pass --resume to continue it, or choose another --out")
        return None
    if not run.exists():
        raise BnportError(f"nothing to resume in {run.path} (no run.json)", "drop --resume to start a new run")
    old = run.manifest()
    was, now = old.get("calibration", {}).get("world_size", 1), manifest["calibration"]["world_size"]
    if was != now:
        how = f"torchrun --nproc-per-node {was}" if was > 1 else "without torchrun"
        raise BnportError(f"{run.path} was calibrated by {_processes(was)} and this run has {_processes(now)}: "
                          "each step's batches depend on the number of processes",
                          f"resume with the same number ({how})")
    differ = differences(identity(old), identity(manifest))
    if differ:
        raise BnportError(f"{run.path} was made with other settings ({', '.join(differ)} differ)",
                          "resume with the same command line, or choose another --out")
    return old


@dataclass
class ResumePoint:
    """Where a resumed run continues: `snapshot` (its BN `state` and JSON `meta`), the exact-mode `sums` saved with
    it, and `notes` naming later snapshots that could not be used."""

    snapshot: SnapshotRef
    state: dict[str, torch.Tensor]
    meta: dict
    sums: dict[str, torch.Tensor] | None
    notes: list[str] = field(default_factory=list)

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def _resume_sums(ref: SnapshotRef, calibrator) -> dict[str, torch.Tensor] | None:
    if calibrator.mode != "exact":
        return None
    if ref.index == 0:  # the baseline: nothing summed yet
        return {name: torch.zeros_like(s) for name, s in calibrator.sums.items()}
    saved = load_resume_state(ref.run.path, ref.index)
    sums = {}
    for name, s in calibrator.sums.items():
        value = saved.get(f"{name}.sums")
        if value is None or value.shape != s.shape:
            raise BnportError(f"{ref.resume_path} does not hold the sums of BN layer {name}",
                              "the file belongs to another model or is damaged")
        sums[name] = value.to(s.device, s.dtype)
    return sums


def find_resume_point(run: Run, calibrator) -> ResumePoint | None:
    """The last snapshot of `run` that the calibration can continue from: its tensors and JSON readable and, in exact
    mode, its sums (`NNNN.resume.safetensors`) present and fitting `calibrator`'s model. Later snapshots that fail
    this are skipped and named in the notes (the resumed run writes them again). None when no snapshot is usable."""
    notes = []
    for ref in reversed(run.snapshots()):
        try:
            state, meta = load_snapshot(ref.tensors)
            sums = _resume_sums(ref, calibrator)
            int(meta["step"])
        except (BnportError, KeyError, TypeError, ValueError) as err:
            reason = err.message if isinstance(err, BnportError) else f"{ref.meta_path} has no valid step"
            notes.append(f"snapshot {ref.id} cannot be resumed from: {reason}; trying the one before")
            continue
        return ResumePoint(ref, state, meta, sums, notes)
    return None
