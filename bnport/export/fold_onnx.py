"""Second-line BatchNorm folding on the ONNX graph: no BatchNormalization left next to a linear op survives.

The PyTorch-side fold (`bnport.export.fold_torch`) runs first; this pass catches what an exporter re-introduces or what
only becomes visible in the exported graph. Each BatchNormalization node (inference mode, spatial) is folded, when
exact, into its producer (Conv, ConvTranspose, Gemm, MatMul, MatMul -> Add, a channel Concat of Convs) or into its
consumer (Conv without padding; zero-padded Conv with the shift kept in front of it; Gemm / MatMul, directly or
through a Flatten or a flattening Reshape). The formulas, the refusal rules and the pattern names are those of
`bnport.export.bn_math`, as in the PyTorch pass; a decision's reason names the ONNX ops. A shift kept in front of a
zero-padded conv, by this pass or by the PyTorch fold, is written as a 1x1 depthwise Conv with unit weights, the form
onnxruntime's CPU layout pass keeps in its fast layout. The tensor between the two nodes must have no other consumer
and not be a graph output; the math is float64, cast back to the weight's dtype. A weight shared with other nodes is
copied rather than changed, so the fold never alters another node. Every BatchNormalization gets a decision with its
reason, folded or kept.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import helper

from bnport.export import bn_math
from bnport.export.onnx_graph import Keep, OnnxGraph, attr, set_attr, set_input


@dataclass
class OnnxBnDecision:
    """What happened to one BatchNormalization node: `action` is "fold" or "keep"."""

    node: str
    action: str
    pattern: str
    neighbour: str
    reason: str


@dataclass
class OnnxFoldSummary:
    """The decisions of one `fold_onnx_bn` pass and the BatchNormalization counts around it."""

    bn_before: int
    bn_after: int
    decisions: list[OnnxBnDecision] = field(default_factory=list)
    shift_convs: int = 0

    @property
    def kept(self) -> list[OnnxBnDecision]:
        return [d for d in self.decisions if d.action == "keep"]

    @property
    def folded(self) -> list[OnnxBnDecision]:
        return [d for d in self.decisions if d.action == "fold"]

    def to_dict(self) -> dict:
        return {"bn_before": self.bn_before, "bn_after": self.bn_after, "shift_convs": self.shift_convs,
                "decisions": [asdict(d) for d in self.decisions]}

    def __str__(self) -> str:
        lines = [(f"ONNX BatchNormalization nodes: {self.bn_before} before, {self.bn_after} after "
                  f"({len(self.folded)} folded; {self.shift_convs} shifts before zero-padded convs as 1x1 depthwise "
                  "convs)")]
        lines += [f"  {d.action} {d.node}: {d.pattern}{' into ' + d.neighbour if d.neighbour else ''} ({d.reason})"
                  for d in self.decisions]
        return "\n".join(lines)


def count_bn_nodes(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes in the main graph."""
    return sum(node.op_type == "BatchNormalization" for node in model.graph.node)


def _bn_scale_shift(g: OnnxGraph, bn: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray]:
    """float64 (s, t) with BN(x) = s * x + t per channel; raises Keep when the BN cannot be folded at all."""
    if attr(bn, "training_mode", 0):
        raise Keep("training_mode=1")
    if not attr(bn, "spatial", 1):
        raise Keep("spatial=0 (per-element statistics)")
    if len([o for o in bn.output if o]) != 1:
        raise Keep("it also outputs running statistics")
    params = [g.constant(name) for name in bn.input[1:5]]
    if len(params) != 4 or any(p is None for p in params):
        raise Keep("its scale/bias/mean/var are not constants")
    gamma, beta, mean, var = params
    s, t = bn_math.bn_scale_shift(mean, var, float(attr(bn, "epsilon", 1e-5)), gamma, beta)
    unusable = bn_math.unusable_reason(s, t)
    if unusable:
        raise Keep(unusable)
    return s, t


def _cast(value: np.ndarray, like: np.ndarray) -> np.ndarray:
    return value.astype(like.dtype)


