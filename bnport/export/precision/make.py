"""A lower-precision file made from a verified float32 file, behind its gate: `make_precision` (convert, then judge
against the float32 file), the metadata it carries, the images it is calibrated and judged on (disjoint), and
`lower_precision_file`, which makes one for a precision and writes it as a gated file is written
(bnport.export.export_report.write_or_reject): `bnport export --precision` and `bnport score --precision` both go
through it. Nothing is written to disk except by `write_precision_model` and `lower_precision_file` (atomic).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnport.atomic import atomic_write_bytes
from bnport.errors import BnportError
from bnport.export.precision.common import check_images, input_dims, load_float32_model, sha256
from bnport.export.precision.fp16 import convert_fp16, cpu_float32_ops
from bnport.export.precision.gate import DEFAULT_BATCH_SIZES, PrecisionParity, check_precision_parity
from bnport.export.precision.int8 import check_method, quantize_int8
from bnport.export.settings import PrecisionSettings, check_precision

# the real images the gate checks when the caller gives none: this many of the calibration images, evenly spread
PARITY_REAL_LIMIT = 16


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


def make_precision(model, precision: str, *, calibration_images=None, method: str | None = None, parity_images=None,
                   input_spec=None, batch_sizes: tuple[int, ...] | list[int] | None = None,
                   min_cos: float | None = None, device: str = "cpu") -> PrecisionResult:
    """The `precision` version of a verified float32 ONNX model (path, bytes or ModelProto), checked against it.

    `precision`: "fp32" (the model itself, no gate), "fp16" or "int8". INT8 options: `calibration_images` (network
    inputs, N x 3 x H x W; required), `method` (None: "minmax"; or "entropy", "percentile"); weights per channel, no
    reduced range (bnport.export.precision.int8). The gate runs on `parity_images` (real network inputs; None: up to
    PARITY_REAL_LIMIT of the calibration images, evenly spread, which flatters INT8 a little since its ranges were
    fitted to them) plus the noise inputs of `build_parity_inputs`, built with `input_spec` (None: the spec in the
    model's metadata, else insightface's at the model's size), in batches cycling through `batch_sizes` (None: 1, 2,
    8; the fixed batch of a static-batch file), on onnxruntime `device` ("cpu" by default: INT8 targets CPUs; "cuda"
    or "auto" for FP16 on a GPU). `min_cos`: None = DEFAULT_MIN_COS[precision].
    """
    check_precision(precision)
    if method is not None:
        check_method(method)
    timings: dict[str, float] = {}
    began = time.perf_counter()
    fp32 = load_float32_model(model)
    fp32_bytes = fp32.SerializeToString()
    timings["load"] = time.perf_counter() - began
    if precision == "fp32":
        return PrecisionResult("fp32", fp32, None, {"precision": "fp32", "source_sha256": sha256(fp32_bytes)},
                               timings)
    _, dims = input_dims(fp32)
    if len(dims) != 4:
        raise BnportError(f"the model's input has rank {len(dims)}, not N x 3 x H x W",
                          "export the model with a single NCHW image input")
    notes: list[str] = []
    began = time.perf_counter()
    if precision == "int8":
        lower, settings = quantize_int8(fp32, calibration_images, method=method or "minmax")
        timings["quantize"] = time.perf_counter() - began
    else:
        lower, settings = convert_fp16(fp32)
        timings["convert"] = time.perf_counter() - began
        if settings["weights_beyond_max"]:
            notes.append(f"{settings['weights_beyond_max']} weights exceed float16's largest value (65504) and "
                         "were clamped to it")
    settings["source_sha256"] = sha256(fp32_bytes)
    _carry_metadata(fp32, lower)
    began = time.perf_counter()
    inputs, counts = _gate_inputs(fp32, dims, calibration_images, parity_images, input_spec, settings, notes)
    parity = check_precision_parity(fp32_bytes, lower, precision=precision, inputs=inputs, counts=counts,
                                    batch_sizes=batch_sizes or ((dims[0],) if dims[0] else DEFAULT_BATCH_SIZES),
                                    device=device, min_cos=min_cos, label=f"{precision} vs float32")
    timings["parity"] = time.perf_counter() - began
    notes += _runtime_notes(precision, lower, parity.device)
    return PrecisionResult(precision, lower, parity, settings, timings, notes)


def _gate_inputs(fp32, dims: list, calibration_images, parity_images, input_spec, settings: dict, notes: list):
    """The gate's inputs and their counts: real images (the parity images, else some calibration images) then the
    noise inputs of build_parity_inputs."""
    import torch

    from bnport.export.parity import build_parity_inputs

    real = None
    if parity_images is not None:
        real = check_images(parity_images, fp32, "parity images", "pass real network inputs for the gate")
    elif calibration_images is not None:
        real = _spread(check_images(calibration_images, fp32, "calibration images",
                                    "pass network inputs shaped like the model's input"), PARITY_REAL_LIMIT)
        settings["parity_on_calibration_images"] = True
    if real is None:
        notes.append("no real images given: the gate ran on noise inputs only")
    height, width = (dims[2], dims[3]) if real is None else real.shape[2:]
    if height is None or width is None:
        raise BnportError("the model's input size is not fixed and no images were given",
                          "pass parity_images (or calibration images) for the gate")
    spec = input_spec or _input_spec(fp32, height, width)
    return build_parity_inputs(spec, real=torch.from_numpy(real) if real is not None else None)


def _runtime_notes(precision: str, lower, device: str) -> list[str]:
    """What the runtime the gate ran on does with the file (ops it runs in float32, providers it was not made for)."""
    if precision == "fp16" and device == "cpu":
        fallback = cpu_float32_ops(lower)
        if fallback:
            ops = ", ".join(f"{op} x{n}" for op, n in sorted(fallback.items()))
            return [f"onnxruntime's CPU provider has no float16 kernel for {ops}: it casts them to float32, so on a "
                    "CPU this file runs float32 arithmetic on float16-rounded weights (no speed-up; the figures above "
                    "measure weight rounding, not float16 compute)"]
    if precision == "int8" and device == "cuda":
        return ["INT8 QDQ files are meant for CPUs: the CUDA provider runs their Quantize/DequantizeLinear nodes "
                "around float kernels (use the CPU, or TensorRT where its provider loads)"]
    return []


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
    if isinstance(model, PrecisionResult):
        if not model.passed:
            raise BnportError(f"the {model.precision} model failed its parity gate; not writing it as deployable",
                              "loosen min_cos if the figures are acceptable, or try another calibration method")
        model = model.model
    data = model.SerializeToString()
    atomic_write_bytes(Path(path), data)
    return sha256(data)


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


@dataclass
class LowerFile:
    """A lower-precision file written by `lower_precision_file`: `path` is OUT.onnx when its gate `passed`, else
    OUT.onnx.rejected; `result` the conversion and gate; `calibration_data` the fingerprint of the images used."""

    path: Path
    passed: bool
    sha256: str
    result: PrecisionResult
    calibration_data: dict | None
    seconds: float

    def card(self, fp32_file: Path) -> dict:
        """What an export report and a bundle's card say of it: the figures, how it was made, two lines of text."""
        if self.passed:
            head = f"wrote {self.path} ({self.result.precision}, sha256 {self.sha256[:16]}...) from the float32 file " \
                   f"{fp32_file}"
        else:
            head = f"{self.result.precision} FAILED its gate against the float32 file: no " \
                   f"{self.path.with_suffix('')} written; rejected file at {self.path}"
        return {"precision": self.result.precision, "passed": self.passed, "fp32_file": str(fp32_file),
                **self.result.to_dict(), "calibration_data": self.calibration_data,
                "text": [head, str(self.result)]}

    def write_report(self, report: dict) -> None:
        """The report beside a rejected file (OUT.onnx.rejected.json)."""
        atomic_write_bytes(self.path.with_name(self.path.name + ".json"),
                           (json.dumps(report, indent=1, default=str) + "\n").encode())


