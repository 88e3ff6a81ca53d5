"""Tests for bnport.export.parity: the figures match a direct float64 computation, correct folds pass the default rule
and the usual wrong folds fail it (border-inexact shift, eps dropped, shift dropped, Linear -> BatchNorm1d on 3-D), on
well- and ill-conditioned models (where PyTorch float32's own error decides the bound); each output is judged on its own
scale; and the folds the timm zoo needs pass while wrong versions of each fail."""
from __future__ import annotations

import copy
import io
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from PIL import Image

import bnport.export.fold_onnx
from bnport.data.transforms import InputSpec
from bnport.export.fold_onnx import fold_onnx_bn
from bnport.export.fold_torch import bn_scale_shift, count_bn, fold_bn
from bnport.export.parity import (
    DEFAULT_ATOL,
    DEFAULT_MIN_COS,
    NOISE_MULTIPLE,
    ParityReference,
    build_parity_inputs,
    check_parity,
    load_parity_images,
    no_tf32,
    split_batches,
)
from bnport.model.arch import create_model
from bnport.runtime.sessions import create_session, cuda_status
from tests.helpers.images import write_images
from tests.helpers.models import realistic_bn
from tests.helpers.zoo import TinyLevit, TinyMixNet, TinyRepVgg, offset_kept_model, offset_model, register_norm_act

SPEC = InputSpec()
def _torchscript_bytes(model: nn.Module, spec: InputSpec = SPEC, *, keep_bn: bool = False) -> bytes:
    buffer = io.BytesIO()
    extra = {"training": torch.onnx.TrainingMode.PRESERVE, "do_constant_folding": False} if keep_bn else {}
    torch.onnx.export(model, (torch.randn(2, 3, spec.height, spec.width),), buffer, dynamo=False,
                      input_names=["data"], output_names=["output"], opset_version=17,
                      dynamic_axes={"data": {0: "batch"}, "output": {0: "batch"}}, **extra)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    return realistic_bn(create_model("iresnet_tiny"))


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, dict[str, int]]:
    real = torch.stack([SPEC.to_tensor(np.random.default_rng(i).integers(0, 256, (112, 112, 3), dtype=np.uint8))
                        for i in range(3)])
    return build_parity_inputs(SPEC, real=real, n_gaussian=2, n_uniform=1)


def test_inputs_mix_real_and_noise():
    spec = InputSpec(16, 20)
    real = torch.zeros(3, 3, 16, 20)
    x, counts = build_parity_inputs(spec, real=real, n_gaussian=4, constants=(0, 128, 255), n_uniform=2)
    assert counts == {"real": 3, "gaussian": 4, "constant": 3, "uniform": 2}
    assert x.shape == (12, 3, 16, 20)
    assert torch.equal(x[:3], real)
    np.testing.assert_allclose(x[7].numpy(), -1.0)                       # black: (0 - 127.5) / 127.5
    np.testing.assert_allclose(x[8].numpy(), 0.5 / 127.5, rtol=1e-6)      # grey 128
    np.testing.assert_allclose(x[9].numpy(), 1.0)                        # white
    assert 0.5 < float(x[3:7].std()) < 1.5                               # N(0, 1) in normalised space
    assert x[10:].min() >= -1.0 and x[10:].max() <= 1.0 and float(x[10:].std()) > 0.3
    with pytest.raises(Exception, match="parity images have shape"):
        build_parity_inputs(spec, real=torch.zeros(1, 3, 8, 8))


def test_batches_cover_everything_with_batch_one_grouped_by_size():
    ranges = split_batches(20, (1, 2, 8))
    assert sorted(ranges) == [(0, 1), (1, 3), (3, 11), (11, 12), (12, 14), (14, 20)]  # cut cycling 1, 2, 8
    assert [b - a for a, b in ranges] == [1, 1, 2, 2, 6, 8]  # run grouped: each shape planned once


