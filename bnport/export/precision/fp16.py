"""FP16 by `onnxruntime.transformers.float16.convert_float_to_float16` with `keep_io_types`: float16 weights and
compute, float32 input and output. On ORT's CPU provider most ops have no float16 kernel: ORT inserts Casts and runs
them in float32 on the float16-rounded weights, so FP16 gains nothing on a CPU and its CPU gate measures weight
rounding only (`cpu_float32_ops` lists the ops)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bnport.export.precision.common import FLOAT, load_float32_model, quiet

_FP16_MAX = 65504.0
_FP16_MIN_POSITIVE = 5.96e-08


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
        if tensor.data_type == FLOAT:
            values = np.abs(numpy_helper.to_array(tensor))
            overflow += int((values > _FP16_MAX).sum())
            underflow += int(((values > 0) & (values < _FP16_MIN_POSITIVE)).sum())
    with quiet():
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
