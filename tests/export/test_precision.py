"""Tests for bnport.export.precision and bnport.runtime.latency on tiny folded float32 files exported by bnport: the
INT8 file is quantized (QDQ, int8 weights per output channel) and close to float32, the FP16 file keeps float32 I/O and
runs on the CPU, broken lower-precision files fail the gate, figures match a direct numpy computation, bad input is one
error."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

from bnport.data.transforms import InputSpec
from bnport.errors import BnportError
from bnport.export.onnx_export import export_onnx
from bnport.export.parity import build_parity_inputs
from bnport.export.precision import (
    DEFAULT_MIN_COS,
    ENTROPY_BINS,
    PrecisionParity,
    check_precision_parity,
    convert_fp16,
    cpu_float32_ops,
    make_precision,
    quantize_int8,
    stamp_precision_metadata,
    write_precision_model,
)
from bnport.export.settings import ExportSettings
from bnport.model.arch import create_model
from bnport.runtime.latency import measure_latencies, measure_latency
from tests.helpers.models import realistic_bn

SPEC = InputSpec()


def face_like(seed: int, size: int = 112) -> np.ndarray:
    """An RGB uint8 image with a face's layout: a lit oval on a darker background, eyes, a mouth, some noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    skin = rng.uniform(90, 210, 3)
    oval = np.exp(-(((yy - 0.5) / 0.42) ** 2 + ((xx - 0.5) / 0.32) ** 2) ** 2)
    image = 30 + skin * oval[..., None]
    for cy, cx, r, depth in ((0.42, 0.36, 0.05, 70), (0.42, 0.64, 0.05, 70), (0.72, 0.5, 0.08, 50)):
        cy, cx = cy + rng.normal(0, 0.02), cx + rng.normal(0, 0.02)
        image -= depth * np.exp(-((yy - cy) ** 2 + ((xx - cx) * 0.7) ** 2) / r ** 2)[..., None]
    image += rng.normal(0, 6, image.shape) + rng.uniform(-30, 30)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.stack([SPEC.to_tensor(face_like(i)) for i in range(24)])


@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("fp32") / "tiny.onnx"
    torch.manual_seed(0)
    report = export_onnx(realistic_bn(create_model("iresnet_tiny")), out, ExportSettings(exporter="torchscript"),
                         device="cpu")
    assert report, str(report)
    return str(out)


@pytest.fixture(scope="module")
def int8(fp32_file, images):
    return make_precision(fp32_file, "int8", calibration_images=images[:16], parity_images=images[16:])


@pytest.fixture(scope="module")
def fp16(fp32_file, images):
    return make_precision(fp32_file, "fp16", parity_images=images[16:])


def _run(model, x: np.ndarray) -> np.ndarray:
    data = model.SerializeToString() if hasattr(model, "SerializeToString") else model
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float64)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _producers(model) -> dict:
    return {out: node for node in model.graph.node for out in node.output}


def test_int8_file_holds_int8_weights_per_output_channel(int8, fp32_file):
    model = int8.model
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    float_weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(fp32_file).graph.initializer}
    producers = _producers(model)
    checked = rounded = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        dq = producers[node.input[1]]
        assert dq.op_type == "DequantizeLinear", node.name
        q, scale = initializers[dq.input[0]], initializers[dq.input[1]]
        assert q.dtype == np.int8
        assert scale.shape == (q.shape[0],), f"{node.name}: one scale per output channel"
        assert not initializers[dq.input[2]].any(), "symmetric int8 weights: zero point 0"
        assert {a.name: a.i for a in dq.attribute}.get("axis", 1) == 0, "scales along the output channels"
        # dequantized, the int8 weights are the float32 file's weights to within half a step of their channel
        original = float_weights[dq.input[0].removesuffix("_quantized")]
        steps = scale.reshape(-1, *[1] * (q.ndim - 1))
        assert np.abs(original - q * steps).max() <= 0.5 * scale.max() * (1 + 1e-5)
        rounded += bool(np.abs(original - q * steps).max() > 0)
        checked += 1
    assert checked == sum(op in ("Conv", "Gemm") for op in ops) > 5
    # every weight but the unit weights of the BN-shift convs (exact in int8: 127 x 1/127) really is rounded
    assert rounded >= checked - sum("_depthwise" in n.name for n in model.graph.node) > 5
    assert int8.settings["format"] == "QDQ" and int8.settings["per_channel"] is True
    assert (int8.settings["activation_type"], int8.settings["weight_type"]) == ("int8", "int8")
    assert int8.settings["calibration_images"] == 16 and int8.settings["method"] == "minmax"
    assert int8.settings["preprocess"].startswith("onnxruntime.quantization.quant_pre_process")


