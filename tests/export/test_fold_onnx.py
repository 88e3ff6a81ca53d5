"""Tests for bnport.export.fold_onnx: every BatchNormalization next to a linear op folds exactly on the ONNX graph, and
the ones that cannot fold stay with a reason. Graphs come from the TorchScript exporter in PRESERVE mode (which keeps
every BN as a node) or are built by hand (MatMul patterns); outputs are compared with float64 references."""
from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from bnport.export import bn_math
from bnport.export.fold_onnx import count_bn_nodes, fold_onnx_bn
from bnport.export.fold_torch import fold_bn
from bnport.model.arch import create_model
from bnport.runtime.sessions import create_session
from tests.helpers.zoo import MixedConv


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.5)
    return model.eval()


def _export_keeping_bn(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    """TorchScript export that leaves every BatchNorm as a BatchNormalization node (no exporter-side fusion)."""
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["data"], output_names=["output"],
                      dynamic_axes={"data": {0: "batch"}, "output": {0: "batch"}}, opset_version=17,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    return onnx.load_from_string(buffer.getvalue())


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return create_session(model.SerializeToString(), device="cpu", threads=1).run(x)


def _reference(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    import copy

    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double()).numpy()


class Patterns(nn.Module):
    """One of each foldable pattern, each BN placed so that only that pattern applies."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)       # Conv -> BN
        self.dw, self.bn_dw = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)         # depthwise -> BN
        self.bn_a, self.gconv = nn.BatchNorm2d(8), nn.Conv2d(8, 12, 1, groups=2)                 # BN -> Conv
        self.bn_b, self.pconv = nn.BatchNorm2d(12), nn.Conv2d(12, 8, 3, padding=1, groups=4)     # BN -> padded Conv
        self.convt, self.bn_t = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2), nn.BatchNorm2d(6)  # ConvT -> BN
        self.bn_c, self.fc1 = nn.BatchNorm2d(6), nn.Linear(6 * 8 * 8, 10)                      # BN -> Flatten -> Gemm
        self.bn_d = nn.BatchNorm1d(10)                                                           # Gemm -> BN
        self.bn_e, self.fc2 = nn.BatchNorm1d(10), nn.Linear(10, 5)                               # BN -> Gemm

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn_dw(self.dw(x)))
        x = torch.relu(self.gconv(self.bn_a(x)))
        x = self.pconv(self.bn_b(x))
        x = torch.relu(self.bn_t(self.convt(x)))
        x = self.bn_d(self.fc1(torch.flatten(self.bn_c(x), 1)))
        return self.fc2(self.bn_e(torch.relu(x)))


EXPECTED_PATTERNS = {  # the pattern names of the PyTorch pass, and the ONNX ops in the reason
    "bn1": ("conv->bn", "Conv -> BN"), "bn_dw": ("conv->bn", "Conv -> BN"), "bn_a": ("bn->conv", "BN -> Conv"),
    "bn_b": ("bn->padded-conv", "BN -> zero-padded Conv (shift kept in front of it)"),
    "bn_t": ("convtranspose->bn", "ConvTranspose -> BN"), "bn_c": ("bn->flatten->linear", "BN -> Flatten -> Gemm"),
    "bn_d": ("linear->bn1d", "Gemm -> BN"), "bn_e": ("bn1d->linear", "BN -> Gemm"),
}


def _decision(summary, module_name):
    return next(d for d in summary.decisions if f"/{module_name}/" in d.node)


def test_every_pattern_folds_exactly():
    model = _randomise(Patterns())
    x = torch.randn(3, 3, 4, 4)
    exported = _export_keeping_bn(model, x)
    assert count_bn_nodes(exported) == 8
    folded, summary = fold_onnx_bn(exported)
    onnx.checker.check_model(folded)
    assert count_bn_nodes(folded) == 0 and summary.bn_before == 8 and summary.bn_after == 0
    for name, (pattern, ops) in EXPECTED_PATTERNS.items():
        assert _decision(summary, name).pattern == pattern and pattern in bn_math.PATTERNS
        assert _decision(summary, name).reason == f"exact, float64 ({ops})"
        assert _decision(summary, name).action == "fold"
    # the padded-conv fold keeps its shift as one 1x1 depthwise conv with unit weights in front of the conv
    assert summary.shift_convs == 1 and "Add" not in [n.op_type for n in folded.graph.node]
    shift_conv = next(n for n in folded.graph.node if n.op_type == "Conv" and n.output[0] in
                      {i for m in folded.graph.node if "pconv" in m.name for i in m.input})
    assert {a.name: onnx.helper.get_attribute_value(a) for a in shift_conv.attribute}["group"] == 12
    inits = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    np.testing.assert_array_equal(inits[shift_conv.input[1]], np.ones((12, 1, 1, 1), np.float32))
    assert count_bn_nodes(exported) == 8, "the input model must not change"

    ref = _reference(model, x)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(_run(folded, x.numpy()), ref, rtol=0, atol=1e-5 * scale)
    # a dynamic batch still works after folding, at batch 1 too
    np.testing.assert_allclose(_run(folded, x[:1].numpy()), ref[:1], rtol=0, atol=1e-5 * scale)
    again, summary2 = fold_onnx_bn(folded)
    assert summary2.bn_before == 0 and summary2.decisions == []
    assert len(again.graph.node) == len(folded.graph.node)


def test_torch_fold_shift_becomes_a_depthwise_conv_with_identical_results():
    """The PyTorch fold's shift Add (IResNet's bn1) is rewritten; without ORT's own rewrites both files give the same
    bits, since x * 1 + b rounds exactly as x + b."""
    model = _randomise(create_model("iresnet_tiny"))
    buffer = io.BytesIO()
    torch.onnx.export(fold_bn(model), (torch.randn(2, 3, 112, 112),), buffer, dynamo=False, input_names=["data"],
                      output_names=["output"],
                      opset_version=17, dynamic_axes={"data": {0: "batch"}})
    exported = onnx.load_from_string(buffer.getvalue())
    adds = [n for n in exported.graph.node if n.op_type == "Add"]
    folded, summary = fold_onnx_bn(exported)
    assert summary.shift_convs == 4 and summary.bn_before == 0
    assert len([n for n in folded.graph.node if n.op_type == "Add"]) == len(adds) - 4
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = np.random.default_rng(0).normal(size=(2, 3, 112, 112)).astype(np.float32)
    runs = [ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
            .run(None, {"data": x})[0] for m in (exported, folded)]
    np.testing.assert_array_equal(runs[0], runs[1])


def test_fold_math_is_float64_then_cast():
    """Folded weights equal torch.nn.utils.fusion's conv+BN fusion run in float64, cast once to float32 (not float32
    arithmetic)."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    model = _randomise(nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4)))
    folded, _ = fold_onnx_bn(_export_keeping_bn(model, torch.randn(2, 3, 5, 5)))
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    inits = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    conv64, bn = model[0].double(), model[1].double()
    w, b = fuse_conv_bn_weights(conv64.weight, conv64.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                                bn.bias)
    np.testing.assert_array_equal(inits[conv.input[1]], w.float().detach().numpy())
    np.testing.assert_array_equal(inits[conv.input[2]], b.float().detach().numpy())