def _bias_vector(c: np.ndarray, n: int) -> np.ndarray:
    """A Gemm C / Add constant that broadcasts per output column, as an (n,) float64 vector."""
    if c.size == 1 or c.shape in ((n,), (1, n)):
        return np.broadcast_to(c.astype(np.float64).reshape(-1), (n,)).copy()
    raise Keep(f"its bias has shape {list(c.shape)}, not per column")


def _scale_conv_outputs(g: OnnxGraph, conv: onnx.NodeProto, s: np.ndarray, t: np.ndarray) -> None:
    """Conv or ConvTranspose weights and bias for s * conv(x) + t per output channel (shapes checked by the caller)."""
    w = g.weight(conv, 1, "weight")
    transposed = conv.op_type == "ConvTranspose"
    new_w, new_b = bn_math.fold_output_channels(w, g.constant_bias(conv), s, t, groups=int(attr(conv, "group", 1)),
                                                transposed=transposed)
    name = conv.name or conv.op_type.lower()
    set_input(conv, 1, g.add_constant(f"{name}_bnfold_weight", _cast(new_w, w)))
    set_input(conv, 2, g.add_constant(f"{name}_bnfold_bias", _cast(new_b, w)))


def _fold_into_conv(g: OnnxGraph, bn: onnx.NodeProto, conv: onnx.NodeProto, s: np.ndarray, t: np.ndarray) -> None:
    w = g.weight(conv, 1, "weight")
    g.constant_bias(conv)
    if conv.op_type == "ConvTranspose":
        groups = int(attr(conv, "group", 1))
        if w.shape[1] * groups != s.size or w.shape[0] % groups:
            raise Keep(f"ConvTranspose has {w.shape[1] * groups} output channels, the BN {s.size}")
    elif w.shape[0] != s.size:
        raise Keep(f"Conv has {w.shape[0]} output channels, the BN {s.size}")
    _scale_conv_outputs(g, conv, s, t)
    conv.output[0] = bn.output[0]
    g.remove(bn)


def _fold_into_concat(g: OnnxGraph, bn: onnx.NodeProto, concat: onnx.NodeProto, s: np.ndarray, t: np.ndarray) -> str:
    """Concat of Conv outputs along channels -> BN (MixNet's mixed convs): each conv takes its slice of the BN.
    Returns the convs' names."""
    axis = int(attr(concat, "axis", 0))
    if axis < 0:
        rank = g.rank(concat.output[0])
        if rank is None:
            raise Keep(f"its input is a Concat along axis {axis} of unknown rank")
        axis += rank
    if axis != 1:
        raise Keep(f"its input is a Concat along axis {axis}, not the channel axis")
    if len(set(concat.input)) != len(concat.input):
        raise Keep("its input is a Concat that joins one tensor twice")
    convs = [g.producer.get(name) for name in concat.input]
    if any(conv is None or conv.op_type != "Conv" for conv in convs):
        kinds = ", ".join("input" if conv is None else conv.op_type for conv in convs)
        raise Keep(f"its input is a Concat of {kinds}, not of Convs alone")
    widths = []
    for name, conv in zip(concat.input, convs):
        g.only_consumer(name, concat)
        g.constant_bias(conv)
        widths.append(g.weight(conv, 1, "weight").shape[0])
    if sum(widths) != s.size:
        raise Keep(f"its input is a Concat of {sum(widths)} conv channels, the BN has {s.size}")
    start = 0
    for conv, width in zip(convs, widths):
        _scale_conv_outputs(g, conv, s[start:start + width], t[start:start + width])
        start += width
    concat.output[0] = bn.output[0]
    g.remove(bn)
    return ", ".join(conv.name or conv.output[0] for conv in convs)


