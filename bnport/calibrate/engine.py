"""BatchNorm recalibration: re-estimate running statistics with every parameter frozen, saving snapshots as it goes.

Only BN modules run in train mode (no dropout), under `torch.no_grad`; parameters never change. Two modes:
- `ema`: BN's own momentum update (the model's momentum, or `momentum`), the published technique.
- `exact`: BN normalises with batch statistics as in training, and per-channel float64 sums of n, x and x^2 are
  kept over every image seen, giving the exact pooled mean and unbiased variance, including the spread between
  batch means that averaging per-batch variances (update_bn, AIMET, fvcore) misses. The per-batch statistics come
  from BN's own kernel (momentum 1 makes the running buffers equal the batch's), so the sums cost almost nothing.

`calibrate` reads as the steps of a run: check the settings, join the process group (bnport.runtime.distributed), open the
data and plan its batches (bnport.calibrate.sampler), write the manifest (bnport.runs), find where a resumed run continues
(`find_resume_point`), then calibrate batch by batch, counting in a `Tally` (bnport.calibrate.tally) and writing snapshots.
Under `torchrun` rank r takes global batches r, r+W, r+2W, ..., exact mode sums over ranks (so it equals the
single-process run over the same batches), ema mode averages the running statistics after every step, and only
rank 0 writes.
"""
from __future__ import annotations

import copy
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from bnport import __version__
from bnport.runtime.device import resolve_torch_device
from bnport.runtime.distributed import Ranks, join_process_group
from bnport.errors import BnportError
from bnport.model.load import LoadedModel, check_input_runs
from bnport.runs import Run, SnapshotRef
from bnport.calibrate.sampler import BatchPlan, LoadedBatch, RankBatches, batches_per_epoch, global_batches, load_batches
from bnport.model.snapshot import (apply_bn_state, bn_modules, bn_state, check_bn_state, drift, load_resume_state,
                             load_snapshot, save_snapshot)
from bnport.calibrate.tally import BATCHES, SKIPPED, Tally

__all__ = ["MODES", "BnCalibrator", "CalibrationResult", "ResumePoint", "RunLength", "batches_per_epoch", "calibrate",
           "check_calibratable", "check_run_folder", "check_settings", "find_resume_point", "global_batches",
           "plan_length", "portable_spec"]

MODES = ("ema", "exact")


def check_settings(*, mode: str, momentum: float | None, batch_size: int, steps: int | None,
                   epochs: int | None) -> None:
    """Refuse settings that cannot make a run, or that would be recorded without doing anything."""
    if mode not in MODES:
        raise BnportError(f"unknown mode {mode!r}", "use --mode ema or --mode exact")
    if momentum is not None and mode == "exact":
        raise BnportError("--momentum has no effect with --mode exact (it pools every image, with no momentum)",
                          "drop --momentum, or use --mode ema")
    if momentum is not None and not 0 < momentum <= 1:
        raise BnportError(f"momentum must be in (0, 1], got {momentum}", "use e.g. --momentum 0.1")
    if batch_size < 2:
        raise BnportError(f"batch size must be at least 2, got {batch_size} (BatchNorm needs two values per channel)",
                          "use e.g. --batch-size 32")
    if steps is not None and epochs is not None:
        raise BnportError("give --steps or --epochs, not both", "steps count batches, epochs passes over the data")


