"""BatchNorm recalibration: re-estimate running statistics with every parameter frozen, saving snapshots as it goes.

Only BN modules run in train mode (no dropout), under `torch.no_grad`; parameters never change. Two modes:
- `ema`: BN's own momentum update (the model's momentum, or `momentum`), the published technique.
- `exact`: BN normalises with batch statistics as in training, and per-channel float64 sums of n, x and x^2 are
  kept over every image seen, giving the exact pooled mean and unbiased variance, including the spread between
  batch means that averaging per-batch variances (update_bn, AIMET, fvcore) misses. The per-batch statistics come
  from BN's own kernel (momentum 1 makes the running buffers equal the batch's), so the sums cost almost nothing.

Batches are a seeded permutation of the data per epoch; global batch g gets noise seeded by (seed, g). Under
`torchrun` rank r takes batches r, r+W, r+2W, ..., exact mode all-reduces the sums (so it equals the single-process
run over the same batches), ema mode averages the running statistics after every step, and only rank 0 writes.
"""
from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from bnport import __version__
from bnport.device import resolve_torch_device
from bnport.errors import BnportError
from bnport.load import LoadedModel, check_input_runs
from bnport.atomic import atomic_write_json
from bnport.snapshot import (apply_bn_state, bn_modules, bn_state, check_bn_state, drift,
                             list_snapshots, load_resume_state, load_snapshot, read_run, save_snapshot,
                             snapshot_paths)

MODES = ("ema", "exact")


class BnCalibrator:
    """Puts the BN layers of `module` in train mode and accumulates what each mode needs; `state()` reads it out."""

    def __init__(self, module: nn.Module, *, mode: str = "ema", momentum: float | None = None):
        if mode not in MODES:
            raise BnportError(f"unknown mode {mode!r}", "use --mode ema or --mode exact")
        self.module, self.mode = module, mode
        if isinstance(module, torch.jit.ScriptModule):
            raise BnportError("a TorchScript model cannot be recalibrated: its BatchNorm layers are compiled in "
                              "eval mode", "give the architecture as MODEL (e.g. iresnet50 or file.py:factory) "
                              "and the weights with --weights")
        self.bns = bn_modules(module)
        if not self.bns:
            raise BnportError("the model has no BatchNorm layers with running statistics: nothing to calibrate",
                              "check the MODEL spec; bnport calibrates models that use BatchNorm")
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

    def state(self) -> dict[str, torch.Tensor]:
        """BN buffers as they stand: the running buffers (ema) or the pooled statistics of every image seen (exact)."""
        if self.mode == "ema":
            return bn_state(self.module)
        state = bn_state(self.module)  # a layer that has seen fewer than 2 values keeps its buffers
        for name, bn in self.bns:
            n, s1, s2 = self.sums[name][0], self.sums[name][1], self.sums[name][2]
            if float(n[0]) < 2:
                continue
            mean = s1 / n
            var = (s2 - s1 * mean) / (n - 1)
            state[f"{name}.running_mean"] = mean.to(bn.running_mean.dtype).cpu()
            state[f"{name}.running_var"] = var.clamp_min(0).to(bn.running_var.dtype).cpu()
            state[f"{name}.num_batches_tracked"] = torch.tensor(self.batches, dtype=torch.long)
        return state

    def close(self) -> None:
        """Leave the module as found (eval mode, own momenta) but holding the calibrated statistics."""
        if self.mode == "exact":
            apply_bn_state(self.module, self.state())
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for (_, bn), momentum in zip(self.bns, self._momenta):
            bn.momentum = momentum
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


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> bool:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); gloo on CPU, nccl on CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def global_batches(n_items: int, batch_size: int, seed: int, first: int, count: int) -> list[list[int]]:
    """Global batches first .. first+count-1 of the endless sequence: a seeded permutation per epoch, cut into
    batches of `batch_size`. The last one of an epoch may be smaller; a last one of a single image joins the one
    before it (BatchNorm needs two values per channel), so every image of an epoch is used."""
    per_epoch = batches_per_epoch(n_items, batch_size)
    out, cache = [], {}
    for g in range(first, first + count):
        epoch, k = divmod(g, per_epoch)
        if epoch not in cache:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache = {epoch: torch.randperm(n_items, generator=gen).tolist()}
        end = (k + 1) * batch_size if k < per_epoch - 1 else n_items
        out.append(cache[epoch][k * batch_size:end])
    return out