def test_load_parity_images_decodes_through_the_spec(tmp_path):
    paths = write_images(tmp_path / "faces", 5, size=(40, 48))
    spec = InputSpec(32, 32)
    images = load_parity_images(str(tmp_path / "faces"), spec, limit=16)
    expected = [spec.to_tensor(np.asarray(Image.open(p).convert("RGB"))) for p in paths]
    assert images.shape == (5, 3, 32, 32)
    for image in images:
        assert any(torch.equal(image, e) for e in expected)
    assert load_parity_images(str(tmp_path / "faces"), spec, limit=2).shape == (2, 3, 32, 32)


def test_figures_match_a_direct_computation(tiny, inputs):
    x, counts = inputs
    data = _torchscript_bytes(fold_bn(tiny))
    result = check_parity(tiny, data, inputs=x, counts=counts, device="cpu")
    assert result and result.passed and not result.failures

    batches = split_batches(len(x), (1, 2, 8))
    exact_model = copy.deepcopy(tiny).double()
    with torch.no_grad():
        exact = np.concatenate([exact_model(x[a:b].double()).numpy() for a, b in batches])
        torch32 = np.concatenate([tiny(x[a:b]).numpy() for a, b in batches]).astype(float)
    session = create_session(data, device="cpu")
    got = np.concatenate([session.run(x[a:b].numpy()) for a, b in batches]).astype(float)
    err = np.abs(got - exact)
    cos = (got * exact).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(exact, axis=1)
    scale = np.abs(exact).max()
    assert result.reference == "float64" and result.output_scale == pytest.approx(scale, rel=1e-12)
    assert result.max_abs == pytest.approx(err.max(), rel=1e-3, abs=1e-9)
    assert result.mean_abs == pytest.approx(err.mean(), rel=1e-3, abs=1e-9)
    assert result.min_cos == pytest.approx(cos.min(), abs=1e-9)
    assert result.quantiles["p50"] == pytest.approx(np.quantile(err, 0.5), rel=1e-3, abs=1e-9)
    assert sum(result.histogram.values()) == err.size
    # PyTorch float32's own distance from float64, and the file's from PyTorch float32
    assert result.reference_noise == pytest.approx(np.abs(torch32 - exact).max() / scale, rel=1e-3)
    (output,) = result.outputs
    assert output.max_abs_torch == pytest.approx(np.abs(got - torch32).max(), rel=1e-3, abs=1e-9)
    # well conditioned: float32 noise is far below atol, so atol decides, and a correct fold sits far inside it
    assert result.bound == "atol" and output.tolerance == DEFAULT_ATOL
    assert result.reference_noise * NOISE_MULTIPLE < 0.1 * DEFAULT_ATOL
    assert result.max_abs < 0.1 * DEFAULT_ATOL * result.output_scale
    assert result.providers == ["CPUExecutionProvider"] and result.inputs == counts and not result.noise_only
    text = str(result)
    for needle in ("parity PASS", "max abs", "max rel", "min row cosine", "p99", "CPUExecutionProvider",
                   "3 real", "2 gaussian", "3 constant", "1 uniform", "batch sizes 1, 2, 8", "|ort - float64|",
                   "bound: atol (0.0001 x scale; 4 x PyTorch float32's own error would be ",
                   "PyTorch float32 vs float64"):
        assert needle in text, text
    assert result.to_dict()["tolerances"]["atol_is_relative_to"] == "output_scale"
    assert result.to_dict()["bound"] == "atol" and result.to_dict()["reference"] == "float64"


