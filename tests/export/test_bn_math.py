"""bnport.export.bn_math, the one home of the fold formulas: checked against torch.nn.utils.fusion (an independent
implementation) and against running the layers in float64; and the refusal rules, which both fold passes apply
alike."""
from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from bnport.export import bn_math
from bnport.export.fold_onnx import fold_onnx_bn
from bnport.export.fold_torch import plan_folds


def _bn(channels: int, seed: int = 0, dims: int = 2) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims](channels, eps=1e-3).double().eval()
    bn.running_mean.copy_(torch.randn(channels, generator=g, dtype=torch.float64))
    bn.running_var.copy_(torch.rand(channels, generator=g, dtype=torch.float64) + 0.2)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels, generator=g, dtype=torch.float64))
        bn.bias.copy_(torch.randn(channels, generator=g, dtype=torch.float64))
    return bn


def _scale_shift(bn: nn.Module):
    arrays = [t.detach().numpy() for t in (bn.running_mean, bn.running_var)]
    return bn_math.bn_scale_shift(*arrays, bn.eps, bn.weight.detach().numpy(), bn.bias.detach().numpy())


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_output_channel_fold_equals_torch_fusion_for_convs(groups):
    conv = nn.Conv2d(6, 6, 3, groups=groups, bias=True).double()
    bn = _bn(6)
    expected_w, expected_b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                                  bn.weight, bn.bias)
    w, b = bn_math.fold_output_channels(conv.weight.detach().numpy(), conv.bias.detach().numpy(), *_scale_shift(bn),
                                        groups=groups)
    np.testing.assert_allclose(w, expected_w.detach().numpy(), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(b, expected_b.detach().numpy(), rtol=1e-13, atol=1e-13)


def test_output_channel_fold_equals_torch_fusion_for_linear_and_conv_transpose():
    linear, bn = nn.Linear(5, 4).double(), _bn(4, dims=1)
    expected = fuse_linear_bn_weights(linear.weight, linear.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                                      bn.bias)
    got = bn_math.fold_output_channels(linear.weight.detach().numpy(), linear.bias.detach().numpy(),
                                       *_scale_shift(bn))
    for a, e in zip(got, expected):
        np.testing.assert_allclose(a, e.detach().numpy(), rtol=1e-13, atol=1e-13)
    convt, bn = nn.ConvTranspose2d(3, 4, 2, stride=2, bias=False).double(), _bn(4, seed=1)
    expected = fuse_conv_bn_weights(convt.weight, None, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias,
                                    transpose=True)
    got = bn_math.fold_output_channels(convt.weight.detach().numpy(), None, *_scale_shift(bn), transposed=True)
    for a, e in zip(got, expected):
        np.testing.assert_allclose(a, e.detach().numpy(), rtol=1e-13, atol=1e-13)


def test_grouped_conv_transpose_fold_equals_running_the_layers():
    """torch's helper is wrong for grouped transposed convs (it scales weight dim 1 as if it held every output
    channel); the fold must match running ConvTranspose then BN."""
    convt, bn = nn.ConvTranspose2d(4, 6, 3, groups=2).double(), _bn(6, seed=2)
    w, b = bn_math.fold_output_channels(convt.weight.detach().numpy(), convt.bias.detach().numpy(), *_scale_shift(bn),
                                        groups=2, transposed=True)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    expected = bn(convt(x)).detach().numpy()
    got = F.conv_transpose2d(x, torch.from_numpy(w), torch.from_numpy(b), groups=2).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 3])
def test_input_channel_fold_equals_running_bn_then_an_unpadded_conv(groups):
    bn, conv = _bn(6, seed=3), nn.Conv2d(6, 9, 3, groups=groups).double()
    w, b = bn_math.fold_input_channels(conv.weight.detach().numpy(), conv.bias.detach().numpy(), *_scale_shift(bn),
                                       groups=groups)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    got = F.conv2d(x, torch.from_numpy(w), torch.from_numpy(b), groups=groups).numpy()
    np.testing.assert_allclose(got, conv(bn(x)).detach().numpy(), rtol=1e-12, atol=1e-12)


def test_padded_conv_keeps_the_shift_in_front_and_identity_merge_adds_the_branch():
    bn, conv = _bn(4, seed=4), nn.Conv2d(4, 4, 3, padding=1).double()
    scale, shift = _scale_shift(bn)
    w, b = bn_math.fold_input_channels(conv.weight.detach().numpy(), conv.bias.detach().numpy(), scale, None)
    moved = torch.from_numpy(bn_math.padded_conv_shift(scale, shift)).reshape(1, -1, 1, 1)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    got = F.conv2d(x + moved, torch.from_numpy(w), torch.from_numpy(b), padding=1).numpy()
    np.testing.assert_allclose(got, conv(bn(x)).detach().numpy(), rtol=1e-12, atol=1e-12)
    w, b = bn_math.merge_identity(conv.weight.detach().numpy(), conv.bias.detach().numpy(), scale, shift)
    got = F.conv2d(x, torch.from_numpy(w), torch.from_numpy(b), padding=1).numpy()
    np.testing.assert_allclose(got, (conv(x) + bn(x)).detach().numpy(), rtol=1e-12, atol=1e-12)


def test_refusal_rules():
    assert bn_math.unusable_reason([1.0, 2.0], [0.0, 1.0]) is None
    assert "channel 1" in bn_math.unusable_reason([1.0, np.nan], [0.0, 1.0])
    assert bn_math.tiny_scale_reason([1.0, 0.5], [0.1, 0.2]) is None
    assert "channel 1" in bn_math.tiny_scale_reason([1.0, 1e-9], [0.1, 0.2])


class _ConvBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.after = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.after(torch.relu(self.bn(self.conv(x))))


def test_both_passes_refuse_a_non_finite_bn_with_the_same_reason():
    """Negative variance (a corrupt checkpoint): sqrt of a negative number. The PyTorch pass used to fold it into
    NaN weights; both passes now keep it, saying the same."""
    model = _ConvBn().eval()
    with torch.no_grad():  # distinct values, so the exporter shares no initializer between them
        model.bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.4]))
        model.bn.bias.copy_(torch.tensor([0.5, 0.6, -0.7, 0.8]))
    model.bn.running_var[2] = -3.0
    plan = plan_folds(model, example_input=torch.zeros(1, 3, 6, 6))
    (decision,) = plan.decisions
    assert decision.action == "keep"
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(1, 3, 6, 6),), buffer, dynamo=False, opset_version=17,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    _, summary = fold_onnx_bn(onnx.load_from_string(buffer.getvalue()))
    (onnx_decision,) = summary.decisions
    assert onnx_decision.action == "keep"
    expected = "its statistics give a non-finite scale or shift (channel 2)"
    assert decision.reason == expected and onnx_decision.reason == expected