def batches_per_epoch(n_items: int, batch_size: int) -> int:
    per_epoch = math.ceil(n_items / batch_size)
    return per_epoch - 1 if per_epoch > 1 and n_items % batch_size == 1 else per_epoch


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
    return fp() if callable(fp) else {"kind": type(dataset).__name__, "count": len(dataset)}


def _versions() -> dict:
    import numpy
    import torchvision

    return {"bnport": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def _identity(run: dict) -> dict:
    """The settings a resumed run must share with the original."""
    c = run["calibration"]
    return {"model": {k: run["model"].get(k) for k in ("spec", "weights_sha256", "source_sha256")},
            "input_spec": run["input_spec"], "data": run["data"].get("fingerprint"),
            "calibration": {k: c.get(k) for k in ("mode", "momentum", "batch_size", "total_steps", "snapshot_every",
                                                  "seed", "noise")}}


def calibrate(loaded: LoadedModel, data, out: str | Path, *, noise: list | None = None, mode: str = "ema",
              momentum: float | None = None, batch_size: int = 32, steps: int | None = None,
              epochs: int | None = None, snapshot_every: int | None = None, seed: int = 0, device: str = "auto",
              workers: int = 2, resume: bool = False, strict_data: bool = False, progress: bool = True,
              log=print) -> CalibrationResult:
    """Recalibrate the BN statistics of `loaded` on `data` (a path, or a dataset yielding (tensor|None, index)).

    `noise`: NoiseSource objects or spec strings. Length: `steps` global steps or `epochs` passes over the data
    (default: 1 epoch). `snapshot_every`: steps between snapshots (default: a tenth of the run, at least 1); the
    last step always gets one. Snapshot 0000 is the baseline. `resume`: continue the run in `out` from its last
    complete snapshot; the result equals an uninterrupted run. Writes only on rank 0."""
    from torch.utils.data import DataLoader

    from bnport.data import collate_images, open_images
    from bnport.noise import NoiseMix, parse_noise

    if batch_size < 2:
        raise BnportError(f"batch size must be at least 2, got {batch_size} (BatchNorm needs two values per channel)",
                          "use e.g. --batch-size 32")
    if steps is not None and epochs is not None:
        raise BnportError("give --steps or --epochs, not both", "steps count batches, epochs passes over the data")
    torch_device, device_note = resolve_torch_device(device)
    joined = init_distributed(torch_device)
    rank, world = _dist_info()
    if torch_device.type == "cuda" and world > 1:
        torch_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    out = Path(out)
    spec = loaded.input_spec
    sources = [parse_noise(s) if isinstance(s, str) else s for s in (noise or [])]
    data_src = str(data) if isinstance(data, (str, Path)) else None
    dataset = open_images(data, spec) if data_src is not None else data
    if len(dataset) == 0:
        raise BnportError(f"no images in {data_src}", "point --data at a folder, list, .rec or .bin with images")
    per_epoch = batches_per_epoch(len(dataset), batch_size)
    total_batches = steps * world if steps is not None else (epochs or 1) * per_epoch
    total_steps = math.ceil(total_batches / world)
    snapshot_every = snapshot_every or max(1, total_steps // 10)
    mix = NoiseMix(sources, spec, seed=seed)

    run = {"format": "bnport-run/1", "command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "model": {"spec": portable_spec(loaded.spec),
                     "weights": loaded.weights and str(Path(loaded.weights).resolve()),
                     "weights_sha256": loaded.weights_sha256, "source_sha256": loaded.source_sha256,
                     **loaded.load_options},
           "input_spec": spec.to_dict(),
           "data": {"src": data_src and str(Path(data_src).resolve()), "fingerprint": _fingerprint(dataset)},
           "calibration": {"mode": mode, "momentum": momentum, "batch_size": batch_size, "total_steps": total_steps,
                           "total_batches": total_batches, "snapshot_every": snapshot_every, "seed": seed,
                           "noise": mix.describe(), "world_size": world, "workers": workers,
                           "strict_data": strict_data},
           "device": str(torch_device), "versions": _versions(), "status": "running"}

    check_input_runs(loaded)
    if out.exists() and not out.is_dir():
        raise BnportError(f"{out} exists and is not a folder", "choose another --out")
    if (out / "run.json").is_file() and not resume:
        if read_run(out).get("status") != "failed" or list_snapshots(out) != [0]:
            raise BnportError(f"{out} already holds a run", "pass --resume to continue it, or choose another --out")
        if rank == 0:  # a failed run that got no further than its baseline is replaced
            for stale in (out / "snapshots").glob("0000.*"):
                stale.unlink()
    if resume:
        if not (out / "run.json").is_file():
            raise BnportError(f"nothing to resume in {out} (no run.json)", "drop --resume to start a new run")
        old = read_run(out)
        if _identity(old) != _identity(run):
            raise BnportError(f"{out} was made with other settings (model, data, input spec or calibration)",
                              "resume with the same command line, or choose another --out")
    if world > 1:
        dist.barrier()  # every rank has checked --out before rank 0 writes to it

    module = loaded.module.to(torch_device)
    calibrator = BnCalibrator(module, mode=mode, momentum=momentum)
    baseline = bn_state(module)
    check_bn_state(baseline)
    keys = list(dict.fromkeys(["data"] + [s.name for s in sources]))
    counts = torch.zeros(len(keys) + 2, dtype=torch.float64)  # images per source, then skipped images, then batches
    start_step, index, resumed_from = 0, 0, None

    if resume:
        done = list_snapshots(out)
        if done:
            index = resumed_from = done[-1]
            state, meta = load_snapshot(snapshot_paths(out, index)[0])
            apply_bn_state(module, state)
            start_step = int(meta["step"])
            baseline = load_snapshot(snapshot_paths(out, 0)[0])[0]
            if rank == 0:
                counts[:-2] = torch.tensor([float(meta["images_seen"].get(k, 0)) for k in keys])
                counts[-2] = float(meta.get("skipped", 0))
                counts[-1] = float(meta.get("batches", 0))
                if mode == "exact":
                    extra = load_resume_state(out, index)
                    for name in calibrator.sums:
                        calibrator.sums[name].copy_(extra[f"{name}.sums"].to(calibrator.sums[name].device))
        run["started"] = old["started"]
        run["resumed"] = old.get("resumed", []) + [time.strftime("%Y-%m-%dT%H:%M:%S%z")]

    def write_snapshot(i: int, step: int, total_counts: torch.Tensor, state: dict) -> None:
        meta = {"step": step, "batches": int(total_counts[-1]), "mode": mode,
                "images_seen": {k: int(total_counts[j]) for j, k in enumerate(keys)},
                "skipped": int(total_counts[-2]), "drift": drift(state, baseline)}
        extra = None
        if mode == "exact":
            extra = {f"{name}.sums": s.cpu() for name, s in calibrator.sums.items()}
        save_snapshot(out, i, state, meta, extra)

    if rank == 0:
        atomic_write_json(out / "run.json", run)
        if index == 0 and not list_snapshots(out):
            write_snapshot(0, 0, counts, baseline)
    log(device_note + (f", {world} processes" if world > 1 else ""))
    if loaded.weights is None and rank == 0:
        log(f"note: {loaded.spec} has no --weights: calibrating its seeded random initialisation")

    rounds = range(start_step, total_steps)
    loader = DataLoader(dataset, batch_sampler=_RankBatches(len(dataset), batch_size, seed, rounds, rank, world,
                                                            total_batches),
                        num_workers=workers, collate_fn=collate_images, persistent_workers=False,
                        pin_memory=torch_device.type == "cuda")
    bar = _progress(progress and rank == 0, total_steps, start_step)
    t0 = time.perf_counter()
    skipped_names: list[str] = []
    skipped_files: set[int] = set()
    step = start_step
    try:
        for step, (images, _indices, skipped, g) in zip(rounds, _with_global(loader, rounds, rank, world)):
            if skipped:
                if strict_data:
                    dataset.load_uint8(skipped[0])  # raises the reader's own error naming the file
                    raise BnportError(f"unreadable image: {dataset.describe(skipped[0])}",
                                      "fix or remove it, or drop --strict-data")
                counts[-2] += len(skipped)
                skipped_files.update(skipped)
                new = [n for n in map(dataset.describe, skipped) if n not in skipped_names]
                skipped_names += new[:5 - len(skipped_names)]
            if images is not None and images.numel():
                x, got = mix.apply(images, g)
                if x.shape[0] >= 2:  # a batch that unreadable images shrank to one image cannot be used
                    calibrator.update(x.to(torch_device, non_blocking=True))
                    counts[-1] += 1
                    for k, v in got.items():
                        counts[keys.index(k)] += v
            if world > 1 and mode == "ema":
                for _, bn in calibrator.bns:
                    for buf in (bn.running_mean, bn.running_var):
                        dist.all_reduce(buf)
                        buf /= world
            done_steps = step + 1
            total_counts = None
            if done_steps % snapshot_every == 0 or done_steps == total_steps:
                total_counts = counts.clone()
                if world > 1:
                    dist.all_reduce(total_counts)
            # until some batch was calibrated, a snapshot would only repeat 0000
            if total_counts is not None and int(total_counts[-1]) > 0:
                if world > 1:
                    if mode == "exact":
                        for s in calibrator.sums.values():
                            dist.all_reduce(s)
                            if rank != 0:
                                s.zero_()
                    counts.copy_(total_counts if rank == 0 else torch.zeros_like(counts))
                index += 1
                calibrator.batches = int(total_counts[-1])
                if rank == 0:
                    write_snapshot(index, done_steps, total_counts, calibrator.state())
            bar.update(1)
            images_done = int(counts[:-2].sum())
            bar.set_postfix_str(f"{images_done} img, {images_done / max(time.perf_counter() - t0, 1e-9):.0f} img/s")
        if world > 1:
            dist.all_reduce(counts)
        if int(counts[-1]) == 0:
            raise BnportError(f"no usable batch in {data_src or 'the data'}: {int(counts[-2])} unreadable images "
                              "skipped, nothing was calibrated", "check the images (try --strict-data to see the "
                              "first bad one) or point --data at readable ones")
    except BaseException as err:
        if rank == 0:
            run.update(status="failed", error=str(err) or type(err).__name__)
            atomic_write_json(out / "run.json", run)
        raise
    finally:
        bar.close()
        calibrator.close()
    seconds = time.perf_counter() - t0
    if rank == 0:
        run["status"] = "complete"
        run["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        run["skipped_images"] = {"reads": int(counts[-2]), "files": len(skipped_files), "first": skipped_names}
        atomic_write_json(out / "run.json", run)
    if joined:
        dist.barrier()
        dist.destroy_process_group()
    notes = [f"skipped unreadable ({len(skipped_files)} files): {', '.join(skipped_names)}"] if skipped_names else []
    return CalibrationResult(run_dir=out, snapshots=list_snapshots(out) if rank == 0 else [],
                             images_seen={k: int(counts[j]) for j, k in enumerate(keys)}, skipped=int(counts[-2]),
                             steps=total_steps - start_step, seconds=seconds, resumed_from=resumed_from, notes=notes)


class _RankBatches:
    """Batch sampler: for each step in `rounds`, this rank's global batch (step * world + rank), if it exists."""

    def __init__(self, n: int, batch_size: int, seed: int, rounds: range, rank: int, world: int, total: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rounds, self.rank, self.world, self.total = rounds, rank, world, total

    def __iter__(self):
        for step in self.rounds:
            g = step * self.world + self.rank
            yield global_batches(self.n, self.batch_size, self.seed, g, 1)[0] if g < self.total else []

    def __len__(self) -> int:
        return len(self.rounds)


def _with_global(loader, rounds: range, rank: int, world: int):
    """Pair each loaded batch with its global batch index (the noise seed); an empty batch yields images None."""
    for step, (images, indices, skipped) in zip(rounds, loader):
        yield (images if images.numel() else None), indices, skipped, step * world + rank


def _progress(enabled: bool, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", desc="calibrate", dynamic_ncols=True,
                file=sys.stderr)