def _fold_into_gemm(g: OnnxGraph, bn: onnx.NodeProto, gemm: onnx.NodeProto, s: np.ndarray, t: np.ndarray) -> None:
    w = g.weight(gemm, 1, "B")
    trans_b = int(attr(gemm, "transB", 0))
    n_out = w.shape[0] if trans_b else w.shape[1]
    if n_out != s.size:
        raise Keep(f"Gemm has {n_out} outputs, the BN {s.size} channels")
    has_c = len(gemm.input) > 2 and gemm.input[2]
    c = g.constant(gemm.input[2]) if has_c else None
    if has_c and c is None:
        raise Keep(f"Gemm {gemm.name} has a non-constant C")
    c64 = None if c is None else float(attr(gemm, "beta", 1.0)) * _bias_vector(c, n_out)
    new_w, new_c = bn_math.fold_output_channels(w if trans_b else w.T, c64, s, t)
    set_input(gemm, 1, g.add_constant(f"{gemm.name or 'gemm'}_bnfold_B", _cast(new_w if trans_b else new_w.T, w)))
    set_input(gemm, 2, g.add_constant(f"{gemm.name or 'gemm'}_bnfold_C", _cast(new_c, w)))
    set_attr(gemm, "beta", 1.0)
    gemm.output[0] = bn.output[0]
    g.remove(bn)


def _fold_into_matmul(g: OnnxGraph, bn: onnx.NodeProto, matmul: onnx.NodeProto, s: np.ndarray, t: np.ndarray,
                      add: onnx.NodeProto | None) -> None:
    if g.rank(matmul.input[0]) != 2:
        raise Keep("the MatMul input is not known to be 2-D (BN normalises dim 1, MatMul outputs the last)")
    w = g.weight(matmul, 1, "weight")
    if w.ndim != 2 or w.shape[1] != s.size:
        raise Keep(f"MatMul weight has shape {list(w.shape)}, the BN {s.size} channels")
    index = None
    bias = None
    if add is not None:
        index = 1 if add.input[0] == matmul.output[0] else 0
        c = g.constant(add.input[index])
        if c is None:
            raise Keep(f"Add {add.name} after the MatMul adds a non-constant")
        bias = _bias_vector(c, s.size)
    new_w, new_b = bn_math.fold_output_channels(w.T, bias, s, t)  # MatMul weights are [in, out]
    set_input(matmul, 1, g.add_constant(f"{matmul.name or 'matmul'}_bnfold_weight", _cast(new_w.T, w)))
    if add is not None:
        add.input[index] = g.add_constant(f"{add.name or 'add'}_bnfold_bias", _cast(new_b, w))
        add.output[0] = bn.output[0]
        g.remove(bn)
        return
    inner = g.fresh(f"{matmul.output[0]}_bnfold")
    shift = g.add_constant(f"{matmul.name or 'matmul'}_bnfold_bias", _cast(new_b, w))
    add_node = helper.make_node("Add", [inner, shift], [bn.output[0]], name=g.fresh(f"{bn.name or 'bn'}_shift"))
    matmul.output[0] = inner
    g.insert_after(matmul, add_node)
    g.remove(bn)


def _fold_backward(g: OnnxGraph, bn: onnx.NodeProto, s: np.ndarray, t: np.ndarray) -> tuple[str, str, str]:
    """Fold into the node producing the BN input; returns (pattern, neighbour, ONNX ops) or raises Keep."""
    x = bn.input[0]
    producer = g.producer.get(x)
    if producer is None:
        raise Keep("its input is a graph input or constant")
    kind = producer.op_type
    if kind == "Add":
        variable = [i for i in producer.input if g.constant(i) is None]
        matmul = g.producer.get(variable[0]) if len(variable) == 1 else None
        if matmul is not None and matmul.op_type == "MatMul":
            g.only_consumer(x, bn)
            g.only_consumer(matmul.output[0], producer)
            _fold_into_matmul(g, bn, matmul, s, t, producer)
            return bn_math.LINEAR_BN, matmul.name, "MatMul -> Add -> BN"
    if kind == "Concat":
        g.only_consumer(x, bn)
        return bn_math.CONCAT_BN, _fold_into_concat(g, bn, producer, s, t), "Concat(Conv...) -> BN"
    if kind not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        raise Keep(f"its input comes from {kind}")
    g.only_consumer(x, bn)
    if kind in ("Conv", "ConvTranspose"):
        _fold_into_conv(g, bn, producer, s, t)
        pattern = bn_math.CONV_BN if kind == "Conv" else bn_math.CONV_TRANSPOSE_BN
    elif kind == "Gemm":
        _fold_into_gemm(g, bn, producer, s, t)
        pattern = bn_math.LINEAR_BN
    else:
        _fold_into_matmul(g, bn, producer, s, t, None)
        pattern = bn_math.LINEAR_BN
    return pattern, producer.name, f"{kind} -> BN"