def test_int8_runs_close_to_float32_by_row_cosine(int8, fp32_file, images):
    assert int8, str(int8)
    parity = int8.parity
    assert isinstance(parity, PrecisionParity) and parity.batch_sizes == [1, 2, 8]
    assert parity.inputs == {"real": 8, "gaussian": 4, "constant": 3, "uniform": 2}
    assert parity.judged == ["real"] and parity.min_cos_required == DEFAULT_MIN_COS["int8"]
    # the figures, recomputed directly from both files on onnxruntime
    x, counts = build_parity_inputs(SPEC, real=images[16:])
    ref, got = _run(onnx.load(fp32_file), x.numpy()), _run(int8.model, x.numpy())
    cos = _cosines(ref, got)
    assert parity.min_cos_by_kind["real"] == pytest.approx(cos[:8].min(), abs=1e-6)
    assert parity.min_cos == pytest.approx(cos[:8].min(), abs=1e-6)
    assert parity.min_cos_by_kind["gaussian"] == pytest.approx(cos[8:12].min(), abs=1e-6)
    assert parity.max_abs == pytest.approx(np.abs(got - ref).max(), rel=1e-5)
    assert parity.output_scale == pytest.approx(np.abs(ref).max(), rel=1e-6)
    assert sum(parity.histogram.values()) == ref.size
    # measured over seeds 0-4 of this model: 0.998-0.999; calibrated 100x too wide: 0.58 or less
    assert DEFAULT_MIN_COS["int8"] <= cos[:8].min() < 1 - 1e-6, "INT8 is close to float32, and not identical"
    text = str(int8)
    assert "int8 parity PASS" in text and "rows reported, not judged" in text


def test_int8_calibrated_on_wrong_ranges_fails_the_gate(fp32_file, images, tmp_path):
    # ranges 100x too wide: every activation falls into a handful of int8 steps
    result = make_precision(fp32_file, "int8", calibration_images=images[:16] * 100, parity_images=images[16:])
    assert not result and not result.parity
    assert result.parity.min_cos_required == DEFAULT_MIN_COS["int8"]
    assert result.parity.min_cos_by_kind["real"] < 0.8
    assert any("cosine below" in f for f in result.parity.failures)
    with pytest.raises(BnportError, match="failed its parity gate"):
        write_precision_model(result, tmp_path / "int8.onnx")
    assert list(tmp_path.iterdir()) == []


def small_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=4),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    return realistic_bn(net)


def test_calibration_methods_pick_different_ranges(tmp_path, images):
    # a small net keeps ORT's pure-Python entropy search short (about a second per activation tensor)
    out = tmp_path / "small.onnx"
    assert export_onnx(small_net(), out, ExportSettings(exporter="torchscript"), device="cpu")

    def activation_ranges(model) -> dict[str, float]:
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node
                if n.op_type == "QuantizeLinear" and inits[n.input[1]].size == 1}

    ranges, settings = {}, {}
    for method in ("minmax", "entropy", "percentile"):
        model, settings[method] = quantize_int8(out, images[:16], method=method)
        ranges[method] = activation_ranges(model)
    assert settings["entropy"]["entropy_bins"] == [ENTROPY_BINS, 128] and settings["percentile"]["percentile"] == 99.999
    assert ranges["minmax"].keys() == ranges["entropy"].keys() == ranges["percentile"].keys()
    for method in ("entropy", "percentile"):
        # both clip outliers: never a wider range than minmax, narrower for some tensor (onnxruntime's own entropy
        # default, 128 bins for 128 quantized bins, would reproduce minmax exactly)
        assert all(ranges[method][k] <= ranges["minmax"][k] * (1 + 1e-6) for k in ranges["minmax"])
        assert any(ranges[method][k] < ranges["minmax"][k] * 0.999 for k in ranges["minmax"]), method


def test_static_batch_file_is_calibrated_and_checked_at_its_batch(tmp_path, images):
    out = tmp_path / "static.onnx"
    assert export_onnx(small_net(), out, ExportSettings(exporter="torchscript", static_batch=True), device="cpu")
    results = {p: make_precision(out, p, calibration_images=images[:5]) for p in ("int8", "fp16")}
    for result in results.values():
        assert result.parity.batch_sizes == [1] and result.parity.n_inputs == 5 + 9
        assert np.isfinite(result.parity.max_abs)
    assert (results["int8"].settings["calibration_batch"], results["int8"].settings["calibration_images"]) == (1, 5)


def test_fp16_file_keeps_float32_io_and_runs_on_cpu(fp16, fp32_file, images):
    assert fp16.parity.session_settings["use"] == "lower-precision gate"  # never TF32 forced off (a GATE session)
    model = fp16.model
    onnx.checker.check_model(model)
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [onnx.TensorProto.FLOAT]
    weights = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert fp16, str(fp16)
    assert fp16.settings["weights_beyond_max"] == 0 and not any("65504" in n for n in fp16.notes)
    assert fp16.parity.min_cos_required == DEFAULT_MIN_COS["fp16"]
    assert fp16.parity.judged == ["real", "gaussian", "constant", "uniform"]
    x, _ = build_parity_inputs(SPEC, real=images[16:])
    ref, got = _run(onnx.load(fp32_file), x.numpy()), _run(model, x.numpy())
    assert fp16.parity.min_cos == pytest.approx(_cosines(ref, got).min(), abs=1e-9)
    assert 0 < fp16.parity.max_abs < 1e-2 * fp16.parity.output_scale
    # ORT's CPU provider has no float16 Conv: it casts, and the result says so
    assert cpu_float32_ops(model).get("Conv", 0) >= 10
    assert any("no float16 kernel" in n and "Conv" in n for n in fp16.notes)


