"""Benchmark `bnport export --fold-bn` against its peers, in one run, printed as ratios.

1. ORT CPU latency of bnport's iresnet50 file vs the best peer file (TorchScript exporter + onnxsim; dynamo
   exporter), 112x112, batch 8, same thread count, runs interleaved so machine load hits every file alike:
   the line with `latency ratio` (target <= 1.00).
2. Wall time of the export (fold, export, ONNX fold, simplify, parity; the library call `bnport export` makes) vs a
   plain `torch.onnx.export` of the same model with the same exporter, both warm: the lines with `wall ratio`
   (target <= 3).
3. Live peer BatchNorm counts for the coverage models of tests/export/test_onnx_export.py, next to bnport's (the
   tests read them from the golden tests/fixtures/peer_bn_counts.json; `--skip-peers` leaves this part out). The
   timm models need `pip install timm`.
4. Parity verdict stability (issue 9): each model exported twice, with 1 and with 2 threads for the parity check;
   per run the verdict, the bound that decided, the file's error against float64 and PyTorch float32's own (both x
   the output scale), their ratio, the error as a fraction of the tolerance, and what the old rule (|ort - PyTorch
   float32| <= 1e-4 x scale) would have said. `--stability-only` runs this part alone.

    python tests/benchmarks/bench_export.py [--runs 30] [--threads 2] [--device cpu|cuda] [--skip-peers]
        [--stability-only | --skip-stability]
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import onnxsim
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))  # the repository root: tests.helpers imports

from peer_bn_counts import ALL_MODELS, PEERS, build  # noqa: E402
from tests.helpers.models import realistic_bn  # noqa: E402
from tests.helpers.zoo import offset_kept_model, offset_model  # noqa: E402

from bnport.export.settings import ExportSettings  # noqa: E402
from bnport.model.arch import create_model  # noqa: E402
from bnport.data.transforms import InputSpec  # noqa: E402
from bnport.export.onnx_export import export_onnx  # noqa: E402
from bnport.export.fold_torch import count_bn  # noqa: E402
from bnport.export.fold_onnx import count_bn_nodes  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def spec_for(name: str, size: tuple[int, int]) -> InputSpec:
    """insightface normalisation for the face models, ImageNet's for torchvision and timm ones."""
    if ":" not in name:
        return InputSpec(*size)
    return InputSpec(*size, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def plain_export(model: torch.nn.Module, x: torch.Tensor, *, dynamo: bool) -> bytes:
    """What a user without bnport runs: torch.onnx.export with a dynamic batch, nothing else."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(model, (x,), dynamo=True, verbose=False, input_names=["data"],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
            return program.model_proto.SerializeToString()
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["data"], opset_version=17,
                          dynamic_axes={"data": {0: "batch"}})
        return buffer.getvalue()


def latencies(files: dict[str, bytes], *, runs: int, threads: int, batch: int, device: str = "cpu"
              ) -> dict[str, float]:
    """Median ms per batch for each file (bnport's session factory: CUDA with IOBinding on `device` "cuda"); one
    run of each file per round, so load drift hits all alike."""
    from bnport.runtime.sessions import create_session

    x = np.random.default_rng(0).normal(size=(batch, 3, 112, 112)).astype(np.float32)
    sessions = {name: create_session(data, device=device, threads=threads) for name, data in files.items()}
    for s in sessions.values():
        for _ in range(3):
            s.run(x)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    names = list(sessions)
    for round_ in range(runs):
        # rotate who goes first, so no file always runs right after another one's cache traffic
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            began = time.perf_counter()
            sessions[name].run(x)
            times[name].append((time.perf_counter() - began) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_latency(model: torch.nn.Module, bnport_file: bytes, *, runs: int, threads: int, device: str) -> None:
    x = torch.randn(2, 3, 112, 112)
    simplified, ok = onnxsim.simplify(onnx.load_from_string(plain_export(model, x, dynamo=False)))
    assert ok, "onnxsim check failed on the TorchScript peer file"
    files = {"bnport": bnport_file, "torchscript+onnxsim": simplified.SerializeToString(),
             "dynamo": plain_export(model, x, dynamo=True)}
    ms = latencies(files, runs=runs, threads=threads, batch=8, device=device)
    best = min((name for name in files if name != "bnport"), key=ms.get)
    detail = ", ".join(f"{name} {value:.1f} ms" for name, value in ms.items())
    print(f"latency ratio (bnport / best peer {best}, ORT {device}, iresnet50 112x112 batch 8, {threads} threads, "
          f"median of {runs}): {ms['bnport'] / ms[best]:.3f}  [{detail}]", flush=True)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    began = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - began, result


def bench_wall(model: torch.nn.Module, folder: Path, *, device: str = "cpu") -> bytes:
    """Wall ratios for both exporters; returns the bnport (auto) file for the latency comparison."""
    x = torch.randn(2, 3, 112, 112)
    # warm both exporters (imports, dispatcher caches) on a tiny model so neither side pays first-call costs
    tiny = realistic_bn(create_model("iresnet_tiny"))
    plain_export(tiny, x, dynamo=True)
    export_onnx(tiny, folder / "warm.onnx", ExportSettings(exporter="torchscript"), device="cpu")
    produced = b""
    for exporter, dynamo in (("auto", True), ("torchscript", False)):
        plain_s, _ = timed(plain_export, model, x, dynamo=dynamo)
        ours_s, report = timed(export_onnx, model, folder / f"{exporter}.onnx", ExportSettings(exporter=exporter),
                                 device=device)
        assert report, str(report)
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in report.timings.items())
        plain_name = "dynamo" if dynamo else "TorchScript"
        print(f"wall ratio (bnport export --fold-bn --exporter {exporter} / plain torch.onnx.export {plain_name}, "
              f"iresnet50): {ours_s / plain_s:.2f}  [bnport {ours_s:.1f} s ({stages}); plain {plain_s:.1f} s; "
              f"file by {report.exporter}, {report.bn_onnx} BN nodes; parity max abs {report.parity.max_abs:.1e} "
              f"at scale {report.parity.output_scale:.3g}]", flush=True)
        if exporter == "auto":
            produced = Path(report.output).read_bytes()
    return produced


def bench_peers(folder: Path) -> None:
    print("BatchNorm left (BN modules in the model | bnport file | TorchScript+onnxsim | dynamo | fx fuse):")
    for name in ALL_MODELS:
        model, size = build(name)
        model = realistic_bn(model, size=size)
        spec = spec_for(name, size)
        x = torch.randn(2, 3, *size)
        peers = {}
        for peer, run in PEERS.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peers[peer] = run(model, x)
        seconds, report = timed(export_onnx, model, folder / "peer.onnx", ExportSettings(exporter="auto"),
                                input_spec=spec, device="cpu")
        verdict = "ok" if report and report.bn_onnx <= min(peers.values()) else "WORSE THAN A PEER"
        print(f"  {name:34s} {count_bn(model):4d} | {report.bn_onnx if report else 'FAIL':>4} | "
              f"{peers['torchscript_onnxsim']:4d} | {peers['dynamo']:4d} | {peers['fx_fuse']:4d}  {verdict}  "
              f"(bnport {seconds:.1f}s by {report.exporter}, parity {'pass' if report else 'FAIL'})", flush=True)


# two ill-conditioned models (PyTorch float32 1.4e-4 of the scale from float64, 16x16): one whose offset the fold
# takes off in float64 (the file beats PyTorch), one whose offset sits in a BN that cannot fold (the file shares
# PyTorch's error)
STABILITY_MODELS = ("offset, folded away", "offset, kept", "iresnet50", "torchvision:efficientnet_b0",
                    "timm:mixnet_s")


def bench_stability(folder: Path) -> None:
    print("parity verdict stability (threads for the parity check: verdict, bound, |file - f64| and |PyTorch f32 - "
          "f64| x scale, their ratio, file error / tolerance, old rule):", flush=True)
    for name in STABILITY_MODELS:
        if name.startswith("offset"):
            model, spec = (offset_model() if "folded" in name else offset_kept_model()), InputSpec(16, 16)
        else:
            torch.manual_seed(0)
            model, size = build(name)
            model, spec = realistic_bn(model, size=size), spec_for(name, size)
        for threads in (1, 2):
            seconds, report = timed(export_onnx, model, folder / "stability.onnx",
                                    ExportSettings(exporter="torchscript", threads=threads), input_spec=spec,
                                    device="cpu")
            parity = report.parity
            out = parity.outputs[0]
            err, noise = out.max_abs / out.scale, out.reference_noise
            old = "pass" if out.max_abs_torch <= 1e-4 * out.scale else "FAIL"
            print(f"  {name:34s} {threads} thread(s): {'PASS' if report else 'FAIL'} by {parity.bound:13s} "
                  f"file {err:.2e}  torch {noise:.2e}  ratio {err / noise if noise else float('inf'):5.2f}  "
                  f"err/tol {err / out.tolerance:.3f}  old rule {old}  ({seconds:.0f}s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="timed ORT runs per file (default 30)")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    parser.add_argument("--skip-peers", action="store_true", help="leave out the live peer BN counts")
    parser.add_argument("--stability-only", action="store_true", help="only the parity verdict stability part")
    parser.add_argument("--skip-stability", action="store_true", help="leave out the parity verdict stability part")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="onnxruntime device for the parity check and the latency (default cpu)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, onnxsim {onnxsim.__version__}, "
          f"{torch.get_num_threads()} torch threads", flush=True)
    model = realistic_bn(create_model("iresnet50"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not args.skip_stability:
            bench_stability(folder)
        if args.stability_only:
            return
        produced = bench_wall(model, folder, device=args.device)
        assert count_bn_nodes(onnx.load_from_string(produced)) == 0
        bench_latency(model, produced, runs=args.runs, threads=args.threads, device=args.device)
        if not args.skip_peers:
            bench_peers(folder)


if __name__ == "__main__":
    main()