def _eps_dropped(model: nn.Module) -> nn.Module:
    """A fold that forgot eps: s = gamma / sqrt(var); visible where a channel variance is small, as in trained nets."""
    wrong = copy.deepcopy(model)
    for bn in (m for m in wrong.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.eps = 0.0
    return fold_bn(wrong)


def _shift_dropped(model: nn.Module, name: str = "layer2.0.bn2") -> nn.Module:
    """A fold that lost one mid-network BN's shift (t = beta - mean * s set to 0)."""
    wrong = copy.deepcopy(model)
    bn = wrong.get_submodule(name)
    with torch.no_grad():
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bn.bias.copy_(bn.running_mean * s)
    return fold_bn(wrong)


def _with_small_variances(model: nn.Module) -> nn.Module:
    """Some near-dead channels (variance 1e-4), where eps = 1e-5 is 10% of the variance."""
    model = copy.deepcopy(model)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_var[::4] = 1e-4
    return model


@pytest.mark.parametrize("variant", ["shift into padded-conv bias", "eps dropped", "one shift dropped"])
def test_wrong_folds_fail_the_default_gate(tiny, inputs, variant, monkeypatch):
    x, counts = inputs
    model = _with_small_variances(tiny) if variant == "eps dropped" else tiny
    control = check_parity(model, _torchscript_bytes(fold_bn(model)), inputs=x, counts=counts, device="cpu")
    assert control, str(control)
    if variant == "shift into padded-conv bias":
        # the fold the ONNX pass refuses: treat IResNet's zero-padded conv as unpadded, i.e. b' = b + sum(W * t)
        monkeypatch.setattr(bnport.export.fold_onnx, "_conv_padded", lambda conv, w: False)
        folded, summary = fold_onnx_bn(onnx.load_from_string(_torchscript_bytes(model, keep_bn=True)))
        assert any(d.pattern == "bn->conv" for d in summary.decisions)
        data = folded.SerializeToString()
    else:
        data = _torchscript_bytes(_eps_dropped(model) if variant == "eps dropped" else _shift_dropped(model))
    result = check_parity(model, data, inputs=x, counts=counts, device="cpu")
    assert not result, str(result)
    assert result.failures and "parity FAIL" in str(result)
    # the model is well conditioned: PyTorch float32 sits far inside atol of float64, so the fold is to blame
    assert result.reference_noise is not None and result.reference_noise < 0.1 * DEFAULT_ATOL
    assert not any("ill-conditioned" in f for f in result.failures)


def test_ill_conditioned_model_failure_says_so():
    """Two nearly equal convs subtracted: float32 rounding alone is a large part of the output, in PyTorch too."""

    class Cancel(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(3, 4, 3)
            with torch.no_grad():
                self.b.weight.copy_(self.a.weight + 1e-6 * torch.randn_like(self.a.weight))
                self.b.bias.copy_(self.a.bias)

        def forward(self, x):
            return (self.a(x) - self.b(x)).flatten(1)

    spec = InputSpec(8, 8)
    model = Cancel().eval()
    x, counts = build_parity_inputs(spec)
    result = check_parity(model, _torchscript_bytes(model, spec), inputs=x, counts=counts, device="cpu")
    assert not result
    assert result.reference_noise > DEFAULT_ATOL
    assert "ill-conditioned" in result.failures[-1]


def test_linear_bn1d_on_3d_input_folded_by_torch_helper_fails():
    """torch.nn.utils.fusion.fuse_linear_bn_eval is silently wrong on 3-D input; the gate must catch it."""
    from torch.nn.utils.fusion import fuse_linear_bn_eval

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 4, stride=4)
            self.linear = nn.Linear(4, 6)
            self.bn = nn.BatchNorm1d(6)

        def forward(self, x):
            return self.bn(self.linear(self.conv(x).flatten(2)))

    spec = InputSpec(8, 8)
    model = realistic_bn(Head(), size=(8, 8))
    wrong = copy.deepcopy(model)
    wrong.linear, wrong.bn = fuse_linear_bn_eval(wrong.linear, wrong.bn), nn.Identity()
    x, counts = build_parity_inputs(spec)
    assert check_parity(model, _torchscript_bytes(model, spec), inputs=x, counts=counts, device="cpu")
    result = check_parity(model, _torchscript_bytes(wrong, spec), inputs=x, counts=counts, device="cpu")
    assert not result and result.min_cos < DEFAULT_MIN_COS


def test_atol_is_relative_to_the_output_scale(tiny, inputs):
    x, counts = inputs
    loud = copy.deepcopy(tiny)
    with torch.no_grad():
        loud.fc.weight.mul_(1e4)
        loud.fc.bias.mul_(1e4)
    result = check_parity(loud, _torchscript_bytes(fold_bn(loud)), inputs=x, counts=counts, device="cpu")
    assert result, str(result)
    quiet = check_parity(tiny, _torchscript_bytes(fold_bn(tiny)), inputs=x, counts=counts, device="cpu")
    assert result.output_scale > 1e3 * quiet.output_scale


def test_nan_and_output_count_mismatch_fail():
    spec = InputSpec(8, 8)
    x, counts = build_parity_inputs(spec)

    class Log(nn.Module):
        def forward(self, t):
            return torch.log(t)

    class Two(nn.Module):
        def forward(self, t):
            return t * 2, t + 1

    identity = nn.Identity()
    nan = check_parity(identity, _torchscript_bytes(Log(), spec), inputs=x, counts=counts, device="cpu")
    assert not nan and any("NaN" in f for f in nan.failures)
    assert json.loads(json.dumps(nan.to_dict(), allow_nan=False))["max_abs"] == "inf"
    two = check_parity(Two(), _torchscript_bytes(Log(), spec), inputs=x, counts=counts, device="cpu")
    assert not two and "outputs" in two.failures[0]


def test_reference_is_computed_once_and_module_left_as_found(tiny, inputs):
    x, counts = inputs
    tiny.train()
    reference = ParityReference(tiny, x, counts=counts)
    first = reference.outputs("cpu")
    assert reference.outputs("cpu") is first
    assert tiny.training, "the caller's train/eval mode is restored"
    tiny.eval()


def test_no_tf32_restores_the_flags():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with no_tf32():
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


@pytest.mark.gpu
def test_cuda_parity_runs_on_cuda_without_tf32(tiny, inputs):
    if not (cuda_status()[0] and torch.cuda.is_available()):
        pytest.skip("needs CUDA for both torch and onnxruntime")
    x, counts = inputs
    result = check_parity(tiny, _torchscript_bytes(fold_bn(tiny)), inputs=x, counts=counts, device="cuda")
    assert result, str(result)
    assert result.device == "cuda" and result.providers[0] == "CUDAExecutionProvider"


# --- issue 9: the float64 reference, float32's own noise, and one scale per output ---------------------------------

OFFSET_SPEC = InputSpec(16, 16)


def _padded_shift_in_bias(model: nn.Module, spec: InputSpec, monkeypatch) -> bytes:
    """The fold the ONNX pass refuses: treat a zero-padded conv as unpadded, i.e. b' = b + sum(W * t)."""
    monkeypatch.setattr(bnport.export.fold_onnx, "_conv_padded", lambda conv, w: False)
    folded, summary = fold_onnx_bn(onnx.load_from_string(_torchscript_bytes(model, spec, keep_bn=True)))
    monkeypatch.undo()
    assert any(d.pattern == "bn->conv" for d in summary.decisions)
    return folded.SerializeToString()


@pytest.mark.parametrize("build", [offset_model, offset_kept_model], ids=["folded away", "kept"])
def test_ill_conditioned_model_passes_by_float32_noise_and_wrong_folds_still_fail(build, monkeypatch):
    """PyTorch float32 is 1e-4 of the scale away from float64 on these models. Folded away (the fold takes the
    offset off in float64), the file is far closer to float64 than PyTorch is, and the old rule (|ort - PyTorch
    float32| <= atol x scale) rejected it; kept, the file shares PyTorch's error, as a correct file must."""
    model = build()
    x, counts = build_parity_inputs(OFFSET_SPEC)
    control = check_parity(model, _torchscript_bytes(fold_bn(model), OFFSET_SPEC), inputs=x, counts=counts,
                           device="cpu")
    assert control, str(control)
    (output,) = control.outputs
    # PyTorch's own multiple decides, and the report says so
    assert DEFAULT_ATOL < control.reference_noise < 1e-3 and control.bound == "float32 noise"
    assert output.tolerance == pytest.approx(NOISE_MULTIPLE * control.reference_noise)
    assert "bound: float32 noise (4 x PyTorch float32's own error " in str(control)
    if build is offset_model:
        assert output.max_abs_torch > DEFAULT_ATOL * output.scale
        assert output.max_abs < 0.01 * output.tolerance * output.scale
    else:
        assert 0.5 < output.max_abs / (output.reference_noise * output.scale) < 2

    small = _with_small_variances(model)
    wrong = {"eps dropped": (small, _torchscript_bytes(_eps_dropped(small), OFFSET_SPEC)),
             "shift dropped": (model, _torchscript_bytes(_shift_dropped(model, "bn3"), OFFSET_SPEC)),
             "shift into padded-conv bias": (model, _padded_shift_in_bias(model, OFFSET_SPEC, monkeypatch))}
    for variant, (reference, data) in wrong.items():
        result = check_parity(reference, data, inputs=x, counts=counts, device="cpu")
        assert not result, (variant, str(result))
        assert result.bound == "float32 noise", variant
        assert result.max_abs > 10 * result.outputs[0].tolerance * result.output_scale, variant


class TwoOutputs(nn.Module):
    """An embedding and a second output 1e-4 of its size (a quality score, say)."""

    def __init__(self, second_gain: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.bn = nn.BatchNorm2d(4)
        self.second_gain = second_gain

    def forward(self, x):
        y = self.bn(self.conv(x)).flatten(1)
        return 1e3 * y, 0.1 * self.second_gain * y[:, :5]


def test_each_output_is_judged_on_its_own_scale():
    """A second output 1% off passed when one scale (the embedding's, 1e4 times larger) covered both outputs."""
    spec = InputSpec(8, 8)
    torch.manual_seed(0)
    model = realistic_bn(TwoOutputs(), size=(8, 8))
    wrong = copy.deepcopy(model)
    wrong.second_gain = 1.01  # every row of the second output 1% too large: its cosine stays 1
    x, counts = build_parity_inputs(spec)
    assert check_parity(model, _two_output_bytes(model, spec), inputs=x, counts=counts, device="cpu")
    result = check_parity(model, _two_output_bytes(wrong, spec), inputs=x, counts=counts, device="cpu")
    assert not result, str(result)
    first, second = result.outputs
    assert first.beyond == 0 and second.beyond > 0 and second.scale < 1e-3 * first.scale
    assert result.failures[0].startswith("output_1: ") and "output_1: scale" in str(result)
    assert first.max_abs < DEFAULT_ATOL * first.scale  # under the old single scale, nothing was beyond


def _two_output_bytes(model: nn.Module, spec: InputSpec) -> bytes:
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.randn(2, 3, spec.height, spec.width),), buffer, dynamo=False,
                      input_names=["data"], output_names=["output_0", "output_1"], opset_version=17,
                      dynamic_axes={name: {0: "batch"} for name in ("data", "output_0", "output_1")})
    return buffer.getvalue()


