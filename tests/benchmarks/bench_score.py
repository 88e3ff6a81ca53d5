"""`bnport score` speed against its limits, and the cost of exporting K snapshots of one run.

Usage: python tests/benchmarks/bench_score.py [--model mobilefacenet] [--pairs 1000] [--models 5] [--snapshots 5]
       [--device cpu|cuda] [--batch-size N]     (--snapshots 0 or 1 skips part 2)

1. Five ONNX files (one architecture, five BN states) scored on one insightface .bin pack:
   - bnport: `bnport.score.score` from a cold decode cache (decode once, five models, flip, metrics, tables, bundle);
   - floor: one decode pass of the pack (cv2, into memory) plus five raw `session.run` passes (image and flip) over
     preloaded, already-normalised tensors, the sessions made beforehand with the provider options bnport's take:
     the least any scorer must do. Target: bnport / floor <= 1.10;
   - per-model loop: decode again for every model (what insightface's eval scripts do); bnport's speed-up over it
     (target >= 1.0);
   - session start-up: the K sessions' creation time, outside bnport and inside it, on its own line.
2. A calibration run with `--snapshots` snapshots exported for scoring: the first export's wall time, then each later
   snapshot's (graph reused, parity still checked). Target: each later one <= a quarter of the first.
Every figure comes from this one run; the last line is the bnport / floor ratio.
"""
from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: tests.helpers imports

from tests.helpers.benchdata import write_bin_pack  # noqa: E402
from tests.helpers.images import write_images  # noqa: E402
from tests.helpers.models import realistic_bn, write_trained_weights  # noqa: E402

from bnport.model.arch import create_model  # noqa: E402
from bnport.data.transforms import InputSpec  # noqa: E402
from bnport.export.onnx_export import export_onnx  # noqa: E402
from bnport.runtime.sessions import create_session  # noqa: E402
from bnport.export.settings import ExportSettings  # noqa: E402
from bnport.score import ScoreSettings, score  # noqa: E402
from bnport.score.bench import decode_rgb  # noqa: E402
from bnport.score.embed import to_network_input  # noqa: E402


def _models(arch: str, count: int, folder: Path, device: str = "cpu") -> list[Path]:
    paths = []
    for i in range(count):
        model = realistic_bn(create_model(arch), seed=i)
        path = folder / f"{arch}-{i}.onnx"
        # no onnxsim: the files only need to run; scoring speed is what is measured
        assert export_onnx(model, path, ExportSettings(exporter="torchscript", simplify=False), device=device)
        paths.append(path)
    return paths


def _decode(pack: Path) -> np.ndarray:
    with open(pack, "rb") as f:
        bins, _ = pickle.load(f)
    return np.stack([decode_rgb(b, "x") for b in bins])


def _raw_pass(session, x: np.ndarray, batch: int) -> None:
    for lo in range(0, len(x), batch):
        session.run(x[lo:lo + batch])
        session.run(np.ascontiguousarray(x[lo:lo + batch][..., ::-1]))


def bench_scoring(arch: str, n_pairs: int, n_models: int, batch: int, root: Path, device: str) -> float:
    from bnport.runtime.sessions import scoring_use

    root.mkdir(parents=True, exist_ok=True)
    pack = root / "lfw.bin"
    write_bin_pack(pack, n_pairs)
    models = _models(arch, n_models, root, device)
    spec = InputSpec()
    use = scoring_use(4 * n_pairs)  # the settings bnport's sessions take for this many images (image and mirror)

    began = time.perf_counter()
    result = score([str(m) for m in models],
                   ScoreSettings.of([str(pack)], cache_dir=root / "cache", batch_size=batch, workers=0),
                   out=root / "out", device=device, progress=False, log=lambda m: None)
    ours = time.perf_counter() - began
    started = result.table.session_settings

    began = time.perf_counter()
    sessions = [create_session(m, device=device, use=use) for m in models]
    startup = time.perf_counter() - began
    began = time.perf_counter()
    x = to_network_input(_decode(pack), spec)
    for session in sessions:
        _raw_pass(session, x, batch)
    floor = time.perf_counter() - began

    began = time.perf_counter()
    for session in sessions:
        _raw_pass(session, to_network_input(_decode(pack), spec), batch)
    loop = time.perf_counter() - began
    print(f"scoring {n_models} x {arch} on {2 * n_pairs} images (flip on), batch {batch}, ORT "
          f"{', '.join(sessions[0].providers)} ({use.name}), {torch.get_num_threads()} torch threads")
    print(f"session start-up: {n_models} sessions in {startup:.2f}s outside bnport; in bnport "
          f"{started.get('sessions', 0)} in {started.get('startup_seconds', 0.0):.2f}s")
    print(f"  bnport score (cold cache) {ours:.1f}s; floor (1 decode + {n_models} raw passes, sessions made "
          f"beforehand) {floor:.1f}s; per-model decode loop {loop:.1f}s")
    print(f"speed-up of bnport over the per-model decode loop: {loop / ours:.2f}x")
    return ours / floor


def bench_snapshot_exports(arch: str, snapshots: int, root: Path) -> None:
    from bnport.calibrate.engine import calibrate
    from bnport.calibrate.settings import CalibrationSettings
    from bnport.model.load import load_model
    from bnport.runs import Run
    from bnport.export.cached import RunExporter

    weights = write_trained_weights(root / "w.safetensors", arch)
    write_images(root / "calib", 16)
    calibrate(load_model(arch, weights=weights), root / "calib", root / "run",
              CalibrationSettings(mode="ema", batch_size=4, steps=snapshots - 1, snapshot_every=1, workers=0),
              device="cpu", progress=False, log=lambda m: None)
    exporter = RunExporter(Run.open(root / "run"), ExportSettings(), device="cpu")
    times, hows = [], []
    for snap in Run(root / "run").snapshots():
        c = exporter.export(snap)
        assert c.passed, c.failure
        times.append(c.seconds)
        hows.append(c.how)
    later = times[1:]
    print(f"exporting {len(times)} snapshots of one {arch} run (dynamo, parity on 16 real + 9 noise inputs): "
          f"first {times[0]:.1f}s ({hows[0]}), later " + ", ".join(f"{t:.2f}s" for t in later) + f" ({hows[1]})")
    print(f"later export / first export: mean {np.mean(later) / times[0]:.3f}, worst {max(later) / times[0]:.3f} "
          "(target <= 0.25)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilefacenet")
    parser.add_argument("--export-model", default="iresnet50")
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--snapshots", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 on CPU, 256 on CUDA")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    batch = args.batch_size or (256 if args.device == "cuda" else 32)
    with tempfile.TemporaryDirectory() as tmp:
        if args.snapshots > 1:
            bench_snapshot_exports(args.export_model, args.snapshots, Path(tmp) / "exports")
        ratio = bench_scoring(args.model, args.pairs, args.models, batch, Path(tmp) / "scoring", args.device)
    print(f"bnport score wall / (1 decode + {args.models} raw passes): {ratio:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