class Unfoldable(nn.Module):
    """BNs no exact fold exists for: between ReLUs, producer with a second reader, a graph output, a ~0 scale."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_relu = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn_shared = nn.BatchNorm2d(4)
        self.bn_zero = nn.BatchNorm2d(4)
        self.pconv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_out = nn.BatchNorm2d(4)

    def forward(self, x):
        x = torch.relu(self.bn_relu(torch.relu(self.conv(x))))
        c = self.conv2(x)
        x = self.bn_shared(c) + c
        x = self.pconv(self.bn_zero(torch.relu(x)))
        return self.bn_out(torch.relu(x))


def test_unfoldable_bns_are_kept_with_reasons():
    model = _randomise(Unfoldable())
    with torch.no_grad():
        model.bn_zero.weight[1] = 0.0
    x = torch.randn(2, 3, 6, 6)
    folded, summary = fold_onnx_bn(_export_keeping_bn(model, x))
    assert summary.bn_before == 4 and summary.bn_after == 4
    assert all(d.action == "keep" for d in summary.decisions)
    reasons = {name: _decision(summary, name).reason for name in ("bn_relu", "bn_shared", "bn_zero", "bn_out")}
    assert "input comes from Relu" in reasons["bn_relu"] and "output feeds Relu" in reasons["bn_relu"]
    assert "2 consumers" in reasons["bn_shared"]
    assert "scale is ~0" in reasons["bn_zero"]
    assert "graph output" in reasons["bn_out"]
    assert "keep" in str(summary)
    ref = _reference(model, x)
    np.testing.assert_allclose(_run(folded, x.numpy()), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_shared_weight_is_copied_not_changed():
    """A conv module called twice, a BN after only one call: the fold must not alter the other call."""

    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(torch.relu(x))

    model = _randomise(Reused())
    x = torch.randn(2, 4, 3, 3)
    folded, summary = fold_onnx_bn(_export_keeping_bn(model, x))
    assert summary.bn_after == 0
    ref = _reference(model, x)
    np.testing.assert_allclose(_run(folded, x.numpy()), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def _bn_nodes(prefix: str, c: int, rng) -> tuple[list, dict[str, np.ndarray]]:
    params = {f"{prefix}_{k}": v.astype(np.float32) for k, v in
              (("scale", rng.uniform(0.5, 1.5, c)), ("bias", rng.normal(0, 0.5, c)), ("mean", rng.normal(0, 0.5, c)),
               ("var", rng.uniform(0.5, 2.0, c)))}
    return list(params), params


def _bn_apply(x: np.ndarray, p: dict[str, np.ndarray], prefix: str, eps: float = 1e-5) -> np.ndarray:
    g, b, m, v = (p[f"{prefix}_{k}"].astype(np.float64) for k in ("scale", "bias", "mean", "var"))
    return (x - m) / np.sqrt(v + eps) * g + b


def _graph(nodes, inits: dict[str, np.ndarray], x_shape, y_shape) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("case", ["matmul-bn", "matmul-add-bn", "bn-matmul"])
def test_matmul_patterns(case):
    rng = np.random.default_rng(1)
    k, n = 6, 5
    w = rng.normal(size=(k, n)).astype(np.float32)
    c = rng.normal(size=n).astype(np.float32)
    x = rng.normal(size=(4, k)).astype(np.float32)
    names, params = _bn_nodes("bn", k if case == "bn-matmul" else n, rng)
    inits = {"W": w, "c": c, **params}
    if case == "matmul-bn":
        nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]),
                 helper.make_node("BatchNormalization", ["m", *names], ["y"], name="bn")]
        expected = _bn_apply(x.astype(np.float64) @ w, params, "bn")
    elif case == "matmul-add-bn":
        nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "c"], ["a"]),
                 helper.make_node("BatchNormalization", ["a", *names], ["y"], name="bn")]
        expected = _bn_apply(x.astype(np.float64) @ w + c, params, "bn")
    else:
        nodes = [helper.make_node("BatchNormalization", ["x", *names], ["b"], name="bn"),
                 helper.make_node("MatMul", ["b", "W"], ["y"])]
        expected = _bn_apply(x.astype(np.float64), params, "bn") @ w
    model = _graph(nodes, inits, ["batch", k], ["batch", n])
    folded, summary = fold_onnx_bn(model)
    onnx.checker.check_model(folded)
    assert summary.bn_after == 0, str(summary)
    assert summary.decisions[0].pattern == ("bn1d->linear" if case == "bn-matmul" else "linear->bn1d")
    assert "MatMul" in summary.decisions[0].reason
    np.testing.assert_allclose(_run(folded, x), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_matmul_on_3d_input_is_kept():
    """BN normalises dim 1 but a 3-D MatMul's output channels are its last dim: no fold."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(6, 3)).astype(np.float32)
    names, params = _bn_nodes("bn", 3, rng)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]),
             helper.make_node("BatchNormalization", ["m", *names], ["y"], name="bn")]
    model = _graph(nodes, {"W": w, **params}, ["batch", 3, 6], ["batch", 3, 3])
    _, summary = fold_onnx_bn(model)
    assert summary.bn_after == 1
    assert "not known to be 2-D" in summary.decisions[0].reason


