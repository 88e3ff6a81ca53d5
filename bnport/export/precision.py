"""Lower-precision files (INT8 for CPUs, FP16 for GPUs) made from a verified float32 ONNX file, behind their own gate.

INT8 is onnxruntime's static quantization as its documentation recommends for CPUs: its own pre-processing
(`quant_pre_process`: symbolic and ONNX shape inference, basic graph optimisation), then `quantize_static` in QDQ format
with signed 8-bit activations and weights (S8S8 with QDQ, "the first choice" of its data-type guide), weights per output
channel, activation ranges calibrated on the given images by minmax, entropy or percentile. `reduce_range` (7-bit
weights) is off: ORT advises it only for AVX2/AVX512 CPUs without VNNI, where U8S8 can saturate. Entropy calibration
through `quantize_static` uses 128 histogram bins for 128 quantized bins, which leaves one candidate threshold and
reproduces minmax exactly (ORT 1.31); bnport computes the entropy ranges itself with 2048 bins for 128 quantized bins
(the TensorRT recipe ORT's code cites) and hands them to `quantize_static` as a calibration cache. FP16 is
`onnxruntime.transformers.float16.convert_float_to_float16` with `keep_io_types`: float16 weights and compute, float32
input and output. On ORT's CPU provider most ops have no float16 kernel: ORT inserts Casts and runs them in float32 on
the float16-rounded weights, so FP16 gains nothing on a CPU and its CPU parity measures weight rounding only
(`PrecisionResult.notes` lists the ops).

The gate compares the lower-precision file with the float32 file on onnxruntime, same inputs (real images plus the
noise inputs of `bnport.export.parity.build_parity_inputs`), batch sizes 1, 2 and 8, and reports the figures the float32 gate
reports (`PrecisionParity` is a `bnport.export.parity.ParityResult`). Its verdict is the row cosine: every judged output row
must reach `DEFAULT_MIN_COS[precision]`. FP16 judges every row; INT8 judges the real-image rows, because noise inputs
lie outside the calibrated activation ranges by design (their figures are reported, only NaN/Inf fails). The defaults
come from measurements (tests/benchmarks/RESULTS.md): FP16 gives 1 - cos <= 9e-6 with float16 compute (iresnet50 in
PyTorch half) and <= 6e-6 on ORT CPU, so 0.9999 leaves a 10x margin and a clamped weight (0.63) fails. INT8 gives
0.9994 on a trained IResNet-50 and 0.915 on a trained MobileFaceNet (issue 10), 0.998-0.999 on the tests' tiny
IResNet, 0.967 on a random-weight IResNet-50 (random nets lose more than trained ones), and 0.58 or less when
calibrated on ranges 100x too wide; 0.99 passes the trained model INT8 serves well and refuses the one it damages
(pass `min_cos` to accept less, then let the verification metric decide). Nothing is written to disk except by
`write_precision_model` (atomic); the ORT tools' scratch files live in a temporary folder that is removed.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnport.errors import BnportError
from bnport.export.parity import QUANTILES, ParityResult

PRECISIONS = ("fp32", "fp16", "int8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_MIN_COS = {"fp16": 0.9999, "int8": 0.99}
DEFAULT_BATCH_SIZES = (1, 2, 8)
# the real images the gate checks when the caller gives none: this many of the calibration images, evenly spread
PARITY_REAL_LIMIT = 16
CALIBRATION_BATCH = 8
ENTROPY_BINS = 2048
ENTROPY_QUANTIZED_BINS = 128
PERCENTILE = 99.999
_FP16_MAX = 65504.0
_FP16_MIN_POSITIVE = 5.96e-08
# max rel is taken over elements at least this fraction of the output scale, as in bnport.export.parity
_REL_FLOOR = 1e-3
_FLOAT = 1  # onnx.TensorProto.FLOAT
_FLOAT16 = 10


@dataclass
class PrecisionParity(ParityResult):
    """A lower-precision file against its float32 file: the float32 gate's figures plus the row cosine per input kind.

    `max_abs`, `mean_abs`, `quantiles`, `histogram`, `max_rel`, `output_scale` are as in `ParityResult`, with the
    float32 file's outputs as the reference. `min_cos` is the lowest row cosine over the judged rows (`judged` names
    their kinds), `min_cos_by_kind` the lowest per input kind, `mean_cos` the mean over the judged rows. `atol` and
    `rtol` are None: elementwise errors are reported, not judged, since INT8 moves single values by a few percent of
    the output scale even when every embedding keeps its direction.
    """

    precision: str = ""
    min_cos_by_kind: dict[str, float] = field(default_factory=dict)
    mean_cos: float = math.nan
    judged: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["tolerances"] = {"min_cos": self.min_cos_required, "rows_judged": list(self.judged), "atol": None,
                           "rtol": None}
        d.update({"precision": self.precision, "reference": "float32 ONNX file",
                  "min_cos_by_kind": {k: _json_float(v) for k, v in self.min_cos_by_kind.items()},
                  "mean_cos": _json_float(self.mean_cos)})
        return d

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        kinds = ", ".join(f"{n} {k}" for k, n in self.inputs.items() if n)
        sizes = ", ".join(str(b) for b in self.batch_sizes)
        unjudged = [k for k, n in self.inputs.items() if n and k not in self.judged]
        rule = f"every {'/'.join(self.judged)} output row cosine >= {self.min_cos_required}"
        if unjudged:
            rule += f" ({', '.join(unjudged)} rows reported, not judged: outside the calibrated ranges)"
        per_kind = ", ".join(f"{k} {v:.6f}" for k, v in self.min_cos_by_kind.items())
        quant = "  ".join(f"{k} {v:.2e}" for k, v in self.quantiles.items())
        lines = [
            (f"{self.precision} parity {verdict} vs the float32 file on onnxruntime {', '.join(self.providers)}: "
             f"{self.n_inputs} inputs ({kinds}), batch sizes {sizes}"),
            f"  rule: {rule}",
            f"  min row cosine: {per_kind}; mean over judged rows {self.mean_cos:.6f}",
            (f"  max abs {self.max_abs:.3e} (output scale {self.output_scale:.4g}), max rel {self.max_rel:.3e}; "
             f"abs error quantiles: {quant}"),
        ]
        lines += [f"  failed: {f}" for f in self.failures]
        return "\n".join(lines)


@dataclass
class PrecisionResult:
    """A lower-precision model made from a float32 file, and its gate; truthy when the gate passed.

    `model` is the onnx.ModelProto (for "fp32", the float32 model itself, and `parity` is None); the float32 file's
    metadata_props are carried over. `settings` says how it was made (precision, method, per_channel, format,
    activation/weight types, calibration image count, tools and their versions, the float32 file's sha256);
    `timings` are seconds per stage; `notes` say what the runtime did with it (ops run in float32, fallbacks).
    """

    precision: str
    model: Any
    parity: PrecisionParity | None
    settings: dict
    timings: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.parity is None or bool(self.parity)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def seconds(self) -> float:
        return sum(self.timings.values())

    def to_bytes(self) -> bytes:
        return self.model.SerializeToString()

    def to_dict(self) -> dict:
        return {"precision": self.precision, "passed": self.passed, "settings": self.settings,
                "parity": self.parity.to_dict() if self.parity is not None else None, "timings": self.timings,
                "notes": self.notes, "bytes": self.model.ByteSize()}

    def __str__(self) -> str:
        how = ", ".join(f"{k} {v}" for k, v in self.settings.items() if k in _SHOWN_SETTINGS)
        lines = [f"{self.precision}: {how} ({self.model.ByteSize() / 1e6:.1f} MB, {self.seconds:.1f}s)"]
        if self.parity is not None:
            lines.append(str(self.parity))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


_SHOWN_SETTINGS = ("format", "activation_type", "weight_type", "per_channel", "reduce_range", "method",
                   "calibration_images", "keep_io_types")


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise BnportError(f"unknown precision {precision!r}", f"use one of {', '.join(PRECISIONS)}")


def _check_method(method: str) -> None:
    if method not in CALIBRATION_METHODS:
        raise BnportError(f"unknown calibration method {method!r}", f"use one of {', '.join(CALIBRATION_METHODS)}")


def load_float32_model(model) -> Any:
    """An onnx.ModelProto (a copy) from a path, serialized bytes or a ModelProto, checked to be a float32 model:
    float32 input and outputs, no float16 weights, no Quantize/DequantizeLinear nodes. Raises `BnportError` otherwise.
    """
    import onnx

    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    elif isinstance(model, (bytes, bytearray)):
        try:
            proto = onnx.load_from_string(bytes(model))
        except Exception as err:  # noqa: BLE001 - protobuf raises DecodeError and friends
            raise BnportError(f"the model bytes are not an ONNX model ({type(err).__name__})",
                              "pass the float32 file bnport export wrote") from None
    elif isinstance(model, (str, os.PathLike)):
        if not Path(model).is_file():
            raise BnportError(f"ONNX model not found: {model}", "check the path")
        try:
            proto = onnx.load(os.fspath(model))
        except Exception as err:  # noqa: BLE001 - protobuf raises DecodeError and friends
            raise BnportError(f"{model} is not an ONNX model ({type(err).__name__})",
                              "pass the float32 file bnport export wrote") from None
    else:
        raise BnportError(f"cannot read a model from {type(model).__name__}", "pass a path, bytes or onnx.ModelProto")
    _check_float32(proto)
    return proto


def _check_float32(model) -> None:
    hint = "start from the float32 file bnport export wrote, not from a converted one"
    graph = model.graph
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    for value in [*inputs, *graph.output]:
        elem = value.type.tensor_type.elem_type
        if elem != _FLOAT:
            import onnx

            raise BnportError(f"the model is not float32: {value.name!r} is "
                              f"{onnx.TensorProto.DataType.Name(elem).lower()}", hint)
    quantized = [n.op_type for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear",
                                                                  "QLinearConv", "ConvInteger", "MatMulInteger")]
    if quantized:
        raise BnportError(f"the model is already quantized ({len(quantized)} {quantized[0]} nodes)", hint)
    half = [t.name for t in graph.initializer if t.data_type == _FLOAT16]
    if half:
        raise BnportError(f"the model is not float32: {len(half)} float16 weights (e.g. {half[0]!r})", hint)


def _input_dims(model) -> tuple[str, list]:
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise BnportError(f"the model has {len(inputs)} inputs; bnport feeds one image batch",
                          "export the model with a single NCHW image input")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, dims


def _check_images(images, model, what: str, hint: str) -> np.ndarray:
    """`images` (numpy or torch, Nx3xHxW network inputs) as float32 numpy, checked against the model's input."""
    if images is None:
        raise BnportError(f"no {what} given", hint)
    array = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    _, dims = _input_dims(model)
    expected = "x".join("H" if d is None else str(d) for d in dims[1:]) if len(dims) == 4 else "?"
    if array.ndim != 4 or len(dims) != 4 or any(d is not None and d != s for d, s in zip(dims[1:], array.shape[1:])):
        raise BnportError(f"{what} have shape {list(array.shape)}, the model takes Nx{expected}",
                          "give network inputs (after the input spec), shaped N x 3 x H x W like the model's input")
    if len(array) == 0:
        raise BnportError(f"no {what} given (an empty batch)", hint)
    if not np.issubdtype(array.dtype, np.floating):
        raise BnportError(f"{what} are {array.dtype}, not float network inputs",
                          "apply the input spec first (InputSpec.to_tensor), giving float32 tensors")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise BnportError(f"{what} contain NaN or Inf", "check the images and the input spec's std")
    return array


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantization tools print progress and log warnings about choices made here on purpose."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


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


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


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
            raise BnportError(f"onnxruntime's quantization pre-processing failed: {_first_line(err)}",
                              "check that the float32 file runs on onnxruntime; report the model if it does")\
                from None
        return f"onnxruntime.quantization.quant_pre_process, symbolic shape inference skipped ({_first_line(first)})"


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

    _check_method(method)
    fp32 = load_float32_model(model)
    images = _check_images(calibration_images, fp32, "calibration images",
                           "INT8 needs calibration images: pass --calib-data SRC (images like the ones it will see)")
    input_name, dims = _input_dims(fp32)
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
    with tempfile.TemporaryDirectory(prefix="bnport-int8-") as tmp, _quiet():
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
    counts = _count_ops(quantized)
    if not counts.get("DequantizeLinear"):
        raise BnportError("onnxruntime quantized nothing in this model (no Conv, Gemm or MatMul it can quantize)",
                          "keep this model in fp32 or fp16")
    settings["qdq_nodes"] = {"QuantizeLinear": counts.get("QuantizeLinear", 0),
                             "DequantizeLinear": counts["DequantizeLinear"]}
    return quantized, settings


def _count_ops(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def convert_fp16(model) -> tuple[Any, dict]:
    """Float16 weights and compute, float32 input and output kept; returns (ModelProto, settings).

    onnxruntime's converter clamps weights beyond float16's range to it: `settings["weights_beyond_max"]` counts
    |w| > 65504 (clamped to 65504: the gate shows what that cost), `settings["weights_below_min"]` nonzero
    |w| < 6e-8 (raised to 6e-8, float16's smallest: negligible next to the other weights of any working layer).
    """
    import onnx
    import onnxruntime
    from onnx import numpy_helper
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    fp32 = load_float32_model(model)
    overflow = underflow = 0
    for tensor in fp32.graph.initializer:
        if tensor.data_type == _FLOAT:
            values = np.abs(numpy_helper.to_array(tensor))
            overflow += int((values > _FP16_MAX).sum())
            underflow += int(((values > 0) & (values < _FP16_MIN_POSITIVE)).sum())
    with _quiet():
        half = convert_float_to_float16(fp32, keep_io_types=True)
        # the converter appends its input Cast after the nodes that read it: valid for ORT, refused by onnx.checker
        OnnxModel(half).topological_sort()
    onnx.checker.check_model(half)
    settings = {"precision": "fp16", "keep_io_types": True,
                "converter": "onnxruntime.transformers.float16.convert_float_to_float16",
                "op_block_list": "onnxruntime default",
                "weights_beyond_max": overflow, "weights_below_min": underflow,
                "onnxruntime": onnxruntime.__version__}
    return half, settings


def cpu_float32_ops(model) -> dict[str, int]:
    """Op types (with node counts) that onnxruntime's CPU provider runs in float32 in a float16 model, because it has
    no float16 kernel for them: the consumers of the Casts it inserts when it loads the model."""
    import onnx
    import onnxruntime as ort

    data = model.SerializeToString() if hasattr(model, "SerializeToString") else bytes(model)
    original = onnx.load_from_string(data)
    own_casts = {n.name for n in original.graph.node if n.op_type == "Cast"}
    with tempfile.TemporaryDirectory(prefix="bnport-fp16-") as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "loaded.onnx")
        ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        loaded = onnx.load(options.optimized_model_filepath)
    inserted = {out for n in loaded.graph.node if n.op_type == "Cast" and n.name not in own_casts for out in n.output}
    counts: dict[str, int] = {}
    for node in loaded.graph.node:
        if node.op_type != "Cast" and any(i in inserted for i in node.input):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _row_cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Cosine per row (float64); both rows zero counts as 1, a NaN/Inf row as -1."""
    r = ref.reshape(len(ref), -1).astype(np.float64)
    o = out.reshape(len(out), -1).astype(np.float64)
    nr, no = np.linalg.norm(r, axis=1), np.linalg.norm(o, axis=1)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        cos = (r * o).sum(axis=1) / (nr * no)
    cos = np.where((nr == 0) & (no == 0), 1.0, cos)
    return np.where(np.isfinite(cos), cos, -1.0)


def _histogram(err: np.ndarray, scale: float) -> dict[str, int]:
    """Counts of |error| / scale per decade, from <1e-9 to >=1e-1 (the float32 gate's bins)."""
    rel = err / scale if scale > 0 else err
    edges = [0.0] + [10.0 ** k for k in range(-9, 0)] + [math.inf]
    labels = ["<1e-9"] + [f"1e{k}..1e{k + 1}" for k in range(-9, -1)] + [">=1e-1"]
    counts, _ = np.histogram(rel, bins=edges)
    return {label: int(c) for label, c in zip(labels, counts)}


def check_precision_parity(fp32_model, lower_model, *, precision: str, inputs, counts: dict[str, int] | None = None,
                           batch_sizes: tuple[int, ...] | list[int] = DEFAULT_BATCH_SIZES, device: str = "cpu",
                           min_cos: float | None = None, label: str = "") -> PrecisionParity:
    """Run the float32 and the lower-precision model (paths, bytes or ModelProtos) on `inputs` and judge the latter.

    `inputs`: N x 3 x H x W network inputs; `counts`: how many of each kind they hold, in order (as
    `build_parity_inputs` returns them; None: one kind, "inputs", judged). Batches cycle through `batch_sizes`.
    `device`: onnxruntime device for both files. `min_cos`: None = DEFAULT_MIN_COS[precision]. See the module
    docstring for which rows are judged.
    """
    from bnport.export.parity import split_batches
    from bnport.runtime.sessions import CHECK, GATE, create_session

    _check_precision(precision)
    if precision == "fp32":
        raise BnportError("the float32 file is its own reference", "check it against PyTorch with bnport export")
    required = DEFAULT_MIN_COS[precision] if min_cos is None else float(min_cos)
    x = inputs.detach().cpu().numpy() if hasattr(inputs, "detach") else np.asarray(inputs)
    x = np.ascontiguousarray(x, dtype=np.float32)
    counts = dict(counts) if counts else {"inputs": len(x)}
    if sum(counts.values()) != len(x):
        raise BnportError(f"input counts {counts} add up to {sum(counts.values())}, not {len(x)} inputs",
                          "pass the counts build_parity_inputs returned with these inputs")
    serialized = [m.SerializeToString() if hasattr(m, "SerializeToString") else m for m in (fp32_model, lower_model)]
    # the float32 file is the reference (full float32, as the float32 gate ran it); the converted file runs as it
    # will be deployed: a float16 file never has TF32 forced off (cuDNN has no plan for some of its convolutions)
    reference = create_session(serialized[0], device=device, use=GATE)
    candidate = create_session(serialized[1], device=device, use=CHECK)
    failures: list[str] = []
    pairs: list[tuple[np.ndarray, np.ndarray, int]] = []
    for start, stop in split_batches(len(x), batch_sizes):
        ref, got = reference.run_all(x[start:stop]), candidate.run_all(x[start:stop])
        if len(ref) != len(got):
            failures.append(f"the {precision} file has {len(got)} outputs, the float32 file {len(ref)}")
            break
        for r, o in zip(ref, got):
            if r.shape != o.shape:
                failures.append(f"output shape {list(o.shape)} differs from the float32 file's {list(r.shape)} "
                                f"at batch size {stop - start}")
                break
            pairs.append((r.astype(np.float64), o.astype(np.float64), start))
    kinds = np.repeat(np.array(list(counts), dtype=object), list(counts.values()))
    judged_kinds = ["real"] if precision == "int8" and counts.get("real") else [k for k, n in counts.items() if n]
    common = {"inputs": counts, "batch_sizes": list(batch_sizes), "providers": list(candidate.providers),
              "device": candidate.device, "atol": None, "rtol": None, "min_cos_required": required, "label": label,
              "precision": precision, "judged": judged_kinds, "session_settings": dict(candidate.settings)}
    if failures or not pairs:
        return PrecisionParity(False, math.inf, math.inf, math.inf, -1.0, 0.0, {}, {},
                               failures=failures or ["no outputs to compare"], **common)
    ref = np.concatenate([r.reshape(-1) for r, _, _ in pairs])
    out = np.concatenate([o.reshape(-1) for _, o, _ in pairs])
    if not np.all(np.isfinite(out)):
        failures.append(f"the {precision} file produced {int((~np.isfinite(out)).sum())} NaN/Inf values")
    err = np.abs(out - ref)
    err = np.where(np.isfinite(err), err, math.inf)
    scale = float(np.abs(ref[np.isfinite(ref)]).max(initial=0.0))
    significant = np.abs(ref) >= _REL_FLOOR * scale
    max_rel = float((err[significant] / np.abs(ref[significant])).max(initial=0.0))
    cos = np.concatenate([_row_cosines(r, o) for r, o, _ in pairs])
    row_kinds = np.concatenate([kinds[start:start + len(r)] for r, _, start in pairs])
    by_kind = {k: float(cos[row_kinds == k].min()) for k, n in counts.items() if n}
    judged = np.isin(row_kinds, judged_kinds)
    worst = float(cos[judged].min())
    low = int((cos[judged] < required).sum())
    if low:
        failures.append(f"{low} of {int(judged.sum())} {'/'.join(judged_kinds)} output rows with cosine below "
                        f"{required} (lowest {worst:.6f})")
    with np.errstate(invalid="ignore"):  # inf errors (NaN outputs) make the upper quantiles inf, as they should
        quantiles = {f"p{q * 100:g}": float(np.quantile(err, q)) for q in QUANTILES}
    return PrecisionParity(passed=not failures, max_abs=float(err.max()), mean_abs=float(err.mean()),
                           max_rel=max_rel, min_cos=worst, output_scale=scale, quantiles=quantiles,
                           histogram=_histogram(err, scale), failures=failures, min_cos_by_kind=by_kind,
                           mean_cos=float(cos[judged].mean()), **common)


def _input_spec(model, height: int, width: int):
    """The input spec export wrote into metadata_props, else insightface's default at the model's size."""
    from bnport.data.transforms import InputSpec

    props = {p.key: p.value for p in model.metadata_props}
    if "input_spec" in props:
        try:
            return InputSpec.from_dict(json.loads(props["input_spec"]))
        except (ValueError, KeyError, TypeError):
            pass
    return InputSpec(height, width)


def _spread(images: np.ndarray, limit: int) -> np.ndarray:
    picks = np.unique(np.linspace(0, len(images) - 1, num=min(limit, len(images))).round().astype(int))
    return images[picks]


def _carry_metadata(source, target) -> None:
    """The float32 file's metadata_props onto the new model, under whatever the conversion added."""
    import onnx

    props = {p.key: p.value for p in source.metadata_props}
    props.update({p.key: p.value for p in target.metadata_props})
    onnx.helper.set_model_props(target, props)


def make_precision(model, precision: str, *, calibration_images=None, method: str | None = None,
                   per_channel: bool | None = None, reduce_range: bool | None = None, parity_images=None,
                   input_spec=None, batch_sizes: tuple[int, ...] | list[int] | None = None,
                   min_cos: float | None = None, device: str = "cpu") -> PrecisionResult:
    """The `precision` version of a verified float32 ONNX model (path, bytes or ModelProto), checked against it.

    `precision`: "fp32" (the model itself, no gate), "fp16" or "int8". INT8 options: `calibration_images` (network
    inputs, N x 3 x H x W; required), `method` (None: "minmax"; or "entropy", "percentile"), `per_channel` (None:
    True), `reduce_range` (None: False; True for x86 CPUs without VNNI). The gate runs on `parity_images` (real
    network inputs; None: up to PARITY_REAL_LIMIT of the calibration images, evenly spread, which flatters INT8 a
    little since its ranges were fitted to them) plus the noise inputs of `build_parity_inputs`, built with
    `input_spec` (None: the spec in the model's metadata, else insightface's at the model's size), in batches cycling
    through `batch_sizes` (None: 1, 2, 8; the fixed batch of a static-batch file), on onnxruntime `device` ("cpu" by
    default: INT8 targets CPUs; "cuda" or "auto" for FP16 on a GPU). `min_cos`: None = DEFAULT_MIN_COS[precision].
    """
    import torch

    from bnport.export.parity import build_parity_inputs

    _check_precision(precision)
    if method is not None:
        _check_method(method)
    timings: dict[str, float] = {}
    began = time.perf_counter()
    fp32 = load_float32_model(model)
    fp32_bytes = fp32.SerializeToString()
    timings["load"] = time.perf_counter() - began
    if precision == "fp32":
        return PrecisionResult("fp32", fp32, None, {"precision": "fp32", "source_sha256": _sha256(fp32_bytes)},
                               timings)
    _, dims = _input_dims(fp32)
    if len(dims) != 4:
        raise BnportError(f"the model's input has rank {len(dims)}, not N x 3 x H x W",
                          "export the model with a single NCHW image input")
    notes: list[str] = []
    began = time.perf_counter()
    if precision == "int8":
        lower, settings = quantize_int8(fp32, calibration_images, method=method or "minmax",
                                        per_channel=True if per_channel is None else per_channel,
                                        reduce_range=bool(reduce_range))
        timings["quantize"] = time.perf_counter() - began
    else:
        lower, settings = convert_fp16(fp32)
        timings["convert"] = time.perf_counter() - began
        if settings["weights_beyond_max"]:
            notes.append(f"{settings['weights_beyond_max']} weights exceed float16's largest value (65504) and "
                         "were clamped to it")
    settings["source_sha256"] = _sha256(fp32_bytes)
    _carry_metadata(fp32, lower)

    began = time.perf_counter()
    real = None
    if parity_images is not None:
        real = _check_images(parity_images, fp32, "parity images", "pass real network inputs for the gate")
    elif calibration_images is not None:
        real = _spread(_check_images(calibration_images, fp32, "calibration images",
                                     "pass network inputs shaped like the model's input"), PARITY_REAL_LIMIT)
        settings["parity_on_calibration_images"] = True
    if real is None:
        notes.append("no real images given: the gate ran on noise inputs only")
    height, width = (dims[2], dims[3]) if real is None else real.shape[2:]
    if height is None or width is None:
        raise BnportError("the model's input size is not fixed and no images were given",
                          "pass parity_images (or calibration images) for the gate")
    spec = input_spec or _input_spec(fp32, height, width)
    inputs, counts = build_parity_inputs(spec, real=torch.from_numpy(real) if real is not None else None)
    parity = check_precision_parity(fp32_bytes, lower, precision=precision, inputs=inputs, counts=counts,
                                    batch_sizes=batch_sizes or ((dims[0],) if dims[0] else DEFAULT_BATCH_SIZES),
                                    device=device, min_cos=min_cos,
                                    label=f"{precision} vs float32")
    timings["parity"] = time.perf_counter() - began
    if precision == "fp16" and parity.device == "cpu":
        fallback = cpu_float32_ops(lower)
        if fallback:
            ops = ", ".join(f"{op} x{n}" for op, n in sorted(fallback.items()))
            notes.append(f"onnxruntime's CPU provider has no float16 kernel for {ops}: it casts them to float32, so "
                         "on a CPU this file runs float32 arithmetic on float16-rounded weights (no speed-up; the "
                         "figures above measure weight rounding, not float16 compute)")
    if precision == "int8" and parity.device == "cuda":
        notes.append("INT8 QDQ files are meant for CPUs: the CUDA provider runs their Quantize/DequantizeLinear "
                     "nodes around float kernels")
    return PrecisionResult(precision, lower, parity, settings, timings, notes)


def stamp_precision_metadata(result: PrecisionResult, *, calibration_data: dict | None = None,
                             extra: dict[str, str] | None = None) -> Any:
    """A copy of `result.model` with metadata_props: "precision", "precision_settings" (JSON), "precision_parity"
    (JSON figures vs the float32 file, or null), "calibration_data" (JSON of the caller's fingerprint of the
    calibration images, when given) and `extra`; the float32 file's own props (input spec, its PyTorch parity,
    provenance) stay."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(result.model)
    props = {p.key: p.value for p in model.metadata_props}
    props.update({"precision": result.precision, "precision_settings": json.dumps(result.settings, default=str),
                  "precision_parity": json.dumps(result.parity.to_dict() if result.parity is not None else None)})
    if calibration_data is not None:
        props["calibration_data"] = json.dumps(calibration_data, default=str)
    props.update({k: v for k, v in (extra or {}).items() if v is not None})
    onnx.helper.set_model_props(model, props)
    return model


def write_precision_model(model, path: str | os.PathLike) -> str:
    """Write a model (a `PrecisionResult`, whose gate must have passed, or an onnx.ModelProto) atomically; returns
    the sha256 of the bytes written. A failed result raises `BnportError`: write `result.model` explicitly (e.g. as
    OUT.onnx.rejected) to keep it for inspection."""
    from bnport.atomic import atomic_write_bytes

    if isinstance(model, PrecisionResult):
        if not model.passed:
            raise BnportError(f"the {model.precision} model failed its parity gate; not writing it as deployable",
                              "loosen min_cos if the figures are acceptable, or try another calibration method")
        model = model.model
    data = model.SerializeToString()
    atomic_write_bytes(Path(path), data)
    return _sha256(data)


def load_precision_images(src: str, spec, *, calibration: int = 64, parity: int = 16) -> tuple[np.ndarray, np.ndarray,
                                                                                                 dict]:
    """Calibration and gate images for a lower precision from a data SRC, disjoint: up to `calibration + parity`
    decodable images evenly spread over the source, every k-th one kept for the gate so it judges images the
    quantizer did not fit its ranges to. Returns (calibration N x 3 x H x W, parity, fingerprint of what was used)."""
    from bnport.data import open_images

    dataset = open_images(src, spec)
    if len(dataset) == 0:
        raise BnportError(f"no images in calibration data {src}", "point --calib-data at a folder, list, .rec or .bin")
    wanted = min(len(dataset), calibration + parity)
    picks = np.unique(np.linspace(0, len(dataset) - 1, num=wanted).round().astype(int))
    images, used = [], []
    for i in picks:
        item = dataset[int(i)][0]
        if item is not None:
            images.append(item.numpy())
            used.append(int(i))
    if len(images) < 2:
        raise BnportError(f"fewer than 2 decodable images in calibration data {src}", "check the image files")
    every = max(2, round(len(images) / max(1, min(parity, len(images) // 2))))
    gate = [k for k in range(len(images)) if k % every == every - 1][:parity]
    fit = [k for k in range(len(images)) if k not in set(gate)][:calibration]
    stack = np.stack(images).astype(np.float32)
    fingerprint = {**dataset.fingerprint(), "calibration_images": len(fit), "parity_images": len(gate),
                   "calibration_indices": [used[k] for k in fit], "parity_indices": [used[k] for k in gate]}
    return stack[fit], stack[gate], fingerprint