def test_fp16_with_weights_beyond_float16_fails_the_gate(fp32_file, images):
    model = onnx.load(fp32_file)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    weight = next(t for t in model.graph.initializer if t.name == gemm.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1e8, weight.name))
    half, settings = convert_fp16(model)
    onnx.checker.check_model(half)
    assert settings["weights_beyond_max"] > 0 and settings["weights_below_min"] == 0
    x, counts = build_parity_inputs(SPEC, real=images[16:])
    parity = check_precision_parity(model, half, precision="fp16", inputs=x, counts=counts)
    assert not parity and parity.min_cos < 0.99
    assert "cosine below 0.9999" in "; ".join(parity.failures)


def test_fp32_is_passed_through(fp32_file):
    result = make_precision(fp32_file, "fp32")
    assert result and result.parity is None
    assert result.model.SerializeToString() == onnx.load(fp32_file).SerializeToString()


def test_stamp_and_write(int8, tmp_path):
    fingerprint = {"source": "images/", "count": 16, "sha256": "ab" * 32}
    stamped = stamp_precision_metadata(int8, calibration_data=fingerprint)
    props = {p.key: p.value for p in stamped.metadata_props}
    assert props["precision"] == "int8"
    assert json.loads(props["precision_settings"])["method"] == "minmax"
    assert json.loads(props["precision_parity"])["min_cos_by_kind"]["real"] == int8.parity.min_cos_by_kind["real"]
    assert json.loads(props["calibration_data"]) == fingerprint
    assert "input_spec" in props and "parity" in props, "the float32 file's own metadata is carried over"
    assert not {p.key for p in int8.model.metadata_props} & {"precision", "calibration_data"}, "result left as is"
    out = tmp_path / "deploy" / "model.int8.onnx"
    sha = write_precision_model(stamped, out)
    assert sha == hashlib.sha256(out.read_bytes()).hexdigest()
    assert [p.name for p in out.parent.iterdir()] == ["model.int8.onnx"]
    assert {p.key: p.value for p in onnx.load(out).metadata_props}["precision"] == "int8"


def test_latency_medians_per_batch_size(fp32_file, int8):
    result = measure_latency(fp32_file, batch_sizes=(1, 8), runs=3, warmup=1, threads=1)
    assert set(result.median_ms) == {1, 8} and all(v > 0 for v in result.median_ms.values())
    assert result.min_ms[8] > result.min_ms[1], "eight images take longer than one"
    assert result.providers == ["CPUExecutionProvider"] and result.input_shape == [3, 112, 112]
    assert result.settings["use"] == "as deployed (onnxruntime defaults)"
    both = measure_latencies({"fp32": fp32_file, "int8": int8.model}, batch_sizes=(2,), runs=2, warmup=0, threads=1)
    assert set(both) == {"fp32", "int8"} and all(r.median_ms[2] > 0 for r in both.values())
    with pytest.raises(BnportError, match="batch sizes must be positive"):
        measure_latency(fp32_file, batch_sizes=(0,))


def test_bad_input_is_one_error_with_a_hint(fp32_file, int8, fp16, images, tmp_path):
    cases = [
        (lambda: make_precision(int8.model, "int8", calibration_images=images[:4]), "already quantized"),
        (lambda: make_precision(fp16.model, "int8", calibration_images=images[:4]), "not float32"),
        (lambda: make_precision(fp32_file, "int8", calibration_images=images[:4, :, :64, :64]),
         r"calibration images have shape \[4, 3, 64, 64\], the model takes Nx3x112x112"),
        (lambda: make_precision(fp32_file, "int8", calibration_images=images[:4].numpy().astype(np.uint8)),
         "not float network inputs"),
        (lambda: make_precision(fp32_file, "int8"), "no calibration images"),
        (lambda: make_precision(fp32_file, "int8", calibration_images=images[:4], method="kl"),
         "unknown calibration method 'kl'"),
        (lambda: make_precision(fp32_file, "bf16"), "unknown precision 'bf16'"),
        (lambda: make_precision(tmp_path / "missing.onnx", "fp16"), "ONNX model not found"),
        (lambda: make_precision(b"not a model", "fp16"), "not an ONNX model"),
    ]
    for call, message in cases:
        with pytest.raises(BnportError, match=message) as caught:
            call()
        assert caught.value.hint, message
        assert "\n" not in str(caught.value)