def test_concat_of_convs_to_bn_splits_by_channel(monkeypatch):
    import bnport.export.fold_onnx as onnx_fold
    from bnport.data.transforms import InputSpec
    from bnport.export.parity import build_parity_inputs, check_parity

    model = _randomise(MixedConv())
    x = torch.randn(3, 6, 5, 5)
    exported = _export_keeping_bn(model, x)
    folded, summary = fold_onnx_bn(exported)
    onnx.checker.check_model(folded)
    assert summary.bn_after == 0 and summary.decisions[0].pattern == "concat(convs)->bn"
    assert summary.decisions[0].neighbour.count(",") == 2, "all three convs take a slice"
    ref = _reference(model, x)
    np.testing.assert_allclose(_run(folded, x.numpy()), ref, rtol=0, atol=1e-5 * np.abs(ref).max())

    # the wrong version: slices handed out in the wrong order (4, 3, 2 channels instead of 2, 3, 4)
    real = onnx_fold._fold_into_concat

    def misaligned(g, bn, concat, s, t):
        order = list(concat.input)
        concat.input[:] = order[::-1]
        try:
            return real(g, bn, concat, s, t)
        finally:
            concat.input[:] = order

    monkeypatch.setattr(onnx_fold, "_fold_into_concat", misaligned)
    wrong, _ = fold_onnx_bn(exported)
    monkeypatch.undo()
    spec = InputSpec(5, 5)
    inputs, counts = build_parity_inputs(spec)
    inputs = torch.cat([inputs, inputs[:, :3]], dim=1)  # the model takes 6 channels
    assert check_parity(model, folded.SerializeToString(), inputs=inputs, counts=counts, device="cpu")
    result = check_parity(model, wrong.SerializeToString(), inputs=inputs, counts=counts, device="cpu")
    assert not result and result.failures