def _conv_padded(conv: onnx.NodeProto, w: np.ndarray) -> bool:
    auto_pad = attr(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return any(k > 1 for k in w.shape[2:]) or any(st > 1 for st in attr(conv, "strides", []))
    return auto_pad != "VALID" and any(p != 0 for p in attr(conv, "pads", []))


def _forward_into_conv(g: OnnxGraph, bn: onnx.NodeProto, conv: onnx.NodeProto, s: np.ndarray,
                       t: np.ndarray) -> tuple[str, str]:
    if conv.input[0] != bn.output[0]:
        raise Keep("the BN output is the Conv's weight, not its input")
    w = g.weight(conv, 1, "weight")
    b = g.constant_bias(conv)
    groups = int(attr(conv, "group", 1))
    c_out, c_in_group = w.shape[0], w.shape[1]
    if c_in_group * groups != s.size or c_out % groups:
        raise Keep(f"Conv reads {c_in_group * groups} channels, the BN has {s.size}")
    padded = _conv_padded(conv, w)
    if padded:
        tiny = bn_math.tiny_scale_reason(s, t)
        if tiny:
            raise Keep(tiny)
        x_rank = g.rank(bn.input[0])
        if x_rank is not None and x_rank != w.ndim:
            raise Keep(f"the BN input has rank {x_rank}, the Conv weight {w.ndim}")
        new_w, _ = bn_math.fold_input_channels(w, b, s, None, groups=groups)
        shift = bn_math.padded_conv_shift(s, t).reshape(1, -1, *([1] * (w.ndim - 2)))
        shift_name = g.add_constant(f"{bn.name or 'bn'}_shift", _cast(shift, w))
        add = helper.make_node("Add", [bn.input[0], shift_name], [bn.output[0]],
                               name=g.fresh(f"{bn.name or 'bn'}_shift"))
        g.graph.node.insert(list(g.graph.node).index(bn), add)
    else:
        new_w, new_b = bn_math.fold_input_channels(w, b, s, t, groups=groups)
        set_input(conv, 2, g.add_constant(f"{conv.name or 'conv'}_bnfold_bias", _cast(new_b, w)))
        conv.input[0] = bn.input[0]
    set_input(conv, 1, g.add_constant(f"{conv.name or 'conv'}_bnfold_weight", _cast(new_w, w)))
    g.remove(bn)
    if padded:
        return bn_math.BN_PADDED_CONV, "BN -> zero-padded Conv (shift kept in front of it)"
    return bn_math.BN_CONV, "BN -> Conv"


def _flattened_channels(g: OnnxGraph, bn: onnx.NodeProto, node: onnx.NodeProto) -> int:
    """Spatial positions per channel when `node` flattens the BN output (N, C, ...) to (N, C * positions)."""
    shape = g.shapes.get(bn.output[0])
    if shape is None or any(not isinstance(d, int) or d <= 0 for d in shape[1:]):
        raise Keep(f"the BN output shape is not static ({shape})")
    positions = int(np.prod(shape[2:], dtype=np.int64))
    if node.op_type == "Flatten":
        if int(attr(node, "axis", 1)) != 1:
            raise Keep("the Flatten does not flatten from axis 1")
        return positions
    target = g.constant(node.input[1]) if len(node.input) > 1 else None
    flat = shape[1] * positions
    if target is None or target.size != 2 or int(target[1]) not in (flat, -1) or int(target[0]) not in (0, -1):
        raise Keep(f"the Reshape after the BN is not a flatten to (N, {flat})")
    if int(target[0]) == -1 and int(target[1]) == -1:
        raise Keep("the Reshape after the BN has two -1 dims")
    return positions


def _forward_into_linear(g: OnnxGraph, bn: onnx.NodeProto, linear: onnx.NodeProto, s: np.ndarray, t: np.ndarray,
                         flatten: onnx.NodeProto | None) -> tuple[str, str]:
    if linear.input[0] != (flatten.output[0] if flatten is not None else bn.output[0]):
        raise Keep(f"the BN output is not the {linear.op_type}'s data input")
    if flatten is None and g.rank(bn.output[0]) != 2:
        raise Keep(f"the BN output is not known to be 2-D before the {linear.op_type}")
    positions = _flattened_channels(g, bn, flatten) if flatten is not None else 1
    s_in, t_in = np.repeat(s, positions), np.repeat(t, positions)
    w = g.weight(linear, 1, "weight")
    if linear.op_type == "Gemm":
        if int(attr(linear, "transA", 0)):
            raise Keep("the Gemm transposes its input")
        trans_b = int(attr(linear, "transB", 0))
        w_kn = w.astype(np.float64).T if trans_b else w.astype(np.float64)
    else:
        if w.ndim != 2:
            raise Keep(f"MatMul weight has shape {list(w.shape)}")
        trans_b, w_kn = 0, w.astype(np.float64)
    if w_kn.shape[0] != s_in.size:
        raise Keep(f"{linear.op_type} reads {w_kn.shape[0]} features, the BN gives {s_in.size}")
    new_w_nk, moved = bn_math.fold_input_channels(w_kn.T, None, s_in, t_in)  # [out, in], as a Linear holds it
    alpha = float(attr(linear, "alpha", 1.0)) if linear.op_type == "Gemm" else 1.0
    shift = alpha * moved
    name = linear.name or linear.op_type.lower()
    if linear.op_type == "Gemm":
        has_c = len(linear.input) > 2 and linear.input[2]
        c = g.constant(linear.input[2]) if has_c else None
        if has_c and c is None:
            raise Keep(f"Gemm {linear.name} has a non-constant C")
        n_out = w_kn.shape[1]
        c64 = np.zeros(n_out) if c is None else float(attr(linear, "beta", 1.0)) * _bias_vector(c, n_out)
        set_input(linear, 1, g.add_constant(f"{name}_bnfold_B", _cast(new_w_nk if trans_b else new_w_nk.T, w)))
        set_input(linear, 2, g.add_constant(f"{name}_bnfold_C", _cast(c64 + shift, w)))
        set_attr(linear, "beta", 1.0)
    else:
        set_input(linear, 1, g.add_constant(f"{name}_bnfold_weight", _cast(new_w_nk.T, w)))
        inner = g.fresh(f"{linear.output[0]}_bnfold")
        add = helper.make_node("Add", [inner, g.add_constant(f"{name}_bnfold_bias", _cast(shift, w))],
                               [linear.output[0]], name=g.fresh(f"{bn.name or 'bn'}_shift"))
        linear.output[0] = inner
        g.insert_after(linear, add)
    if flatten is not None:
        flatten.input[0] = bn.input[0]
    else:
        linear.input[0] = bn.input[0]
    g.remove(bn)
    if flatten is not None:
        return bn_math.BN_FLATTEN_LINEAR, f"BN -> {flatten.op_type} -> {linear.op_type}"
    return bn_math.BN_LINEAR, f"BN -> {linear.op_type}"


def _fold_forward(g: OnnxGraph, bn: onnx.NodeProto, s: np.ndarray, t: np.ndarray) -> tuple[str, str, str]:
    """Fold into the node reading the BN output; returns (pattern, neighbour, ONNX ops) or raises Keep."""
    y = bn.output[0]
    readers = g.consumers.get(y, [])
    if len(readers) != 1:
        raise Keep(f"its output feeds {len(readers)} nodes" if readers else "its output is only a graph output")
    g.only_consumer(y, readers[0])
    consumer = readers[0]
    if consumer.op_type == "Conv":
        pattern, ops = _forward_into_conv(g, bn, consumer, s, t)
        return pattern, consumer.name, ops
    if consumer.op_type in ("Gemm", "MatMul"):
        pattern, ops = _forward_into_linear(g, bn, consumer, s, t, None)
        return pattern, consumer.name, ops
    if consumer.op_type in ("Flatten", "Reshape"):
        after = g.consumers.get(consumer.output[0], [])
        if len(after) == 1 and after[0].op_type in ("Gemm", "MatMul"):
            g.only_consumer(consumer.output[0], after[0])
            pattern, ops = _forward_into_linear(g, bn, after[0], s, t, consumer)
            return pattern, after[0].name, ops
        raise Keep(f"its output feeds {consumer.op_type} -> {', '.join(n.op_type for n in after) or 'nothing'}")
    raise Keep(f"its output feeds {consumer.op_type}")


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def fold_onnx_bn(model: onnx.ModelProto) -> tuple[onnx.ModelProto, OnnxFoldSummary]:
    """Fold every foldable BatchNormalization of the main graph; returns a new model and the decisions.

    The input model is not changed. Node order stays topological, graph inputs and outputs keep their names. What
    stays of a BN in front of a zero-padded conv, this pass's or the PyTorch fold's per-channel shift Add, ends up
    as a 1x1 depthwise Conv (see `_shifts_to_depthwise_conv`).
    """
    model = _copy(model)
    g = OnnxGraph(model)
    before = count_bn_nodes(model)
    decisions = []
    for bn in [n for n in model.graph.node if n.op_type == "BatchNormalization"]:
        name = bn.name or bn.output[0]
        try:
            s, t = _bn_scale_shift(g, bn)
        except Keep as why:
            decisions.append(OnnxBnDecision(name, "keep", "BN", "", str(why)))
            continue
        reasons = []
        # each pattern checks everything before it rewrites anything, so a refusal leaves the graph as it was
        for attempt in (_fold_backward, _fold_forward):
            try:
                pattern, neighbour, ops = attempt(g, bn, s, t)
            except Keep as why:
                reasons.append(str(why))
                continue
            decisions.append(OnnxBnDecision(name, "fold", pattern, neighbour, f"exact, float64 ({ops})"))
            g.refresh()
            break
        else:
            decisions.append(OnnxBnDecision(name, "keep", "BN", "", "; ".join(reasons)))
    shifts = _shifts_to_depthwise_conv(g)
    g.prune()
    return model, OnnxFoldSummary(bn_before=before, bn_after=count_bn_nodes(model), decisions=decisions,
                                  shift_convs=shifts)


def _shifts_to_depthwise_conv(g: OnnxGraph) -> int:
    """Rewrite every per-channel constant Add that feeds only a Conv as a 1x1 depthwise Conv with unit weights and
    the shift as its bias; returns how many were rewritten.

    The arithmetic is the same (x * 1 + b rounds exactly as x + b), but onnxruntime's CPU layout pass keeps a Conv
    in its blocked NCHWc layout, where an Add with a broadcast constant costs a reorder out of that layout and one
    back in: on IResNet-50 the Add form ran about 1% slower than a peer file that keeps the BatchNormalization
    (which ORT itself turns into such a conv).
    """
    rewritten = 0
    for add in [n for n in g.graph.node if n.op_type == "Add"]:
        constant = [i for i, name in enumerate(add.input) if g.constant(name) is not None]
        readers = g.consumers.get(add.output[0], [])
        if len(constant) != 1 or len(readers) != 1 or readers[0].op_type != "Conv" or add.output[0] in g.outputs:
            continue
        conv = readers[0]
        shift = g.constant(add.input[constant[0]])
        weight = g.constant(conv.input[1]) if len(conv.input) > 1 else None
        spatial = None if weight is None else weight.ndim - 2
        if conv.input[0] != add.output[0] or spatial is None or shift.ndim not in (spatial + 1, spatial + 2):
            continue
        channels = shift.shape[-spatial - 1]
        # one value per input channel of the conv, or it is not a per-channel shift (a broadcast scalar, say)
        if shift.size != channels or channels != weight.shape[1] * int(attr(conv, "group", 1)) or \
                shift.dtype != weight.dtype:
            continue
        name = add.name or add.output[0]
        ones = g.add_constant(f"{name}_unit", np.ones((channels, 1) + (1,) * spatial, dtype=shift.dtype))
        bias = g.add_constant(f"{name}_bias", shift.reshape(channels))
        depthwise = helper.make_node("Conv", [add.input[1 - constant[0]], ones, bias], [add.output[0]],
                                     name=g.fresh(f"{name}_depthwise"), group=channels, kernel_shape=[1] * spatial)
        index = list(g.graph.node).index(add)
        g.graph.node.remove(add)
        g.graph.node.insert(index, depthwise)
        rewritten += 1
    g.refresh()
    return rewritten
