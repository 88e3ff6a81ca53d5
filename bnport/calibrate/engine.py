"""BatchNorm recalibration: re-estimate running statistics with every parameter frozen, saving snapshots as it goes.

Parameters never change and no gradient is computed (`torch.no_grad`); dropout stays in eval mode. Three modes:
- `ema`: BN's own momentum update (the model's momentum, or `momentum`), the published technique; BN in train mode.
- `exact`: BN normalises with batch statistics as in training, and per-channel float64 sums of n, x and x^2 are
  kept over every image seen, giving the exact pooled mean and unbiased variance, including the spread between
  batch means that averaging per-batch variances (update_bn, AIMET, fvcore) misses. The per-batch statistics come
  from BN's own kernel (momentum 1 makes the running buffers equal the batch's), so the sums cost almost nothing.
- `sequential`: exact pooled statistics measured layer by layer with every earlier BN already in eval mode with its
  new statistics, so each layer's statistics are those of the activations the exported model feeds it
  (bnport.calibrate.sequential: how, what it costs, and why it writes one snapshot).

`calibrate` reads as the steps of a run: join the process group (bnport.runtime.distributed), open the data and plan
its batches (bnport.calibrate.sampler), record the run and check its folder (bnport.calibrate.run_record), find where
a resumed run continues, then calibrate batch by batch (sequential: read the batches, then layer by layer), counting
in a `Tally` (bnport.calibrate.tally) and writing snapshots, each with its consistency figure
(bnport.calibrate.consistency). The settings come checked (bnport.calibrate.settings). Under `torchrun` rank r takes
global batches r, r+W, r+2W, ..., exact and sequential mode sum over ranks (so they equal the single-process run over
the same batches), ema mode averages the running statistics after every step, and only rank 0 writes.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from bnport.calibrate.consistency import HeldOut, bn_consistency, holding
from bnport.calibrate.run_record import (check_run_folder, find_resume_point, new_manifest, now, open_data)
from bnport.calibrate.sampler import BatchPlan, LoadedBatch, RankBatches, load_batches
from bnport.calibrate.sequential import (PROGRESS, PROGRESS_SECONDS, BatchSet, SequentialCalibrator, load_progress,
                                         memory_budget, save_progress)
from bnport.calibrate.settings import MODES, CalibrationSettings, RunLength
from bnport.calibrate.tally import BATCHES, SKIPPED, Tally
from bnport.errors import BnportError
from bnport.model.load import LoadedModel, check_input_runs
from bnport.model.snapshot import apply_bn_state, bn_modules, bn_state, check_bn_state, drift, save_snapshot
from bnport.runs import Run
from bnport.runtime.device import copy_on, resolve_torch_device
from bnport.runtime.distributed import Ranks, join_process_group

__all__ = ["MODES", "BnCalibrator", "CalibrationResult", "calibrate", "check_calibratable"]


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
    """Puts the BN layers of `module` in train mode and accumulates what `settings.mode` needs (its momentum, for ema);
    `state()` reads it out. In sequential mode the BN layers stay in eval mode and the statistics are written into
    their buffers layer by layer (bnport.calibrate.sequential.SequentialCalibrator); `update` does not apply.

    Works on `module` in place (parameters frozen while it runs); `close()` puts back its eval mode, BN momenta and
    requires_grad flags, leaving the calibrated statistics in its BN buffers."""

    def __init__(self, module: nn.Module, settings: CalibrationSettings | None = None):
        settings = settings or CalibrationSettings()
        mode, momentum = settings.mode, settings.momentum
        self.module, self.mode = module, mode
        self.bns = check_calibratable(module)
        self._requires_grad = [(p, p.requires_grad) for p in module.parameters()]
        for p in module.parameters():
            p.requires_grad_(False)
        module.eval()
        self._momenta = [bn.momentum for _, bn in self.bns]
        for _, bn in self.bns:
            if mode == "sequential":
                continue
            bn.train()
            if mode == "exact":
                bn.momentum = 1.0
            elif momentum is not None:
                bn.momentum = momentum
        self.batches = 0
        self._hooks = []
        self.sums: dict[str, torch.Tensor] = {}
        self._positions: torch.Tensor | None = None  # values per image, per channel of every BN (fused exact mode)
        self._calls: dict[str, int] = {}  # the first step's calls per BN
        self._values: dict[str, int] = {}  # values per channel a BN saw in its last call (batch x positions)
        if mode == "exact":
            device = self.bns[0][1].running_mean.device
            widths = [bn.num_features for _, bn in self.bns]
            # one float64 (n, sum x, sum x^2) table for every channel of every BN; `sums` are its per-layer views
            self._flat = torch.zeros(3, sum(widths), dtype=torch.float64, device=device)
            self.sums = dict(zip((name for name, _ in self.bns), self._flat.split(widths, dim=1)))
            self._hooks = [bn.register_forward_hook(self._accumulate(name)) for name, bn in self.bns]

    def _accumulate(self, name: str):
        """Per-call accumulation, used on the first step (which also counts each BN's calls and values per image)
        and for good when a BN runs at several sites of one forward."""
        sums, calls, values = self.sums, self._calls, self._values

        def hook(bn: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not bn.training:  # an eval-mode forward of the consistency figure, not a calibration step
                return
            x = inputs[0]
            n = x.numel() // x.shape[1]
            calls[name] = calls.get(name, 0) + 1
            values[name] = n
            mean = bn.running_mean.double()  # momentum 1: the running buffers now hold this batch's statistics
            var = bn.running_var.double()    # unbiased
            sums[name].add_(torch.stack([torch.full_like(mean, n), n * mean, (n - 1) * var + n * mean * mean]))
        return hook

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if self.mode == "sequential":
            raise ValueError("sequential mode calibrates layer by layer: use SequentialCalibrator")
        self.module(x)
        self.batches += 1
        if self.mode != "exact":
            return
        if self._positions is not None:
            self._fused_update(x.shape[0])
        elif self.batches == 1 and all(self._calls.get(name, 0) <= 1 for name, _ in self.bns):
            self._fuse(x.shape[0])

    def _fuse(self, batch: int) -> None:
        """After the first step, when every BN ran at most once: from now on one float64 update per step for every
        channel of every BN, read from the running buffers (momentum 1: this step's statistics), instead of a hook
        per BN; the per-image value counts are the first step's."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        per_image = [self._values.get(name, 0) / batch for name, _ in self.bns]
        self._positions = torch.cat([torch.full((bn.num_features,), p, dtype=torch.float64)
                                     for p, (_, bn) in zip(per_image, self.bns)]).to(self._flat.device)

    def _fused_update(self, batch: int) -> None:
        mean = torch.cat([bn.running_mean for _, bn in self.bns]).double()
        var = torch.cat([bn.running_var for _, bn in self.bns]).double()
        n = self._positions * batch  # 0 for a BN the forward never calls: its sums stay 0
        self._flat.add_(torch.stack([n, n * mean, (n - 1).clamp_min(0) * var + n * mean * mean]))

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
        if self.mode != "exact":  # ema and sequential: the buffers are the statistics
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


class _SnapshotWriter:
    """Writes snapshots of one run (rank 0 only): BN state, JSON with counts, drift and the figures `notes` give, and
    exact-mode sums."""

    def __init__(self, run: Run, calibrator: BnCalibrator, baseline: dict[str, torch.Tensor], next_index: int):
        self.run, self.calibrator, self.baseline, self.next_index = run, calibrator, baseline, next_index

    def write(self, step: int, total: Tally, state: dict[str, torch.Tensor], sums: dict[str, torch.Tensor] | None,
              notes: dict | None = None) -> int:
        index = self.next_index
        meta = {"step": step, "batches": total.batches, "mode": self.calibrator.mode, "images_seen": total.images,
                "skipped": total.skipped, "drift": drift(state, self.baseline), **(notes or {})}
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


@dataclass
class _Sources:
    """Where a run's images come from besides its own loader: `held_out` makes the held-out batches of the
    consistency figure (called once, when the first snapshot is written: inside the run, so a read error there
    fails the run as any other), `reread` a fresh loader over the run's own batches."""

    held_out: object
    reread: object
    consistency: str


class _Steps:
    """One process's calibration steps: take a batch (noise mixed in, counted), share the statistics over the ranks,
    and write a snapshot when one is due, with its consistency figure."""

    def __init__(self, *, calibrator: BnCalibrator, mix, tally: Tally, ranks: Ranks, dataset, writer: _SnapshotWriter,
                 length: RunLength, strict_data: bool, start_step: int, resumed_from: int | None, sources: _Sources,
                 baseline: dict[str, torch.Tensor], new: bool):
        self.calibrator, self.mix, self.tally, self.ranks = calibrator, mix, tally, ranks
        self.dataset, self.writer, self.length, self.strict_data = dataset, writer, length, strict_data
        self.start_step, self.resumed_from, self.sources, self.new = start_step, resumed_from, sources, new
        self.baseline = baseline
        self.skipped = _SkippedImages()
        self.held_out: HeldOut | None = None
        self.notes: dict = {}  # more entries for the last snapshot's JSON (sequential: what ran)
        self.calibration_batches = self.run_batches  # the run's own images, for the figure on them

    def admit(self, batch: LoadedBatch) -> torch.Tensor | None:
        """Batch `batch` (its noise mixed in by the loader) counted, its unreadable images dealt with; its images
        when it can be calibrated on (a batch that unreadable images shrank to one image cannot)."""
        if batch.skipped:
            if self.strict_data:
                self.dataset.load_uint8(batch.skipped[0])  # raises the reader's own error naming the file
                raise BnportError(f"unreadable image: {self.dataset.describe(batch.skipped[0])}",
                                  "fix or remove it, or drop --strict-data")
            self.tally.add(SKIPPED, len(batch.skipped))
            self.skipped.add(self.dataset, batch.skipped)
        if batch.images is None or batch.images.shape[0] < 2:
            return None
        self.tally.add(BATCHES)
        for name, n in (batch.counts or {}).items():
            self.tally.add(name, n)
        return batch.images

    def take(self, batch: LoadedBatch) -> None:
        """Calibrate on loaded batch `batch`."""
        x = self.admit(batch)
        if x is not None:
            self.calibrator.update(x.to(self.ranks.device, non_blocking=True))
        if self.calibrator.mode == "ema" and self.ranks.active:
            self.calibrator.average_over(self.ranks)

    def run_batches(self):
        """This process's batches of the run, read again (the same images and noise), as tensors."""
        return (b.images for b in self.sources.reread() if b.images is not None and b.images.shape[0] >= 2)

    def figures(self, state: dict[str, torch.Tensor], *, last: bool) -> dict:
        """The snapshot's consistency entry for BN state `state`: on the held-out batches, and with `full` on the
        last snapshot over the run's own images too. Every rank calls it together."""
        if self.sources.consistency == "off":
            return {}
        module = self.calibrator.module
        if self.held_out is None:
            self.held_out = self.sources.held_out()
        out = {"held_out": self.held_out.figure(module, state, self.ranks)}
        if last and self.sources.consistency == "full":
            with holding(module, state):
                out["calibration"] = bn_consistency(module, self.calibration_batches(), self.ranks)
        return {"consistency": out}

    def write_baseline(self) -> None:
        """Snapshot 0000 of a new run (its figure measured by every rank, written by rank 0)."""
        if not self.new:
            return
        notes = self.figures(self.baseline, last=False)
        if self.ranks.is_root:
            sums = self.calibrator.sums if self.calibrator.mode == "exact" else None
            self.writer.write(0, self.tally, self.baseline, sums, notes)

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
        state = self.calibrator.state(sums, total.batches)
        last = done_steps == self.length.total_steps
        notes = {**self.figures(state, last=last), **(self.notes if last else {})}
        if self.ranks.is_root:
            self.writer.write(done_steps, total, state, sums, notes)


def calibrate(loaded: LoadedModel, data, out: str | Path, settings: CalibrationSettings | None = None, *,
              device: str = "auto", resume: bool = False, progress: bool = True, log=print) -> CalibrationResult:
    """Recalibrate the BN statistics of `loaded` on `data` (a path, or a dataset yielding (tensor|None, index)) as
    `settings` say (None: CalibrationSettings(), ema over one epoch), snapshots written to the run folder `out`.

    Works on a copy of `loaded.module`: the caller's module is left as it was (device, requires_grad flags, mode
    and BN statistics). Snapshot 0000 is the baseline. `device`: auto|cpu|cuda. `resume`: continue the run in `out`
    from its last snapshot that is whole (made with the same settings and number of processes); the result equals
    an uninterrupted run. Writes only on rank 0."""
    from bnport.calibrate.noise import NoiseMix

    settings = settings or CalibrationSettings()
    torch_device, device_note = resolve_torch_device(device)
    ranks = join_process_group(torch_device)
    run = Run(out)
    dataset, data_src = open_data(data, loaded.input_spec)
    plan = BatchPlan(len(dataset), settings.batch_size, settings.seed)
    length = settings.length(plan.per_epoch, ranks.world)
    mix = NoiseMix(settings.sources(), loaded.input_spec, seed=settings.seed)
    manifest = new_manifest(loaded, dataset, data_src, mix, length, world=ranks.world, device=ranks.device,
                            settings=settings)
    check_calibratable(loaded.module)
    old = check_run_folder(run, manifest, resume=resume)
    ranks.barrier()  # every rank has checked --out before rank 0 writes to it
    if old is None and run.exists() and ranks.is_root:  # a failed run that got no further than its baseline
        for stale in [*run.snapshots_dir.glob("0000.*"), run.path / PROGRESS]:
            stale.unlink(missing_ok=True)
    module = copy_on(loaded.module, ranks.device)
    check_input_runs(dataclasses.replace(loaded, module=module))  # on the calibration device: one quick forward
    calibrator = BnCalibrator(module, settings)
    sampler = RankBatches(plan, range(length.total_steps), rank=ranks.rank, world=ranks.world,
                          total=length.total_batches)
    pin = ranks.device.type == "cuda"
    sources = _Sources(
        held_out=lambda: HeldOut(dataset, BatchPlan(len(dataset), settings.batch_size, settings.seed),
                                 length.total_batches, mix, ranks),
        reread=lambda: load_batches(dataset, sampler, workers=settings.workers, pin_memory=pin, mix=mix),
        consistency=settings.consistency)
    work = _start(run, calibrator, manifest, old, ranks, mix=mix, dataset=dataset, length=length, settings=settings,
                  sources=sources, log=log)
    log(device_note + (f", {ranks.world} processes" if ranks.world > 1 else ""))
    if loaded.weights is None and ranks.is_root:
        log(f"note: {loaded.spec} has no --weights: calibrating its seeded random initialisation")
    steps = RankBatches(plan, range(work.start_step, length.total_steps), rank=ranks.rank, world=ranks.world,
                        total=length.total_batches)
    batches = load_batches(dataset, steps, workers=settings.workers, pin_memory=pin, mix=mix)
    began = time.perf_counter()
    if settings.mode == "sequential":
        probe = torch.randn(2, 3, *loaded.input_spec.size, generator=torch.Generator().manual_seed(0))
        body = functools.partial(_sequential_steps, work, batches, probe=probe, progress=progress)
    else:
        body = functools.partial(_batch_steps, work, steps, batches, progress=progress)
    total = _run_guarded(work, manifest, body, data_src=data_src)
    seconds = time.perf_counter() - began
    skipped = work.skipped
    if ranks.is_root:
        manifest.update(status="complete", finished=now(),
                        skipped_images={"reads": total.skipped, "files": len(skipped.files), "first": skipped.first})
        run.write_manifest(manifest)
    ranks.close()
    notes = ([f"skipped unreadable ({len(skipped.files)} files): {', '.join(skipped.first)}"]
             if skipped.first else [])
    return CalibrationResult(run_dir=run.path, snapshots=[s.index for s in run.snapshots()] if ranks.is_root else [],
                             images_seen=total.images, skipped=total.skipped,
                             steps=length.total_steps - work.start_step, seconds=seconds,
                             resumed_from=work.resumed_from, notes=notes)


def _start(run: Run, calibrator: BnCalibrator, manifest: dict, old: dict | None, ranks: Ranks, *, mix, dataset,
           length: RunLength, settings: CalibrationSettings, sources: _Sources, log) -> "_Steps":
    """The steps of this process, from the baseline or from where the run in `run` stopped; rank 0 writes the
    manifest (the baseline snapshot of a new run is written when the run starts: `_run_guarded`)."""
    module = calibrator.module
    baseline = bn_state(module)
    check_bn_state(baseline)
    tally = Tally(["data"] + [s.name for s in mix.sources])
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
        manifest.update(started=old["started"], resumed=old.get("resumed", []) + [now()])
    writer = _SnapshotWriter(run, calibrator, baseline, point.snapshot.index + 1 if point else 0)
    if ranks.is_root:
        run.write_manifest(manifest)
    return _Steps(calibrator=calibrator, mix=mix, tally=tally, ranks=ranks, dataset=dataset, writer=writer,
                  length=length, strict_data=settings.strict_data, start_step=point.step if point else 0,
                  resumed_from=point.snapshot.index if point else None, sources=sources, baseline=baseline,
                  new=point is None)


def _run_guarded(work: "_Steps", manifest: dict, body, *, data_src: str | None) -> Tally:
    """The baseline of a new run, then `body` (every step of this process); the totals over every rank. A failure is
    recorded in the manifest (rank 0) before it is raised; the calibrator gives the module back in any case."""
    ranks = work.ranks
    try:
        work.write_baseline()
        body()
        total = work.tally.total(ranks)
        if total.batches == 0:
            raise BnportError(f"no usable batch in {data_src or 'the data'}: {total.skipped} unreadable images "
                              "skipped, nothing was calibrated", "check the images (try --strict-data to see the "
                              "first bad one) or point --data at readable ones")
    except BaseException as err:
        if ranks.is_root:
            manifest.update(status="failed", error=str(err) or type(err).__name__)
            work.writer.run.write_manifest(manifest)
        raise
    finally:
        work.calibrator.close()
    return total


def _batch_steps(work: "_Steps", sampler: RankBatches, batches, *, progress: bool) -> None:
    """ema and exact: every step of this process, batch by batch, with a progress bar."""
    ranks, tally = work.ranks, work.tally
    bar = _progress(progress and ranks.is_root, work.length.total_steps, work.start_step)
    began = time.perf_counter()
    try:
        for step, batch in zip(sampler.steps, batches):
            work.take(batch)
            work.snapshot_if_due(step + 1)
            bar.update(1)
            images = sum(tally.images.values())
            bar.set_postfix_str(f"{images} img, {images / max(time.perf_counter() - began, 1e-9):.0f} img/s")
    finally:
        bar.close()


def _sequential_steps(work: "_Steps", batches, *, probe: torch.Tensor, progress: bool) -> None:
    """sequential: read this process's batches (held on the host when they fit), then calibrate layer by layer,
    recording progress after a layer once `PROGRESS_SECONDS` have passed since the last record (rank 0), and write
    the one snapshot. A resumed run continues after the layers its progress file holds; one whose snapshot exists
    has nothing left to do."""
    ranks, length = work.ranks, work.length
    module, run_dir = work.calibrator.module, work.writer.run.path
    if work.start_step >= length.total_steps:  # killed after its snapshot, before its progress file was removed
        if ranks.is_root:
            (run_dir / PROGRESS).unlink(missing_ok=True)
        return
    host = memory_budget(torch.device("cpu"))
    held = BatchSet(_progress_over(batches, progress and ranks.is_root, length.total_steps, "read"), work.admit,
                    work.sources.reread, host)
    total = work.tally.total(ranks)
    if total.batches == 0:
        return
    saved = None if work.new else load_progress(run_dir)
    if saved is not None:
        apply_bn_state(module, saved[0])
    budget = host if ranks.device.type == "cpu" else memory_budget(ranks.device)
    layers = SequentialCalibrator(module, ranks, probe, budget=budget)
    bar = _progress(progress and ranks.is_root, len(layers.layers), saved[1] if saved else 0, unit="layer")
    last_save = [time.perf_counter()]

    def after_layer(done: int) -> None:
        bar.update(1)
        if ranks.is_root and time.perf_counter() - last_save[0] >= PROGRESS_SECONDS and done < len(layers.layers):
            save_progress(run_dir, bn_state(module), done)
            last_save[0] = time.perf_counter()

    try:
        layers.run(held, total_batches=total.batches, done=saved[1] if saved else 0, after_layer=after_layer)
    finally:
        bar.close()
    work.notes = {"sequential": layers.report}
    work.calibration_batches = lambda: iter(held)
    work.snapshot_if_due(length.total_steps)
    if ranks.is_root:
        (run_dir / PROGRESS).unlink(missing_ok=True)


def _progress_over(items, enabled: bool, total: int, desc: str):
    """`items`, with a progress bar while they are taken."""
    bar = _progress(enabled, total, 0, unit="batch", desc=desc)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()


def _progress(enabled: bool, total: int, initial: int, *, unit: str = "step", desc: str = "calibrate"):
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (a log file would get every update)
    return tqdm(total=total, initial=initial, disable=None if enabled else True, unit=unit, desc=desc,
                dynamic_ncols=True, file=sys.stderr)