@pytest.mark.parametrize("case, reason", [("axis-0", "Concat along axis 0"), ("not-conv", "a Concat of Conv, Relu"),
                                          ("conv-read-twice", "a has 2 consumers")])
def test_concat_to_bn_refusals(case, reason):
    rng = np.random.default_rng(3)
    w = rng.normal(size=(2, 2, 1, 1)).astype(np.float32)
    channels = 2 if case == "axis-0" else 4
    names, params = _bn_nodes("bn", channels, rng)
    second = helper.make_node("Relu", ["x"], ["b"]) if case == "not-conv" else \
        helper.make_node("Conv", ["x", "W"], ["b"])
    nodes = [helper.make_node("Conv", ["x", "W"], ["a"]), second,
             helper.make_node("Concat", ["a", "b"], ["c"], axis=0 if case == "axis-0" else 1),
             helper.make_node("BatchNormalization", ["c", *names], ["n"], name="bn")]
    tail = helper.make_node("Add", ["n", "a"], ["y"]) if case == "conv-read-twice" else \
        helper.make_node("Relu", ["n"], ["y"])
    y_shape = [2, 2, 3, 3] if case == "axis-0" else [1, 4, 3, 3]
    model = _graph([*nodes, tail], {"W": w, **params}, [1, 2, 3, 3], y_shape)
    _, summary = fold_onnx_bn(model)
    assert summary.bn_after == 1 and reason in summary.decisions[0].reason, summary.decisions[0].reason


def test_broadcast_constant_add_before_conv_is_not_made_a_depthwise_conv():
    """x + c with c of shape (1, 1, 1) in front of a 3-channel conv: one value for every channel, not one per
    channel. It used to become a group=1 'depthwise' conv with a 1-channel weight: an invalid model."""
    rng = np.random.default_rng(4)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    c = np.full((1, 1, 1), 0.75, dtype=np.float32)
    nodes = [helper.make_node("Add", ["x", "c"], ["shifted"]),
             helper.make_node("Conv", ["shifted", "W"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Add", ["r", "p"], ["shifted2"]),
             helper.make_node("Conv", ["shifted2", "W2"], ["y"], pads=[1, 1, 1, 1])]
    w2 = rng.normal(size=(2, 4, 3, 3)).astype(np.float32)
    per_channel = rng.normal(size=(4, 1, 1)).astype(np.float32)
    model = _graph(nodes, {"W": w, "c": c, "p": per_channel, "W2": w2}, ["batch", 3, 5, 5], ["batch", 2, 5, 5])
    folded, summary = fold_onnx_bn(model)
    onnx.checker.check_model(folded, full_check=True)
    assert summary.shift_convs == 1, "the per-channel shift is rewritten, the broadcast one is not"
    assert [n.op_type for n in folded.graph.node] == ["Add", "Conv", "Relu", "Conv", "Conv"]
    x = rng.normal(size=(2, 3, 5, 5)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    runs = [ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
            .run(None, {"x": x})[0] for m in (model, folded)]
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-6, atol=1e-5)


@pytest.mark.slow
def test_timm_mixnet_folds_on_the_onnx_graph_alone():
    """Every BN of timm's mixnet_s left as a node by the exporter (none folded in PyTorch): this pass removes all 49,
    the 34 after mixed convs included, which every peer leaves."""
    timm = pytest.importorskip("timm")
    model = _randomise(timm.create_model("mixnet_s", pretrained=False))
    x = torch.randn(2, 3, 64, 64)
    folded, summary = fold_onnx_bn(_export_keeping_bn(model, x))
    assert summary.bn_before == 49 and summary.bn_after == 0
    assert sum(d.pattern == "concat(convs)->bn" for d in summary.decisions) == 34
    ref = _reference(model, x)
    np.testing.assert_allclose(_run(folded, x.numpy()), ref, rtol=0, atol=1e-4 * np.abs(ref).max())
