"""Calibration throughput against its limit: a train-mode no-grad forward over the same preloaded tensors.

Usage: python tests/benchmarks/bench_calibrate.py [--model iresnet50] [--batch-size 32] [--batches 6] [--mode ema]
       [--device cpu|cuda]

Prints images/s of the raw loop (BN layers in train mode, torch.no_grad, tensors already in the device's memory: the
most any calibration can do) and of `bnport.calibrate.engine.calibrate` on the same tensors (data loader, copy to the
device, noise mixing, statistics, snapshot writing included), each the best of `--repeats` alternating rounds, on
`--device` (default cpu; cuda times are taken after torch.cuda.synchronize). The last line is the ratio
(target >= 0.90 on CPU for iresnet50 at 112x112, batch 32).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from bnport.calibrate.engine import calibrate
from bnport.calibrate.settings import CalibrationSettings
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


def bnport_calibrate(loaded, images: torch.Tensor, batch_size: int, mode: str, device: str) -> float:
    n_batches = len(images) // batch_size
    with tempfile.TemporaryDirectory() as tmp:
        synchronize(device)
        t0 = time.perf_counter()
        calibrate(loaded, PreloadedImages(images), Path(tmp) / "run",
                  CalibrationSettings(mode=mode, batch_size=batch_size, steps=n_batches, snapshot_every=n_batches, workers=0),
                  device=device, progress=False, log=lambda m: None)
        synchronize(device)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="iresnet50")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mode", default="ema", choices=["ema", "exact"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()

    loaded = load_model(args.model)
    h, w = loaded.input_spec.size
    images = torch.randn(args.batch_size * args.batches, 3, h, w, generator=torch.Generator().manual_seed(0))
    batches = [images[i * args.batch_size:(i + 1) * args.batch_size].contiguous().to(args.device)
               for i in range(args.batches)]
    n = len(images)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"{args.model} {h}x{w}, batch {args.batch_size}, {args.batches} batches, mode {args.mode}, "
          f"{args.device} ({where}), torch {torch.__version__}")
    raw_model = copy.deepcopy(loaded.module).to(args.device)
    raw_forward(raw_model, batches[:1], args.device)  # warm-up
    bnport_calibrate(loaded, images[: 2 * args.batch_size], args.batch_size, args.mode, args.device)
    raw_s, ours_s = [], []
    for _ in range(args.repeats):
        raw_s.append(raw_forward(raw_model, batches, args.device))
        ours_s.append(bnport_calibrate(loaded, images, args.batch_size, args.mode, args.device))
    raw_rate, ours_rate = n / min(raw_s), n / min(ours_s)
    print(f"raw train-mode no-grad forward: {raw_rate:.1f} img/s")
    print(f"bnport calibrate ({args.mode}):   {ours_rate:.1f} img/s")
    print(f"throughput ratio (bnport / raw): {ours_rate / raw_rate:.3f}")


if __name__ == "__main__":
    main()