def check_calibratable(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The BN layers of `module` that calibration updates; an error for a TorchScript model or one without them."""
    if isinstance(module, torch.jit.ScriptModule):
        raise BnportError("a TorchScript model cannot be recalibrated: its BatchNorm layers are compiled in "
                          "eval mode", "give the architecture as MODEL (e.g. iresnet50 or file.py:factory) "
                          "and the weights with --weights")
    bns = bn_modules(module)
    if not bns:
        raise BnportError("the model has no BatchNorm layers with running statistics: nothing to calibrate",
                          "check the MODEL spec; bnport calibrates models that use BatchNorm")
    return bns


class BnCalibrator:
    """Puts the BN layers of `module` in train mode and accumulates what each mode needs; `state()` reads it out.

    Works on `module` in place (parameters frozen while it runs); `close()` puts back its eval mode, BN momenta and
    requires_grad flags, leaving the calibrated statistics in its BN buffers."""

    def __init__(self, module: nn.Module, *, mode: str = "ema", momentum: float | None = None):
        if mode not in MODES:
            raise BnportError(f"unknown mode {mode!r}", "use --mode ema or --mode exact")
        if momentum is not None and mode == "exact":
            raise BnportError("--momentum has no effect with --mode exact (it pools every image, with no momentum)",
                              "drop --momentum, or use --mode ema")
        self.module, self.mode = module, mode
        self.bns = check_calibratable(module)
        self._requires_grad = [(p, p.requires_grad) for p in module.parameters()]
        for p in module.parameters():
            p.requires_grad_(False)
        module.eval()
        self._momenta = [bn.momentum for _, bn in self.bns]
        for _, bn in self.bns:
            bn.train()
            if mode == "exact":
                bn.momentum = 1.0
            elif momentum is not None:
                bn.momentum = momentum
        self.batches = 0
        self._hooks = []
        self.sums: dict[str, torch.Tensor] = {}
        if mode == "exact":
            device = self.bns[0][1].running_mean.device
            self.sums = {name: torch.zeros(3, bn.num_features, dtype=torch.float64, device=device)
                         for name, bn in self.bns}
            self._hooks = [bn.register_forward_hook(self._accumulate(name)) for name, bn in self.bns]

    def _accumulate(self, name: str):
        sums = self.sums

        def hook(bn: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0]
            n = x.numel() // x.shape[1]
            mean = bn.running_mean.double()  # momentum 1: the running buffers now hold this batch's statistics
            var = bn.running_var.double()    # unbiased
            s = sums[name]
            s[0] += n
            s[1] += n * mean
            s[2] += (n - 1) * var + n * mean * mean
        return hook

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        self.module(x)
        self.batches += 1

    def average_over(self, ranks: Ranks) -> None:
        """ema under torchrun: every rank's running statistics become their mean over the ranks."""
        for _, bn in self.bns:
            for buf in (bn.running_mean, bn.running_var):
                ranks.sum(buf)
                buf /= ranks.world

    def state(self, sums: dict[str, torch.Tensor] | None = None, batches: int | None = None
              ) -> dict[str, torch.Tensor]:
        """BN buffers as they stand: the running buffers (ema) or the pooled statistics (exact) of `sums` (default:
        this process's own) over `batches` batches (default: this process's count)."""
        state = bn_state(self.module)
        if self.mode == "ema":
            return state
        sums = self.sums if sums is None else sums
        batches = self.batches if batches is None else batches
        for name, bn in self.bns:  # a layer that has seen fewer than 2 values keeps its buffers
            n, s1, s2 = sums[name][0], sums[name][1], sums[name][2]
            if float(n[0]) < 2:
                continue
            mean = s1 / n
            var = (s2 - s1 * mean) / (n - 1)
            state[f"{name}.running_mean"] = mean.to(bn.running_mean.dtype).cpu()
            state[f"{name}.running_var"] = var.clamp_min(0).to(bn.running_var.dtype).cpu()
            state[f"{name}.num_batches_tracked"] = torch.tensor(batches, dtype=torch.long)
        return state

    def close(self) -> None:
        """Leave the module as found (eval mode, own momenta, requires_grad flags) but holding the calibrated
        statistics."""
        if self.mode == "exact":
            apply_bn_state(self.module, self.state())
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for (_, bn), momentum in zip(self.bns, self._momenta):
            bn.momentum = momentum
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
        self.module.eval()


@dataclass
class CalibrationResult:
    """What a calibration run produced."""

    run_dir: Path
    snapshots: list[int]
    images_seen: dict[str, int]
    skipped: int
    steps: int
    seconds: float
    resumed_from: int | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        seen = ", ".join(f"{k} {v}" for k, v in self.images_seen.items())
        first, last = self.snapshots[0], self.snapshots[-1]
        lines = [f"run: {self.run_dir}", f"snapshots: {len(self.snapshots)} ({first:04d}..{last:04d})",
                 f"steps: {self.steps} in {self.seconds:.1f}s", f"images seen: {seen}",
                 f"unreadable images skipped: {self.skipped}"]
        if self.resumed_from is not None:
            lines.append(f"resumed from snapshot {self.resumed_from:04d}")
        return "\n".join(self.notes + lines)


@dataclass(frozen=True)
class RunLength:
    """How long a run is: `total_batches` global batches, `total_steps` per process, a snapshot every
    `snapshot_every` steps (and after the last)."""

    total_batches: int
    total_steps: int
    snapshot_every: int

    def snapshot_due(self, done_steps: int) -> bool:
        return done_steps % self.snapshot_every == 0 or done_steps == self.total_steps


def plan_length(per_epoch: int, *, steps: int | None, epochs: int | None, world: int,
                snapshot_every: int | None) -> RunLength:
    """`steps` per process, or `epochs` passes of `per_epoch` batches shared by `world` processes (default 1 epoch);
    `snapshot_every` defaults to a tenth of the run, at least 1 step."""
    total_batches = steps * world if steps is not None else (epochs or 1) * per_epoch
    total_steps = math.ceil(total_batches / world)
    return RunLength(total_batches, total_steps, snapshot_every or max(1, total_steps // 10))


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


def _identity(manifest: dict) -> dict:
    """The settings a resumed run must share with the original."""
    c = manifest["calibration"]
    return {"model": {k: manifest["model"].get(k) for k in ("spec", "weights_sha256", "source_sha256")},
            "input_spec": manifest["input_spec"], "data": manifest["data"].get("fingerprint"),
            "calibration": {k: c.get(k) for k in ("mode", "momentum", "batch_size", "total_steps", "snapshot_every",
                                                  "seed", "noise", "world_size")}}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the entries where two identity dicts differ."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, name + ".")
        elif a != b:
            out.append(name)
    return out


def run_differences(run: Run, loaded: LoadedModel, data, *, noise: list | None = None, mode: str = "ema",
                    momentum: float | None = None, batch_size: int = 32, steps: int | None = None,
                    epochs: int | None = None, snapshot_every: int | None = None, seed: int = 0, world: int = 1
                    ) -> list[str]:
    """Which settings (model, input spec, data fingerprint, calibration) of the run in `run` differ from a
    calibration with these arguments, as dotted names (empty: the same run). Reads the data's index, runs nothing."""
    from bnport.calibrate.noise import NoiseMix, parse_noise

    sources = [parse_noise(n) if isinstance(n, str) else n for n in (noise or [])]
    dataset, data_src = _open_data(data, loaded.input_spec)
    plan = BatchPlan(len(dataset), batch_size, seed)
    length = plan_length(plan.per_epoch, steps=steps, epochs=epochs, world=world, snapshot_every=snapshot_every)
    ranks = Ranks(0, world, torch.device("cpu"))
    manifest = _manifest(loaded, dataset, data_src, NoiseMix(sources, loaded.input_spec, seed=seed), length, ranks,
                         mode=mode, momentum=momentum, batch_size=batch_size, seed=seed, workers=0,
                         strict_data=False)
    return _differences(_identity(run.manifest()), _identity(manifest))


def _processes(world: int) -> str:
    return "1 process" if world == 1 else f"{world} processes"


def check_run_folder(run: Run, manifest: dict, *, resume: bool) -> dict | None:
    """Check that `run` may take this calibration: a new run needs an unused folder (or one whose run failed before
    its first snapshot), a resumed one a run made with the same settings. Returns the old manifest when resuming."""
    if run.path.exists() and not run.path.is_dir():
        raise BnportError(f"{run.path} exists and is not a folder", "choose another --out")
    if not resume:
        if run.exists() and (run.status != "failed" or [s.index for s in run.snapshots()] != [0]):
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
    differ = _differences(_identity(old), _identity(manifest))
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


def _resume_sums(ref: SnapshotRef, calibrator: BnCalibrator) -> dict[str, torch.Tensor] | None:
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


def find_resume_point(run: Run, calibrator: BnCalibrator) -> ResumePoint | None:
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


class _SnapshotWriter:
    """Writes snapshots of one run (rank 0 only): BN state, JSON with counts and drift, and exact-mode sums."""

    def __init__(self, run: Run, calibrator: BnCalibrator, baseline: dict[str, torch.Tensor], next_index: int):
        self.run, self.calibrator, self.baseline, self.next_index = run, calibrator, baseline, next_index

    def write(self, step: int, total: Tally, state: dict[str, torch.Tensor],
              sums: dict[str, torch.Tensor] | None) -> int:
        index = self.next_index
        meta = {"step": step, "batches": total.batches, "mode": self.calibrator.mode, "images_seen": total.images,
                "skipped": total.skipped, "drift": drift(state, self.baseline)}
        extra = {f"{name}.sums": s.cpu() for name, s in sums.items()} if sums is not None else None
        save_snapshot(self.run.path, index, state, meta, extra)
        self.next_index += 1
        return index


class _SkippedImages:
    """Unreadable images met by this process: the files (a set) and the first few names, for the run's record."""

    def __init__(self, limit: int = 5):
        self.files: set[int] = set()
        self.first: list[str] = []
        self.limit = limit

    def add(self, dataset, indices: list[int]) -> None:
        self.files.update(indices)
        for name in map(dataset.describe, indices):
            if len(self.first) < self.limit and name not in self.first:
                self.first.append(name)


class _Steps:
    """One process's calibration steps: take a batch (noise mixed in, counted), share the statistics over the ranks,
    and write a snapshot when one is due."""

    def __init__(self, *, calibrator: BnCalibrator, mix, tally: Tally, ranks: Ranks, dataset, writer: _SnapshotWriter,
                 length: RunLength, strict_data: bool):
        self.calibrator, self.mix, self.tally, self.ranks = calibrator, mix, tally, ranks
        self.dataset, self.writer, self.length, self.strict_data = dataset, writer, length, strict_data
        self.skipped = _SkippedImages()

    def take(self, batch: LoadedBatch, g: int) -> None:
        """Calibrate on loaded batch `batch`, global batch `g` (the noise seed)."""
        if batch.skipped:
            if self.strict_data:
                self.dataset.load_uint8(batch.skipped[0])  # raises the reader's own error naming the file
                raise BnportError(f"unreadable image: {self.dataset.describe(batch.skipped[0])}",
                                  "fix or remove it, or drop --strict-data")
            self.tally.add(SKIPPED, len(batch.skipped))
            self.skipped.add(self.dataset, batch.skipped)
        if batch.images is not None:
            x, got = self.mix.apply(batch.images, g)
            if x.shape[0] >= 2:  # a batch that unreadable images shrank to one image cannot be used
                self.calibrator.update(x.to(self.ranks.device, non_blocking=True))
                self.tally.add(BATCHES)
                for name, n in got.items():
                    self.tally.add(name, n)
        if self.calibrator.mode == "ema" and self.ranks.active:
            self.calibrator.average_over(self.ranks)

    def snapshot_if_due(self, done_steps: int) -> None:
        """After `done_steps` steps: every rank sums what it has, rank 0 writes (once some batch was calibrated:
        until then a snapshot would only repeat 0000)."""
        if not self.length.snapshot_due(done_steps):
            return
        total = self.tally.total(self.ranks)
        if total.batches == 0:
            return
        sums = None
        if self.calibrator.mode == "exact":
            sums = {name: self.ranks.sum(s.clone()) for name, s in self.calibrator.sums.items()}
        if self.ranks.is_root:
            self.writer.write(done_steps, total, self.calibrator.state(sums, total.batches), sums)


def _manifest(loaded: LoadedModel, dataset, data_src: str | None, mix, length: RunLength, ranks: Ranks, *,
              mode: str, momentum: float | None, batch_size: int, seed: int, workers: int, strict_data: bool) -> dict:
    """run.json of a new run: what was asked (model, input spec, calibration settings) and what was seen (data)."""
    return {
        "format": "bnport-run/1", "command": " ".join(sys.argv), "started": _now(),
        "model": {"spec": portable_spec(loaded.spec), "weights": loaded.weights and str(Path(loaded.weights).resolve()),
                  "weights_sha256": loaded.weights_sha256, "source_sha256": loaded.source_sha256,
                  **loaded.load_options},
        "input_spec": loaded.input_spec.to_dict(),
        "data": {"src": data_src and str(Path(data_src).resolve()), "fingerprint": _fingerprint(dataset)},
        "calibration": {"mode": mode, "momentum": momentum, "batch_size": batch_size,
                        "total_steps": length.total_steps, "total_batches": length.total_batches,
                        "snapshot_every": length.snapshot_every, "seed": seed, "noise": mix.describe(),
                        "world_size": ranks.world, "workers": workers, "strict_data": strict_data},
        "device": str(ranks.device), "versions": _versions(), "status": "running"}


def _open_data(data, spec):
    from bnport.data import open_images

    src = str(data) if isinstance(data, (str, Path)) else None
    dataset = open_images(data, spec) if src is not None else data
    if len(dataset) == 0:
        raise BnportError(f"no images in {src or 'the dataset'}",
                          "point --data at a folder, list, .rec or .bin with images")
    return dataset, src


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def calibrate(loaded: LoadedModel, data, out: str | Path, *, noise: list | None = None, mode: str = "ema",
              momentum: float | None = None, batch_size: int = 32, steps: int | None = None,
              epochs: int | None = None, snapshot_every: int | None = None, seed: int = 0, device: str = "auto",
              workers: int = 2, resume: bool = False, strict_data: bool = False, progress: bool = True,
              log=print) -> CalibrationResult:
    """Recalibrate the BN statistics of `loaded` on `data` (a path, or a dataset yielding (tensor|None, index)).

    Works on a copy of `loaded.module`: the caller's module is left as it was (device, requires_grad flags, mode
    and BN statistics); the results are the snapshots in `out`. `noise`: NoiseSource objects or spec strings.
    `momentum`: ema mode only (None: the model's own). Length: `steps` global steps or `epochs` passes over the data
    (default: 1 epoch). `snapshot_every`: steps between snapshots (default: a tenth of the run, at least 1); the
    last step always gets one. Snapshot 0000 is the baseline. `resume`: continue the run in `out` from its last
    snapshot that is whole (made with the same settings and number of processes); the result equals an
    uninterrupted run. Writes only on rank 0."""
    from bnport.calibrate.noise import NoiseMix, parse_noise

    check_settings(mode=mode, momentum=momentum, batch_size=batch_size, steps=steps, epochs=epochs)
    torch_device, device_note = resolve_torch_device(device)
    ranks = join_process_group(torch_device)
    run = Run(out)
    sources = [parse_noise(s) if isinstance(s, str) else s for s in (noise or [])]
    dataset, data_src = _open_data(data, loaded.input_spec)
    plan = BatchPlan(len(dataset), batch_size, seed)
    length = plan_length(plan.per_epoch, steps=steps, epochs=epochs, world=ranks.world,
                         snapshot_every=snapshot_every)
    mix = NoiseMix(sources, loaded.input_spec, seed=seed)
    manifest = _manifest(loaded, dataset, data_src, mix, length, ranks, mode=mode, momentum=momentum,
                         batch_size=batch_size, seed=seed, workers=workers, strict_data=strict_data)
    check_calibratable(loaded.module)
    check_input_runs(loaded)
    old = check_run_folder(run, manifest, resume=resume)
    ranks.barrier()  # every rank has checked --out before rank 0 writes to it
    if old is None and run.exists() and ranks.is_root:  # a failed run that got no further than its baseline
        for stale in run.snapshots_dir.glob("0000.*"):
            stale.unlink()

    module = copy.deepcopy(loaded.module).to(ranks.device)
    calibrator = BnCalibrator(module, mode=mode, momentum=momentum)
    baseline = bn_state(module)
    check_bn_state(baseline)
    tally = Tally(["data"] + [s.name for s in sources])
    point = find_resume_point(run, calibrator) if old is not None else None
    if point is not None:
        apply_bn_state(module, point.state)
        if ranks.is_root:  # the counts and sums so far; the other ranks add theirs from zero
            tally = Tally.resumed(tally.sources, point.meta)
            for name, s in (point.sums or {}).items():
                calibrator.sums[name].copy_(s)
            for note in point.notes:
                log(note)
    if old is not None:
        manifest.update(started=old["started"], resumed=old.get("resumed", []) + [_now()])
    writer = _SnapshotWriter(run, calibrator, baseline, point.snapshot.index + 1 if point else 0)
    if ranks.is_root:
        run.write_manifest(manifest)
        if point is None:
            writer.write(0, tally, baseline, calibrator.sums if mode == "exact" else None)
    log(device_note + (f", {ranks.world} processes" if ranks.world > 1 else ""))
    if loaded.weights is None and ranks.is_root:
        log(f"note: {loaded.spec} has no --weights: calibrating its seeded random initialisation")

    start_step = point.step if point else 0
    steps_left = range(start_step, length.total_steps)
    sampler = RankBatches(plan, steps_left, rank=ranks.rank, world=ranks.world, total=length.total_batches)
    batches = load_batches(dataset, sampler, workers=workers, pin_memory=ranks.device.type == "cuda")
    work = _Steps(calibrator=calibrator, mix=mix, tally=tally, ranks=ranks, dataset=dataset, writer=writer,
                  length=length, strict_data=strict_data)
    bar = _progress(progress and ranks.is_root, length.total_steps, start_step)
    t0 = time.perf_counter()
    try:
        for step, batch in zip(steps_left, batches):
            work.take(batch, sampler.global_index(step))
            work.snapshot_if_due(step + 1)
            bar.update(1)
            images = sum(tally.images.values())
            bar.set_postfix_str(f"{images} img, {images / max(time.perf_counter() - t0, 1e-9):.0f} img/s")
        total = tally.total(ranks)
        if total.batches == 0:
            raise BnportError(f"no usable batch in {data_src or 'the data'}: {total.skipped} unreadable images "
                              "skipped, nothing was calibrated", "check the images (try --strict-data to see the "
                              "first bad one) or point --data at readable ones")
    except BaseException as err:
        if ranks.is_root:
            manifest.update(status="failed", error=str(err) or type(err).__name__)
            run.write_manifest(manifest)
        raise
    finally:
        bar.close()
        calibrator.close()
    seconds = time.perf_counter() - t0
    skipped = work.skipped
    if ranks.is_root:
        manifest.update(status="complete", finished=_now(),
                        skipped_images={"reads": total.skipped, "files": len(skipped.files), "first": skipped.first})
        run.write_manifest(manifest)
    ranks.close()
    notes = ([f"skipped unreadable ({len(skipped.files)} files): {', '.join(skipped.first)}"]
             if skipped.first else [])
    return CalibrationResult(run_dir=run.path, snapshots=[s.index for s in run.snapshots()] if ranks.is_root else [],
                             images_seen=total.images, skipped=total.skipped, steps=length.total_steps - start_step,
                             seconds=seconds, resumed_from=point.snapshot.index if point else None, notes=notes)


def _progress(enabled: bool, total: int, initial: int):
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (a log file would get every update)
    return tqdm(total=total, initial=initial, disable=None if enabled else True, unit="step", desc="calibrate",
                dynamic_ncols=True, file=sys.stderr)
