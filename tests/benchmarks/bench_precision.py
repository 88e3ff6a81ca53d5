"""Benchmark lower-precision files against their float32 file, in one run, printed as ratios (issue 10).

For each model (iresnet50 and mobilefacenet, 112x112, random weights with BN statistics estimated on face images):
export the folded float32 file with bnport, make its INT8 (ORT static QDQ, per-channel int8 weights, 16 calibration
faces) and FP16 versions with `bnport.export.precision.make_precision`, then print

Without `--weights NAME=FILE` the weights are random: INT8 latency is then representative, its cosine much less
(random IResNets lose more to INT8 than trained ones; a random MobileFaceNet gives nearly one embedding for all faces).

1. `latency ratio`: INT8 / float32 median latency at batch 8 (and batch 1), runs interleaved so load on a shared
   machine hits every file alike (target on a CPU with VNNI: <= 0.5 for iresnet50); FP16 / float32 as well, which on
   a CPU only shows the cost of its Casts, and on `--device cuda` is the GPU figure (INT8 is not timed there);
2. the row cosine of each file against float32 on held-out faces (the figure the precision gate judges), with the
   spread of the float32 embeddings between different faces: when different faces already give nearly the same
   embedding (random weights can do that), a high row cosine says little.

The CPU's instruction sets that matter for INT8 (avx2, avx512f, avx512_vnni, avx_vnni, amx_int8) are printed first.
Faces: scikit-image's bundled LFW subset (100 real 25x25 grey faces, upscaled) unless `--images SRC` names a data
source (folder, list, .rec, .bin) of aligned faces.

    python tests/benchmarks/bench_precision.py [--device cpu|cuda] [--threads 2] [--runs 10] [--images SRC]
        [--weights iresnet50=backbone.pth] [--models iresnet50,mobilefacenet] [--method minmax]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root: tests.helpers imports

from tests.helpers.models import VAR_FLOOR, realistic_bn  # noqa: E402

from bnport.export.settings import ExportSettings  # noqa: E402
from bnport.model.arch import create_model  # noqa: E402
from bnport.data.transforms import InputSpec  # noqa: E402
from bnport.export.onnx_export import export_onnx  # noqa: E402
from bnport.runtime.latency import measure_latencies  # noqa: E402
from bnport.export.precision import make_precision  # noqa: E402

SPEC = InputSpec()
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_description() -> str:
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    have = [f for f in FLAGS if f in flags]
    vnni = "VNNI" if {"avx512_vnni", "avx_vnni"} & flags else "no VNNI"
    return f"{name}; {vnni}; flags: {' '.join(have) or 'none of ' + ', '.join(FLAGS)}"


def lfw_faces() -> torch.Tensor:
    """scikit-image's bundled LFW subset: the 100 face crops (25x25 grey), upscaled to 112x112 RGB network inputs."""
    import cv2
    import skimage.data

    faces = skimage.data.lfw_subset()[:100]
    images = []
    for face in faces:
        grey = cv2.resize((face * 255).round().astype(np.uint8), (SPEC.width, SPEC.height),
                          interpolation=cv2.INTER_CUBIC)
        images.append(SPEC.to_tensor(np.repeat(grey[:, :, None], 3, axis=2)))
    return torch.stack(images)


