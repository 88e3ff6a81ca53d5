"""Calibration throughput against its limit: a train-mode no-grad forward over the same preloaded tensors.

Usage: python tests/benchmarks/bench_calibrate.py [--model iresnet50] [--batch-size 32] [--batches 6|40,160]
       [--mode ema|exact|sequential] [--device cpu|cuda] [--workers N] [--consistency off|held-out|full]

Prints images/s of the raw loop (BN layers in train mode, torch.no_grad, tensors already in the device's memory: the
most any calibration can do) and of `bnport.calibrate.engine.calibrate` on the same tensors (data loader, copy to the
device, noise mixing, statistics, snapshot writing included), each the best of `--repeats` alternating rounds, on
`--device` (default cpu; cuda times are taken after torch.cuda.synchronize), with bnport's default loader workers
unless `--workers`. Targets: >= 0.95 on CPU for iresnet50 at 112x112, batch 32; on CUDA (--batches 40,160) ema
>= 0.90 and exact >= 0.85 at both counts. With two counts it also prints the per-step and per-call costs.

`--mode sequential` (issue 16) also times exact mode on the same images in the same alternating rounds and prints
"sequential / exact wall: X (target <= 3)": what measuring each layer on the deployed model's activations costs
over exact mode's one train-mode pass. The consistency figure is left out of every timing (`--consistency off`, the
default here; bnport's own default, held-out, adds an eval-mode forward over 4 batches per snapshot).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from bnport.calibrate.engine import calibrate
from bnport.calibrate.settings import MODES, CalibrationSettings
from bnport.model.load import load_model


class PreloadedImages(torch.utils.data.Dataset):
    """Already-normalised tensors, yielded the way bnport's readers yield decoded images."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], i

    def describe(self, i: int) -> str:
        return f"preloaded#{i}"

    def fingerprint(self) -> dict:
        return {"kind": "preloaded", "count": len(self.images)}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def raw_forward(model: torch.nn.Module, batches: list[torch.Tensor], device: str) -> float:
    model.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train()
    synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            model(x)
    synchronize(device)
    return time.perf_counter() - t0


def bnport_calibrate(loaded, images: torch.Tensor, batch_size: int, mode: str, device: str,
                     workers: int | None, consistency: str = "off") -> float:
    n_batches = len(images) // batch_size
    settings = CalibrationSettings(mode=mode, batch_size=batch_size, steps=n_batches, consistency=consistency,
                                   snapshot_every=None if mode == "sequential" else n_batches)
    if workers is not None:
        settings = dataclasses.replace(settings, workers=workers)
    with tempfile.TemporaryDirectory() as tmp:
        synchronize(device)
        t0 = time.perf_counter()
        calibrate(loaded, PreloadedImages(images), Path(tmp) / "run", settings, device=device, progress=False,
                  log=lambda m: None)
        synchronize(device)
        return time.perf_counter() - t0


def measure(loaded, args, n_batches: int) -> tuple[float, float, float, float | None]:
    """(raw img/s, bnport img/s, bnport seconds, exact-mode seconds when --mode sequential) over `n_batches` batches,
    best of --repeats alternating rounds."""
    h, w = loaded.input_spec.size
    images = torch.randn(args.batch_size * n_batches, 3, h, w, generator=torch.Generator().manual_seed(0))
    batches = [images[i * args.batch_size:(i + 1) * args.batch_size].contiguous().to(args.device)
               for i in range(n_batches)]
    raw_model = copy.deepcopy(loaded.module).to(args.device)
    raw_forward(raw_model, batches[:1], args.device)  # warm-up
    run = [args.batch_size, args.device, args.workers, args.consistency]
    bnport_calibrate(loaded, images[: 2 * args.batch_size], args.batch_size, args.mode, *run[1:])
    raw_s, ours_s, exact_s = [], [], []
    for _ in range(args.repeats):
        raw_s.append(raw_forward(raw_model, batches, args.device))
        ours_s.append(bnport_calibrate(loaded, images, args.batch_size, args.mode, *run[1:]))
        if args.mode == "sequential":
            exact_s.append(bnport_calibrate(loaded, images, args.batch_size, "exact", *run[1:]))
    return len(images) / min(raw_s), len(images) / min(ours_s), min(ours_s), min(exact_s) if exact_s else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="iresnet50")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", default="6", help="batch counts, comma-separated (e.g. 40,160: the difference "
                    "separates per-step from per-call costs)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mode", default="ema", choices=MODES)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default: bnport's default)")
    ap.add_argument("--consistency", default="off", choices=["off", "held-out", "full"],
                    help="the snapshots' consistency figure (default off: not part of the timings)")
    args = ap.parse_args()

    loaded = load_model(args.model)
    h, w = loaded.input_spec.size
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads"
    workers = CalibrationSettings().workers if args.workers is None else args.workers
    print(f"{args.model} {h}x{w}, batch {args.batch_size}, mode {args.mode}, {args.device} ({where}), "
          f"{workers} loader workers, torch {torch.__version__}")
    runs = {}
    for count in (int(c) for c in args.batches.split(",")):
        raw_rate, ours_rate, seconds, exact_seconds = measure(loaded, args, count)
        runs[count] = (raw_rate, ours_rate, seconds)
        print(f"{count} batches: raw train-mode no-grad forward {raw_rate:.1f} img/s, bnport calibrate "
              f"({args.mode}) {ours_rate:.1f} img/s")
        print(f"throughput ratio at {count} batches (bnport / raw): {ours_rate / raw_rate:.3f}")
        if exact_seconds is not None:
            print(f"{count} batches: sequential {seconds:.2f} s, exact {exact_seconds:.2f} s; "
                  f"sequential / exact wall: {seconds / exact_seconds:.2f} (target <= 3)")
    if len(runs) > 1:
        (a, (_, _, sec_a)), (b, (raw_b, _, sec_b)) = sorted(runs.items())[0], sorted(runs.items())[-1]
        per_step = (sec_b - sec_a) / (b - a)
        fixed = sec_a - per_step * a
        raw_step = args.batch_size / raw_b
        print(f"bnport per step {per_step * 1e3:.2f} ms (raw forward {raw_step * 1e3:.2f} ms, ratio "
              f"{raw_step / per_step:.3f}); fixed cost per call {fixed:.2f} s")


if __name__ == "__main__":
    main()
