"""The ONNX side of the fold passes: a producer / consumer view of one graph that stays current while folds rewrite
it (`OnnxGraph`), constant lookup through initializers and Constant nodes, inferred static shapes, and the small
node-attribute helpers. Queries and edits only; the patterns are in `bnport.export.fold_onnx`.
"""
from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import helper, numpy_helper


class Keep(Exception):
    """A pattern does not apply; the message says why."""


def attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


class OnnxGraph:
    """Producer / consumer maps and constant lookup over one graph, kept current as folds rewrite it."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.inputs = {i.name for i in self.graph.input}
        self.outputs = {o.name for o in self.graph.output}
        self.initializers = {t.name: t for t in self.graph.initializer}
        self._shapes: dict[str, list[int | str | None]] | None = None
        self.names = {n.name for n in self.graph.node} | {t.name for t in self.graph.initializer}
        self.names |= {v for n in self.graph.node for v in n.output}
        self.refresh()

    @property
    def shapes(self) -> dict[str, list[int | str | None]]:
        """Inferred shapes of the graph as first seen; folds keep the shapes of every tensor that survives them."""
        if self._shapes is None:
            self._shapes = static_shapes(self.model)
        return self._shapes

    def refresh(self) -> None:
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.constant_nodes: dict[str, onnx.NodeProto] = {}
        for node in self.graph.node:
            for out in node.output:
                self.producer[out] = node
            if node.op_type == "Constant":
                self.constant_nodes[node.output[0]] = node
            for name in node_inputs(node):
                self.consumers.setdefault(name, []).append(node)

    def fresh(self, base: str) -> str:
        for i in itertools.count():
            name = base if i == 0 else f"{base}_{i}"
            if name not in self.names:
                self.names.add(name)
                return name
        raise AssertionError("unreachable")

    def constant(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        if name in self.initializers and name not in self.inputs:
            return numpy_helper.to_array(self.initializers[name])
        node = self.constant_nodes.get(name)
        if node is not None and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def add_constant(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
        self.graph.initializer.append(tensor)
        self.initializers[name] = tensor
        return name

    def only_consumer(self, tensor: str, expected: onnx.NodeProto) -> None:
        """Raise _Keep unless `expected` is the only reader of `tensor` and the tensor is not a graph output."""
        if tensor in self.outputs:
            raise Keep(f"{tensor} is a graph output")
        readers = self.consumers.get(tensor, [])
        if len(readers) != 1 or readers[0] is not expected:
            raise Keep(f"{tensor} has {len(readers)} consumers")

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    def weight(self, node: onnx.NodeProto, index: int, what: str) -> np.ndarray:
        """The constant input `index` of `node`; Keep when it is computed."""
        value = self.constant(node.input[index]) if len(node.input) > index else None
        if value is None:
            raise Keep(f"{node.op_type} {node.name or node.output[0]} has a non-constant {what}")
        return value

    def constant_bias(self, conv: onnx.NodeProto) -> np.ndarray | None:
        """A Conv/ConvTranspose node's bias as an array, None when it has none; Keep when it is computed."""
        if len(conv.input) <= 2 or not conv.input[2]:
            return None
        b = self.constant(conv.input[2])
        if b is None:
            raise Keep(f"{conv.op_type} {conv.name} has a non-constant bias")
        return b

    def remove(self, node: onnx.NodeProto) -> None:
        self.graph.node.remove(node)

    def insert_after(self, anchor: onnx.NodeProto, node: onnx.NodeProto) -> None:
        index = list(self.graph.node).index(anchor)
        self.graph.node.insert(index + 1, node)

    def prune(self) -> None:
        """Drop initializers, Constant nodes and value_info that nothing reads any more."""
        self.refresh()
        used = set(self.consumers) | self.outputs
        for node in [n for n in self.graph.node if n.op_type == "Constant" and n.output[0] not in used]:
            self.graph.node.remove(node)
        keep = [t for t in self.graph.initializer if t.name in used or t.name in self.inputs]
        if len(keep) != len(self.graph.initializer):
            del self.graph.initializer[:]
            self.graph.initializer.extend(keep)
        live = {v for n in self.graph.node for v in n.output} | self.inputs
        info = [v for v in self.graph.value_info if v.name in live]
        if len(info) != len(self.graph.value_info):
            del self.graph.value_info[:]
            self.graph.value_info.extend(info)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.refresh()


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Inputs of a node including names its subgraphs (If / Loop / Scan bodies) read from the outer scope."""
    names = [i for i in node.input if i]
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
            names += [i for n in g.node for i in node_inputs(n) if i not in inner]
    return names


def static_shapes(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """Tensor name -> dims (int, symbolic name, or None) from ONNX shape inference; empty when inference fails.

    Inference runs on a light copy whose large initializers are declared as typed graph inputs instead, since
    serialising hundreds of MB of weights costs more than the inference itself.
    """
    light = onnx.ModelProto()
    light.CopyFrom(model)
    small = [t for t in light.graph.initializer if int(np.prod(t.dims, dtype=np.int64)) <= 64]
    declared = {i.name for i in light.graph.input}
    for t in light.graph.initializer:
        if int(np.prod(t.dims, dtype=np.int64)) > 64 and t.name not in declared:
            light.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del light.graph.initializer[:]
    light.graph.initializer.extend(small)
    try:
        inferred = onnx.shape_inference.infer_shapes(light)
    except Exception:  # noqa: BLE001 - shapes only unlock the MatMul / flatten patterns; without them those are kept
        return {}
    shapes = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                              for d in v.type.tensor_type.shape.dim]
    return shapes


def set_input(node: onnx.NodeProto, index: int, name: str) -> None:
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = name