def test_module_without_float64_is_judged_against_float32_and_says_so():
    class Float32Only(nn.Module):
        """Mixes channels with a plain tensor attribute, which .double() leaves float32: no float64 forward."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.mix = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))

        def forward(self, x):
            return torch.einsum("nchw,cd->ndhw", self.conv(x), self.mix)

    spec = InputSpec(8, 8)
    model = Float32Only().eval()
    x, counts = build_parity_inputs(spec)
    reference = ParityReference(model, x, counts=counts)
    assert reference.exact_outputs()[0] is None and "RuntimeError" in reference.exact_outputs()[1]
    result = reference.compare(create_session(_torchscript_bytes(model, spec), device="cpu"))
    assert result, str(result)
    assert result.reference == "float32" and result.reference_noise is None and result.bound == "atol"
    assert "no float64 reference" in result.reference_note and "judged against PyTorch float32" in str(result)


ZOO_SPEC = InputSpec(16, 16)


class _TokenAxisBn(nn.Module):
    """The LinearNorm fold done on the wrong axis: per token (dim 1) instead of per feature (what BatchNorm1d on the
    3-D Linear output would do, and why that pattern is refused)."""

    def __init__(self, linear: nn.Linear, bn: nn.Module):
        super().__init__()
        self.linear = linear
        scale, shift = bn_scale_shift(bn)
        self.register_buffer("scale", scale.float()[None, :, None])
        self.register_buffer("shift", shift.float()[None, :, None])

    def forward(self, x):
        return self.linear(x) * self.scale + self.shift


def _wrong_norm_act(model, monkeypatch):
    """The norm+act layer folded as a whole BN: its activation is lost."""
    known = bnport.export.fx_view.norm_act_parts
    monkeypatch.setattr(bnport.export.fx_view, "norm_act_parts", lambda m: None if known(m) is None else [])
    wrong = fold_bn(model)
    monkeypatch.setattr(bnport.export.fx_view, "norm_act_parts", known)
    return wrong


def _wrong_linear_norm(model, monkeypatch):
    wrong = copy.deepcopy(model)
    wrong.ln1 = _TokenAxisBn(wrong.ln1.linear, wrong.ln1.bn)  # 16 tokens, 16 features: the shapes fit
    return fold_bn(wrong)


def _wrong_norm_linear(model, monkeypatch):
    """The head's BN folded forward into the Linear, its shift forgotten."""
    wrong = fold_bn(model)
    bn = model.head.bn
    scale, _ = bn_scale_shift(bn)
    linear = wrong.get_submodule("head.linear")
    original = model.head.linear
    with torch.no_grad():
        linear.weight.copy_((original.weight.double() * scale[None, :]).float())
        linear.bias.copy_(original.bias)
    return wrong


