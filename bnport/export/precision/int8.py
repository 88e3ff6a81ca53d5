"""INT8 by onnxruntime's static quantization, as its documentation recommends for CPUs: its own pre-processing
(`quant_pre_process`: symbolic and ONNX shape inference, basic graph optimisation), then `quantize_static` in QDQ
format with signed 8-bit activations and weights (S8S8 with QDQ, "the first choice" of its data-type guide), weights
per output channel, activation ranges calibrated on the given images by minmax, entropy or percentile.
`reduce_range` (7-bit weights) is off: ORT advises it only for AVX2/AVX512 CPUs without VNNI, where U8S8 can
saturate. Entropy calibration through `quantize_static` uses 128 histogram bins for 128 quantized bins, which leaves
one candidate threshold and reproduces minmax exactly (ORT 1.31); bnport computes the entropy ranges itself with
2048 bins for 128 quantized bins (the TensorRT recipe ORT's code cites) and hands them to `quantize_static` as a
calibration cache. The ORT tools' scratch files live in a temporary folder that is removed.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bnport.errors import BnportError, one_line
from bnport.export.precision.common import check_images, count_ops, input_dims, load_float32_model, quiet
from bnport.export.settings import CALIBRATION_METHODS

CALIBRATION_BATCH = 8
ENTROPY_BINS = 2048
ENTROPY_QUANTIZED_BINS = 128
PERCENTILE = 99.999


def _calibration_reader(images: np.ndarray, input_name: str, batch: int, *, fixed: bool):
    """A CalibrationDataReader over `images` in batches of `batch`; for a model with a `fixed` batch size, images
    that cannot fill a last batch are left out."""
    from onnxruntime.quantization import CalibrationDataReader

    stop = len(images) - len(images) % batch if fixed else len(images)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = [images[i:i + batch] for i in range(0, stop, batch)]
            self.position = 0

        def get_next(self) -> dict | None:
            if self.position >= len(self.batches):
                return None
            self.position += 1
            return {input_name: self.batches[self.position - 1]}

        def rewind(self) -> None:
            self.position = 0

        def __len__(self) -> int:
            return len(self.batches)

    return _Reader()


def _preprocess(source: Path, target: Path) -> str:
    """ORT's quant_pre_process; retried without symbolic shape inference (meant for transformers) if that fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(source, target)
        return "onnxruntime.quantization.quant_pre_process"
    except Exception as first:  # noqa: BLE001 - ORT's shape inference raises whatever its passes raise
        try:
            quant_pre_process(source, target, skip_symbolic_shape=True)
        except Exception as err:  # noqa: BLE001
            raise BnportError(f"onnxruntime's quantization pre-processing failed: {one_line(err)}",
                              "check that the float32 file runs on onnxruntime; report the model if it does")\
                from None
        return f"onnxruntime.quantization.quant_pre_process, symbolic shape inference skipped ({one_line(first)})"


def _entropy_ranges(model_path: Path, reader, cache: Path, scratch: Path) -> None:
    """Entropy (KL) activation ranges with ENTROPY_BINS histogram bins, saved as an ORT calibration cache."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator, save_tensors_data

    calibrator = create_calibrator(model_path, None, augmented_model_path=str(scratch / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.Entropy,
                                   extra_options={"num_bins": ENTROPY_BINS,
                                                  "num_quantized_bins": ENTROPY_QUANTIZED_BINS})
    calibrator.collect_data(reader)
    save_tensors_data(calibrator.compute_data(), cache)


def _entropy_cache_supported() -> bool:
    import inspect

    import onnxruntime.quantization as quantization

    return (hasattr(quantization, "save_tensors_data")
            and "calibration_cache_path" in inspect.signature(quantization.quantize_static).parameters)


def quantize_int8(model, calibration_images, *, method: str = "minmax", per_channel: bool = True,
                  reduce_range: bool = False) -> tuple[Any, dict]:
    """Static INT8 quantization of a float32 model (path, bytes or ModelProto); returns (ModelProto, settings).

    `calibration_images`: network inputs (N x 3 x H x W float32, numpy or torch) whose activation ranges the file
    keeps. `method`: "minmax" (the full observed range), "entropy" (KL-optimal thresholds over ENTROPY_BINS bins)
    or "percentile" (the PERCENTILE-th percentile of |activation|). See the module docstring for the format.
    """
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    check_method(method)
    fp32 = load_float32_model(model)
    images = check_images(calibration_images, fp32, "calibration images",
                           "INT8 needs calibration images: pass --calib-data SRC (images like the ones it will see)")
    input_name, dims = input_dims(fp32)
    # a file exported with a fixed batch takes exactly that many images per run; a dynamic one any number
    batch = dims[0] if dims[0] else min(CALIBRATION_BATCH, len(images))
    if len(images) < batch:
        raise BnportError(f"{len(images)} calibration images for a model with a fixed batch of {batch}",
                          f"give at least {batch} calibration images")
    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    settings = {"precision": "int8", "format": "QDQ", "activation_type": "int8", "weight_type": "int8",
                "per_channel": bool(per_channel), "reduce_range": bool(reduce_range), "method": method,
                "calibration_images": int(len(images) - (len(images) % batch if dims[0] else 0)),
                "calibration_batch": batch,
                "onnxruntime": onnxruntime.__version__}
    with tempfile.TemporaryDirectory(prefix="bnport-int8-") as tmp, quiet():
        scratch = Path(tmp)
        onnx.save(fp32, scratch / "fp32.onnx")
        settings["preprocess"] = _preprocess(scratch / "fp32.onnx", scratch / "pre.onnx")
        options = {"quant_format": QuantFormat.QDQ, "per_channel": bool(per_channel),
                   "reduce_range": bool(reduce_range), "activation_type": QuantType.QInt8,
                   "weight_type": QuantType.QInt8, "calibrate_method": calibrate}
        reader = _calibration_reader(images, input_name, batch, fixed=bool(dims[0]))
        if method == "entropy" and _entropy_cache_supported():
            cache = scratch / "ranges.json"
            _entropy_ranges(scratch / "pre.onnx", reader, cache, scratch)
            quantize_static(scratch / "pre.onnx", scratch / "int8.onnx", None, calibration_cache_path=cache, **options)
            settings["entropy_bins"] = [ENTROPY_BINS, ENTROPY_QUANTIZED_BINS]
        else:
            if method == "entropy":
                settings["entropy_bins"] = "onnxruntime default (128 bins for 128 quantized bins: equals minmax)"
            if method == "percentile":
                options["extra_options"] = {"CalibPercentile": PERCENTILE}
                settings["percentile"] = PERCENTILE
            quantize_static(scratch / "pre.onnx", scratch / "int8.onnx", reader, **options)
        quantized = onnx.load(scratch / "int8.onnx")
    onnx.checker.check_model(quantized)
    counts = count_ops(quantized)
    if not counts.get("DequantizeLinear"):
        raise BnportError("onnxruntime quantized nothing in this model (no Conv, Gemm or MatMul it can quantize)",
                          "keep this model in fp32 or fp16")
    settings["qdq_nodes"] = {"QuantizeLinear": counts.get("QuantizeLinear", 0),
                             "DequantizeLinear": counts["DequantizeLinear"]}
    return quantized, settings




def check_method(method: str) -> None:
    if method not in CALIBRATION_METHODS:
        raise BnportError(f"unknown calibration method {method!r}", f"use one of {', '.join(CALIBRATION_METHODS)}")
