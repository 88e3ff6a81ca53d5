"""ONNX graphs built by hand with onnx.helper, small enough to check by a direct numpy computation."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def gemm_model(weight: np.ndarray, bias: np.ndarray) -> bytes:
    """y = x @ W^T + b, and a second output relu(y), with a dynamic batch."""
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["data", "W", "b"], ["y"], transB=1), helper.make_node("Relu", ["y"], ["r"])],
        "gemm", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["batch", weight.shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", weight.shape[0]]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, ["batch", weight.shape[0]])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def image_embedder(weight: np.ndarray, *, head: str = "linear", input_name: str = "data",
                   size: tuple[int, int] | None = None, metadata: dict[str, str] | None = None) -> bytes:
    """An NCHW image model with a dynamic batch (height and width fixed to `size`, or left open): the flattened image
    times `weight` (D x 3HW), then `head`:
    "linear" gives that N x D embedding; "sqrt" the square root of each image's mean input value (N x 1, NaN for an
    image darker than the normalisation's mean); "vector" the mean of each row as a flat N vector; "transposed"
    the D x N embedding. `metadata` goes into metadata_props."""
    dim = weight.shape[0]
    nodes = [helper.make_node("Flatten", [input_name], ["flat"], axis=1)]
    if head in ("linear", "transposed"):
        nodes.append(helper.make_node("Gemm", ["flat", "W"], ["emb" if head == "linear" else "y"], transB=1))
        if head == "transposed":
            nodes.append(helper.make_node("Transpose", ["y"], ["emb"], perm=[1, 0]))
        shape = ["batch", dim] if head == "linear" else [dim, "batch"]
    else:
        nodes.append(helper.make_node("ReduceMean", ["flat"], ["mean" if head == "sqrt" else "emb"], axes=[1],
                                      keepdims=1 if head == "sqrt" else 0))
        if head == "sqrt":
            nodes.append(helper.make_node("Sqrt", ["mean"], ["emb"]))
        shape = ["batch", 1] if head == "sqrt" else ["batch"]
    image = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", 3, *(size or (None, None))])
    graph = helper.make_graph(nodes, "embedder", [image],
                              [helper.make_tensor_value_info("emb", TensorProto.FLOAT, shape)],
                              initializer=[numpy_helper.from_array(weight.astype(np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    if metadata:
        helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    return model.SerializeToString()