def lower_precision_file(fp32_file: Path, out: Path, precision: str, settings: PrecisionSettings | None = None, *,
                         spec=None, calib_src: str | None = None, images=None, device: str = "auto") -> LowerFile:
    """Convert the verified float32 file `fp32_file` to `precision` behind its gate and write it as `out` (or
    OUT.onnx.rejected). INT8 calibrates on `settings.calib_images` images of `calib_src` (the gate judges others of
    the same source); `images` = (calibration, gate, fingerprint) already read from it, None to read them now. INT8
    is judged on the CPU (the provider it is meant for), FP16 on `device`."""
    from bnport.export.export_report import write_or_reject

    settings = settings or PrecisionSettings()
    began = time.perf_counter()
    if images is None and calib_src is not None:
        images = load_precision_images(calib_src, spec, calibration=settings.calib_images)
    calibration, parity, fingerprint = images if images is not None else (None, None, None)
    result = make_precision(fp32_file, precision, calibration_images=calibration if precision == "int8" else None,
                            parity_images=parity, method=settings.calib_method, input_spec=spec,
                            min_cos=settings.min_cos, device="cpu" if precision == "int8" else device)
    data = stamp_precision_metadata(result, calibration_data=fingerprint).SerializeToString()
    path = write_or_reject(Path(out), data, passed=result.passed)
    return LowerFile(path, result.passed, sha256(data), result, fingerprint, time.perf_counter() - began)