def face_statistics(model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    """Random affine BN parameters (realistic_bn), then running statistics pooled over `images` with the BN layers
    alone in train mode, as `bnport calibrate --mode exact` would set them on this data."""
    realistic_bn(model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
        bn.train()
    with torch.no_grad():
        for start in range(0, len(images), 16):
            model(images[start:start + 16])
    for bn in bns:
        bn.running_var.clamp_(min=VAR_FLOOR)
        bn.momentum = 0.1
    return model.eval()


def embedding_spread(onnx_file: Path, images: torch.Tensor) -> float:
    """Mean cosine between the float32 embeddings of different faces."""
    from bnport.runtime.sessions import create_session

    out = create_session(str(onnx_file), device="cpu").run(images.numpy()).astype(np.float64)
    unit = out / np.linalg.norm(out, axis=1, keepdims=True)
    upper = np.triu_indices(len(out), 1)
    return float((unit @ unit.T)[upper].mean())


def bench_model(name: str, faces: torch.Tensor, folder: Path, args) -> None:
    calibration, held_out, statistics = faces[:16], faces[-16:], faces[16:-16]
    if name in args.weights:
        from bnport.model.load import load_model

        model = load_model(name, weights=args.weights[name]).module
        print(f"{name}: trained weights from {args.weights[name]} (their own BN statistics)", flush=True)
    else:
        torch.manual_seed(0)
        model = face_statistics(create_model(name), statistics)
    fp32 = folder / f"{name}.onnx"
    began = time.perf_counter()
    report = export_onnx(model, fp32, ExportSettings(exporter="torchscript"), device="cpu", parity_images=held_out[:8])
    assert report, str(report)
    export_s = time.perf_counter() - began
    gate_device = "cpu" if args.device == "cpu" else args.device
    int8 = make_precision(fp32, "int8", calibration_images=calibration, parity_images=held_out, method=args.method)
    fp16 = make_precision(fp32, "fp16", parity_images=held_out, device=gate_device)
    files = {"fp32": fp32, "fp16": fp16.model}
    if args.device == "cpu":
        files["int8"] = int8.model
    latency = measure_latencies(files, device=args.device, batch_sizes=(1, 8), runs=args.runs, threads=args.threads)
    providers = latency["fp32"].providers[0]
    ms = {k: r.median_ms for k, r in latency.items()}
    detail = ", ".join(f"{k} {v[8]:.1f} ms" for k, v in ms.items())
    detail_1 = ", ".join(f"{k} {v[1]:.1f} ms" for k, v in ms.items())
    where = f"ORT {providers}, {args.threads} threads" if args.device == "cpu" else f"ORT {providers}"
    if "int8" in ms:
        print(f"{name}: latency ratio int8/fp32 at batch 8 ({where}, median of {args.runs}): "
              f"{ms['int8'][8] / ms['fp32'][8]:.3f}; batch 1: {ms['int8'][1] / ms['fp32'][1]:.3f}", flush=True)
    print(f"{name}: latency ratio fp16/fp32 at batch 8 ({where}): {ms['fp16'][8] / ms['fp32'][8]:.3f}; "
          f"batch 1: {ms['fp16'][1] / ms['fp32'][1]:.3f}  [batch 8: {detail}; batch 1: {detail_1}]", flush=True)
    for result in (int8, fp16):
        parity = result.parity
        kinds = ", ".join(f"{k} {v:.5f}" for k, v in parity.min_cos_by_kind.items())
        print(f"{name}: {result.precision} row cosine vs float32 on {len(held_out)} held-out faces: min "
              f"{parity.min_cos_by_kind['real']:.5f} (1 - cos {1 - parity.min_cos_by_kind['real']:.1e}), mean "
              f"{parity.mean_cos:.5f}; gate {'PASS' if parity else 'FAIL'} at {parity.min_cos_required} "
              f"[min per kind: {kinds}] on {parity.providers[0]}", flush=True)
    sizes = {"fp32": fp32.stat().st_size, "int8": int8.model.ByteSize(), "fp16": fp16.model.ByteSize()}
    print(f"{name}: float32 embeddings of different faces: mean pairwise cosine "
          f"{embedding_spread(fp32, held_out):.4f}; file sizes " +
          ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()) +
          f"; export {export_s:.0f}s, int8 {int8.timings['quantize']:.0f}s, fp16 {fp16.timings['convert']:.0f}s",
          flush=True)
    for note in fp16.notes:
        print(f"{name}: fp16 note: {note}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--method", default="minmax", choices=("minmax", "entropy", "percentile"))
    parser.add_argument("--models", default="iresnet50,mobilefacenet")
    parser.add_argument("--images", default=None, help="data SRC of aligned faces (default: scikit-image's LFW subset)")
    parser.add_argument("--weights", action="append", default=[], metavar="NAME=FILE",
                        help="trained weights for a model (e.g. iresnet50=backbone.pth); repeatable")
    args = parser.parse_args()
    args.weights = dict(item.split("=", 1) for item in args.weights)
    torch.set_num_threads(args.threads)
    print(f"cpu: {cpu_description()}", flush=True)
    if args.images:
        from bnport.export.parity import load_parity_images

        faces = load_parity_images(args.images, SPEC, limit=100)
        source = args.images
    else:
        faces = lfw_faces()
        source = "scikit-image LFW subset (25x25 grey, upscaled)"
    if len(faces) < 48:
        raise SystemExit(f"need at least 48 face images, {source} gave {len(faces)}")
    print(f"faces: {len(faces)} from {source}; 16 calibrate INT8, 16 held out for the gate, the rest set BN "
          f"statistics", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            bench_model(name, faces, Path(tmp), args)


if __name__ == "__main__":
    main()
