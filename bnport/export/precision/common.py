"""What the converters take, checked: a float32 ONNX model (from a path, bytes or a ModelProto; never one already
converted), network-input images shaped like its input; and the quiet context onnxruntime's tools run in."""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bnport.errors import BnportError

FLOAT = 1  # onnx.TensorProto.FLOAT
FLOAT16 = 10


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
        if elem != FLOAT:
            import onnx

            raise BnportError(f"the model is not float32: {value.name!r} is "
                              f"{onnx.TensorProto.DataType.Name(elem).lower()}", hint)
    quantized = [n.op_type for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear",
                                                                  "QLinearConv", "ConvInteger", "MatMulInteger")]
    if quantized:
        raise BnportError(f"the model is already quantized ({len(quantized)} {quantized[0]} nodes)", hint)
    half = [t.name for t in graph.initializer if t.data_type == FLOAT16]
    if half:
        raise BnportError(f"the model is not float32: {len(half)} float16 weights (e.g. {half[0]!r})", hint)


def input_dims(model) -> tuple[str, list]:
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise BnportError(f"the model has {len(inputs)} inputs; bnport feeds one image batch",
                          "export the model with a single NCHW image input")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, dims


def check_images(images, model, what: str, hint: str) -> np.ndarray:
    """`images` (numpy or torch, Nx3xHxW network inputs) as float32 numpy, checked against the model's input."""
    if images is None:
        raise BnportError(f"no {what} given", hint)
    array = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    _, dims = input_dims(model)
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


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """onnxruntime's quantization tools print progress and log warnings about choices made here on purpose."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def count_ops(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