def _wrong_identity(model, monkeypatch):
    """The identity branch put at a corner tap of the 3x3 sibling instead of the 1x1 one (the centre)."""
    wrong = fold_bn(model)
    scale, _ = bn_scale_shift(model.block1.identity)
    channel = torch.arange(8)
    with torch.no_grad():
        wrong.get_submodule("block1.conv_1x1").weight[channel, channel, 0, 0] -= scale.float()
        wrong.get_submodule("block1.conv_kxk").weight[channel, channel, 0, 0] += scale.float()
    return wrong


ZOO_WRONG = [("norm+act, activation lost", TinyMixNet, _wrong_norm_act),
             ("LinearNorm, folded per token", TinyLevit, _wrong_linear_norm),
             ("NormLinear, shift lost", TinyLevit, _wrong_norm_linear),
             ("identity branch, off-centre tap", TinyRepVgg, _wrong_identity)]


@pytest.mark.parametrize("build, break_fold", [c[1:] for c in ZOO_WRONG], ids=[c[0] for c in ZOO_WRONG])
def test_zoo_patterns_fold_with_parity_and_their_wrong_versions_fail(build, break_fold, monkeypatch):
    register_norm_act(monkeypatch)
    torch.manual_seed(0)
    model = realistic_bn(build(), size=(16, 16))
    x, counts = build_parity_inputs(ZOO_SPEC)
    folded = fold_bn(model, example_input=x[:1])
    assert count_bn(folded) == 0
    assert check_parity(model, _torchscript_bytes(folded, ZOO_SPEC), inputs=x, counts=counts, device="cpu")
    result = check_parity(model, _torchscript_bytes(break_fold(model, monkeypatch), ZOO_SPEC), inputs=x,
                          counts=counts, device="cpu")
    assert not result, str(result)
    assert result.max_abs > 10 * result.outputs[0].tolerance * result.output_scale or result.min_cos < DEFAULT_MIN_COS
