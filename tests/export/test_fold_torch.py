"""Tests for bnport.export.fold_torch: every fold pattern and every refusal on small hand-made modules with random BN
statistics, checked in float64 against the unfolded model; then the registry's face models and torchvision models; then
the patterns of the timm zoo (norm+act layers, LinearNorm / NormLinear, RepVGG identity branches,
tests/helpers/zoo.py)."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnport.errors import BnportError
from bnport.export.fold_torch import ChannelShift, bn_scale_shift, count_bn, fold_bn, plan_folds
from tests.helpers.zoo import LinearNorm, NormAct, NormLinear, RepVggBlock, register_norm_act


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running stats and affine params (mean ~ N(0,1), var ~ U(0.5, 2)) so every fold moves real numbers."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            if module.running_mean is not None:
                module.running_mean.copy_(torch.randn(n, generator=gen))
                module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            if module.weight is not None:
                module.weight.data.copy_(torch.randn(n, generator=gen))
                module.bias.data.copy_(torch.randn(n, generator=gen))
    return model


def check_exact(model: nn.Module, shape: tuple[int, ...], *, use_example: bool = False):
    """Fold a float64 copy of `model`; assert exactness, an untouched input, and BN left == plan's keeps."""
    torch.manual_seed(1)
    model = randomise_bn(model).double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    example = x if use_example else None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_folds(model, example_input=example)
    folded = fold_bn(model, example_input=example)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert (out - ref).abs().max().item() <= 1e-10 * ref.abs().max().item()
    assert count_bn(folded) == plan.n_keep
    assert len(plan.decisions) == count_bn(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    return plan, folded


def only(plan):
    (decision,) = plan.decisions
    return decision


class Lambda(nn.Module):
    """Wraps a forward function so each test case reads as one line of graph."""

    def __init__(self, forward, **modules):
        super().__init__()
        self.fn = forward
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, x):
        return self.fn(self, x)


def view_head(m, x):
    """MobileFaceNet's Flatten: x.view(x.size(0), -1)."""
    y = m.bn(x)
    return m.fc(y.view(y.size(0), -1))


def two_consumers(m, x):
    y = m.conv(x)
    return m.bn(y) + torch.relu(y)


# (id, model factory, input shape, expected pattern)
FOLDS = [
    ("conv2d", lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
     (2, 3, 7, 7), "conv->bn"),
    ("conv2d-grouped-bias", lambda: nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.BatchNorm2d(8)),
     (2, 4, 6, 6), "conv->bn"),
    ("conv2d-depthwise", lambda: nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False),
                                               nn.BatchNorm2d(6)), (2, 6, 5, 5), "conv->bn"),
    ("conv1d", lambda: nn.Sequential(nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5)), (2, 3, 9), "conv->bn"),
    ("conv3d", lambda: nn.Sequential(nn.Conv3d(2, 4, 3, padding=1, groups=2), nn.BatchNorm3d(4)),
     (2, 2, 4, 4, 4), "conv->bn"),
    ("convtranspose2d-grouped", lambda: nn.Sequential(
        nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), nn.BatchNorm2d(6)),
     (2, 4, 5, 5), "convtranspose->bn"),
    ("convtranspose1d", lambda: nn.Sequential(nn.ConvTranspose1d(3, 4, 3, bias=False), nn.BatchNorm1d(4)),
     (2, 3, 6), "convtranspose->bn"),
    ("convtranspose3d-grouped", lambda: nn.Sequential(nn.ConvTranspose3d(4, 6, 2, stride=2, groups=2),
                                                      nn.BatchNorm3d(6)), (1, 4, 3, 3, 3), "convtranspose->bn"),
    ("linear-bn1d", lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.BatchNorm1d(5)),
     (3, 3, 2, 2), "linear->bn1d"),
    ("bn-conv-nopad", lambda: nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, stride=2, dilation=2)),
     (2, 4, 9, 9), "bn->conv"),
    ("bn-conv-grouped", lambda: nn.Sequential(nn.PReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1, groups=2)),
     (2, 4, 5, 5), "bn->conv"),
    ("bn-conv-reflect", lambda: nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1,
                                                                          padding_mode="reflect")),
     (2, 4, 6, 6), "bn->conv"),
    ("bn-conv-circular-1d", lambda: nn.Sequential(nn.BatchNorm1d(3), nn.Conv1d(3, 2, 3, padding=2,
                                                                              padding_mode="circular")),
     (2, 3, 8), "bn->conv"),
    ("bn-conv-replicate-same", lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 2, 4, padding="same",
                                                                                 padding_mode="replicate")),
     (2, 3, 7, 7), "bn->conv"),
    ("bn-padded-conv", lambda: nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1, bias=False)),
     (2, 4, 6, 6), "bn->padded-conv"),
    ("bn-padded-conv-same-grouped", lambda: nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 4, padding="same",
                                                                                      groups=2)),
     (2, 4, 7, 7), "bn->padded-conv"),
    ("bn-padded-conv1d-strided", lambda: nn.Sequential(nn.BatchNorm1d(3), nn.Conv1d(3, 5, 5, stride=2, padding=3)),
     (2, 3, 11), "bn->padded-conv"),
    ("bn-flatten-dropout-linear", lambda: Lambda(lambda m, x: m.fc(m.drop(torch.flatten(m.bn(x), 1))),
                                                 bn=nn.BatchNorm2d(4), drop=nn.Dropout(0.5), fc=nn.Linear(36, 5)),
     (2, 4, 3, 3), "bn->flatten->linear"),
    ("bn-view-linear", lambda: Lambda(view_head, bn=nn.BatchNorm2d(3), fc=nn.Linear(12, 4, bias=False)),
     (2, 3, 2, 2), "bn->flatten->linear"),
    ("bn-nnflatten-linear", lambda: nn.Sequential(nn.BatchNorm3d(2), nn.Flatten(), nn.Linear(16, 3)),
     (2, 2, 2, 2, 2), "bn->flatten->linear"),
    ("concat-convs", lambda: Lambda(lambda m, x: m.bn(torch.cat([m.a(x), m.b(x), m.c(x)], dim=1)),
                                    a=nn.Conv2d(4, 2, 3, padding=1), b=nn.Conv2d(4, 3, 5, padding=2, bias=False),
                                    c=nn.Conv2d(4, 4, 1, groups=4), bn=nn.BatchNorm2d(9)),
     (2, 4, 6, 6), "concat(convs)->bn"),
    ("affine-false", lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)),
     (2, 3, 5, 5), "conv->bn"),
    ("sync-bn", lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4)), (2, 3, 4, 4), "conv->bn"),
]


@pytest.mark.parametrize("factory, shape, pattern", [case[1:] for case in FOLDS], ids=[case[0] for case in FOLDS])
def test_each_pattern_folds_exactly(factory, shape, pattern):
    plan, folded = check_exact(factory(), shape)
    decision = only(plan)
    assert (decision.pattern, decision.action) == (pattern, "fold"), decision
    assert count_bn(folded) == 0
    shifts = [m for m in folded.modules() if isinstance(m, ChannelShift)]
    assert len(shifts) == (pattern == "bn->padded-conv")


def test_conv_bn_conv_folds_backward():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3, padding=1))
    plan, _ = check_exact(model, (2, 3, 6, 6))
    assert only(plan).pattern == "conv->bn" and only(plan).producer == "0" and only(plan).consumer == "2"


def test_iresnet_style_block_and_head_fold_together():
    """bn1 -> padded conv -> bn2, residual add, then head bn -> flatten -> linear -> bn1d: every BN goes."""
    def forward(m, x):
        y = m.bn2(m.conv1(m.bn1(x)))
        y = m.head_bn(m.prelu(y) + x)
        return m.features(m.fc(torch.flatten(y, 1)))
    model = Lambda(forward, bn1=nn.BatchNorm2d(3), conv1=nn.Conv2d(3, 3, 3, padding=1, bias=False),
                   bn2=nn.BatchNorm2d(3), prelu=nn.PReLU(3), head_bn=nn.BatchNorm2d(3), fc=nn.Linear(48, 6),
                   features=nn.BatchNorm1d(6))
    plan, folded = check_exact(model, (3, 3, 4, 4))
    assert [d.pattern for d in plan.decisions] == ["bn->padded-conv", "conv->bn", "bn->flatten->linear",
                                                   "linear->bn1d"]
    assert count_bn(folded) == 0
    assert isinstance(folded.get_submodule("bn1"), ChannelShift)
    assert set(folded.state_dict()) == {"bn1.shift", "conv1.weight", "conv1.bias", "prelu.weight", "fc.weight",
                                        "fc.bias"}


def test_linear_bn1d_needs_rank_from_example_input():
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    assert "rank is unknown" in only(plan_folds(model)).reason
    plan, folded = check_exact(model, (5, 6), use_example=True)
    assert only(plan).action == "fold" and count_bn(folded) == 0


def test_example_input_that_does_not_run_is_a_user_error():
    with pytest.raises(BnportError, match=r"input of shape \(1, 5, 4, 4\) does not run.*--input-size"):
        plan_folds(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), example_input=torch.randn(1, 5, 4, 4))


# (id, model factory, input shape, use example_input, reason fragment)
REFUSALS = [
    ("producer-two-consumers", lambda: Lambda(two_consumers, conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4)),
     (2, 3, 5, 5), False, "producer conv has another consumer (relu)"),
    ("module-reused", lambda: Lambda(lambda m, x: m.bn(m.a(x)) + m.bn(m.b(x)),
                                     a=nn.Conv2d(3, 4, 1), b=nn.Conv2d(3, 4, 3, padding=1), bn=nn.BatchNorm2d(4)),
     (2, 3, 5, 5), False, "module bn is called at 2 sites"),
    ("conv-reused", lambda: Lambda(lambda m, x: m.bn(m.conv(x)) + m.conv(x), conv=nn.Conv2d(3, 3, 1),
                                   bn=nn.BatchNorm2d(3)),
     (2, 3, 4, 4), False, "producer conv is called at 2 sites"),
    # torch's own fuse folds this one, wrongly: BatchNorm1d normalises dim 1, the Linear acts on dim 2
    ("linear-3d", lambda: nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)), (2, 5, 6), True,
     "Linear input is 3-D: folding would be inexact"),
    ("bn-relu-conv", lambda: nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3)),
     (2, 3, 5, 5), False, "followed by ReLU then conv: no exact fold exists"),
    ("no-running-stats", lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)),
     (4, 3, 3, 3), False, "has no running statistics"),
    ("bn-is-output", lambda: nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)), (2, 3, 3, 3), False,
     "its output is a model output"),
]


@pytest.mark.parametrize("factory, shape, use_example, reason", [c[1:] for c in REFUSALS],
                         ids=[c[0] for c in REFUSALS])
def test_each_refusal_keeps_the_bn_and_says_why(factory, shape, use_example, reason):
    model = factory()
    plan, folded = check_exact(model, shape, use_example=use_example)
    kept = [d for d in plan.decisions if d.action == "keep"]
    assert len(kept) == len(plan.decisions) == count_bn(folded) == 1
    assert reason in kept[0].reason, kept[0].reason


class StdConv2d(nn.Conv2d):
    """Weight-standardised conv: scaling its weight is undone by its own forward, so a fold would be wrong."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / w.std(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class PlainConv2d(nn.Conv2d):
    """A subclass that computes exactly as Conv2d does: folds like one."""


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style BN with a built-in activation: folding it would drop the ReLU."""

    def forward(self, x):
        return torch.relu(super().forward(x))


SUBCLASSES = [
    ("std-conv", lambda: nn.Sequential(StdConv2d(3, 4, 3), nn.BatchNorm2d(4)), "keep",
     "producer 0 is a StdConv2d, a subclass with its own forward"),
    ("weight-norm-conv", lambda: nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3)),
                                               nn.BatchNorm2d(4)), "keep", "producer 0 has parametrized weights"),
    ("bn-act", lambda: nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4)), "keep",
     "1 is a BatchNormAct2d, a BatchNorm subclass with its own forward"),
    ("plain-subclass", lambda: nn.Sequential(PlainConv2d(3, 4, 3), nn.BatchNorm2d(4)), "fold",
     "folded into 0's weight and bias"),
]


@pytest.mark.parametrize("factory, action, reason", [c[1:] for c in SUBCLASSES], ids=[c[0] for c in SUBCLASSES])
def test_subclasses_fold_only_when_they_compute_like_the_base(factory, action, reason):
    plan, folded = check_exact(factory(), (2, 3, 5, 5))
    assert only(plan).action == action and reason in only(plan).reason, only(plan).reason
    assert count_bn(folded) == (action == "keep")


def test_tiny_scale_refuses_padded_conv_but_not_unpadded():
    def model(padding):
        m = randomise_bn(nn.Sequential(nn.BatchNorm2d(5), nn.Conv2d(5, 3, 3, padding=padding)))
        m[0].weight.data[3] = 1e-12
        return m
    for padding, action in ((1, "keep"), (0, "fold")):
        m = model(padding).double().eval()
        plan = plan_folds(m)
        assert only(plan).action == action
        x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
        ref, out = m(x), fold_bn(m)(x)
        assert (out - ref).abs().max() <= 1e-10 * ref.abs().max()
    assert only(plan_folds(model(1))).reason.startswith("BN scale is ~0 in channel 3 (|scale| ")


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y


def test_untraceable_model_keeps_every_bn_and_runs_unchanged():
    model = randomise_bn(Untraceable()).double().eval()
    plan = plan_folds(model)
    assert not plan.traced and "TraceError" in plan.error
    assert only(plan).action == "keep" and only(plan).reason.startswith("model does not trace with torch.fx: ")
    folded = fold_bn(model)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert folded is not model and count_bn(folded) == 1 and torch.equal(folded(x), model(x))


def test_inplace_reuses_modules_and_default_copies():
    model = randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    x = torch.randn(1, 3, 5, 5)
    ref = model(x)
    assert fold_bn(model).get_submodule("0") is not model[0]
    folded = fold_bn(model, inplace=True)
    assert folded.get_submodule("0") is model[0] and count_bn(folded) == 0
    assert torch.allclose(folded(x), ref, atol=1e-5) and not folded.training


def test_training_mode_is_restored_by_plan_and_stats_untouched():
    model = randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    stats = model[1].running_mean.clone()
    plan_folds(model, example_input=torch.randn(2, 3, 5, 5))
    assert model.training and model[1].training and torch.equal(model[1].running_mean, stats)


def test_bn_scale_shift_matches_formula():
    bn = randomise_bn(nn.BatchNorm2d(5, eps=1e-3))
    scale, shift = bn_scale_shift(bn)
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    expected = bn.double().eval()(x)
    assert scale.dtype == torch.float64
    assert torch.allclose(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), expected, rtol=0, atol=1e-12)
    plain = randomise_bn(nn.BatchNorm1d(3, affine=False))
    scale, shift = bn_scale_shift(plain)
    assert torch.allclose(scale, 1 / torch.sqrt(plain.running_var.double() + plain.eps))
    assert torch.allclose(shift, -plain.running_mean.double() * scale)
    with pytest.raises(BnportError, match="no running statistics"):
        bn_scale_shift(nn.BatchNorm2d(2, track_running_stats=False))


def test_plan_table_and_dict_name_every_bn():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 1))
    plan = plan_folds(model)
    text = str(plan)
    assert text.splitlines()[0] == "2 BatchNorm: 1 fold, 1 keep"
    rows = [line.split() for line in text.splitlines()[1:]]
    assert rows[0][:6] == ["bn", "action", "pattern", "producer", "consumer", "reason"]
    assert rows[1][:5] == ["1", "fold", "conv->bn", "0", "2"] and rows[2][:5] == ["3", "keep", "-", "2", "4"]
    assert plan.to_dict()["decisions"][1] == {"bn": "3", "producer": "2", "consumer": "4", "pattern": None,
                                              "action": "keep",
                                              "reason": "followed by ReLU then conv: no exact fold exists (ReLU is "
                                                        "not affine: the BN's scale and shift cannot move past it)"}


@pytest.mark.parametrize("name, kwargs, size", [("iresnet_tiny", {"input_size": 32}, 32),
                                                ("mobilefacenet_tiny", {}, 112)])
def test_registry_face_models_fold_to_zero_bn(name, kwargs, size):
    from bnport.model.arch import create_model
    model = create_model(name, **kwargs)
    plan, folded = check_exact(model, (2, 3, size, size))
    assert plan.n_keep == 0 and count_bn(folded) == 0 and plan.n_fold == count_bn(model)
    if name == "iresnet_tiny":
        assert {d.pattern for d in plan.decisions} == {"conv->bn", "bn->padded-conv", "bn->flatten->linear",
                                                       "linear->bn1d"}


def test_iresnet100_folds_all_154_bn():
    from bnport.model.arch import create_model
    model = randomise_bn(create_model("iresnet100")).eval()
    assert count_bn(model) == 154
    assert count_bn(fold_bn(model, inplace=True)) == 0


TORCHVISION = ["resnet50", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "shufflenet_v2_x1_0",
               "mnasnet1_0", "googlenet", "densenet121"]


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_folds_at_least_what_fx_fuse_does(name):
    torchvision = pytest.importorskip("torchvision")
    from torch.fx.experimental.optimization import fuse
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = randomise_bn(getattr(torchvision.models, name)(weights=None, **kwargs)).eval()
    fuse_left = count_bn(fuse(model))
    plan, folded = check_exact(model, (2, 3, 64, 64), use_example=True)
    assert count_bn(folded) <= fuse_left
    if name == "densenet121":
        kept = [d for d in plan.decisions if d.action == "keep"]
        assert len(kept) == 62 and all(d.reason.startswith("followed by ReLU then ") for d in kept)
    else:
        assert count_bn(folded) == 0


# --- issue 9: what the timm zoo needs -------------------------------------------------------------------------------

@pytest.fixture
def norm_act_known(monkeypatch):
    register_norm_act(monkeypatch)


@pytest.mark.parametrize("act, kept", [(nn.SiLU(), "SiLU"), (nn.Hardswish(), "Hardswish"), (nn.PReLU(4), "PReLU")])
def test_norm_act_layer_folds_its_bn_and_keeps_its_activation(norm_act_known, act, kept):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), NormAct(4, act), nn.Conv2d(4, 2, 1))
    plan, folded = check_exact(model, (2, 3, 6, 6))
    decision = only(plan)
    assert (decision.bn, decision.pattern, decision.action) == ("1", "conv->bn", "fold")
    assert decision.reason.endswith(f"(NormAct: the BN part folds, its {kept} stays after it)"), decision.reason
    assert count_bn(folded) == 0 and not any(isinstance(m, NormAct) for m in folded.modules())
    assert isinstance(model[1], NormAct), "the caller's model keeps its layer"
    names = set(folded.state_dict())
    assert "1.running_mean" not in names and ("1.act.weight" in names) == (kept == "PReLU")


def test_norm_act_without_activation_folds_forward_into_a_padded_conv(norm_act_known):
    """The shift module that stays in front of the padded conv also carries the layer's (identity) parts."""
    model = nn.Sequential(nn.ReLU(), NormAct(4), nn.Conv2d(4, 3, 3, padding=1))
    plan, folded = check_exact(model, (2, 4, 5, 5))
    assert only(plan).pattern == "bn->padded-conv" and "it has no activation" in only(plan).reason
    assert isinstance(folded.get_submodule("1"), ChannelShift) and count_bn(folded) == 0


def test_unregistered_norm_act_layer_is_refused():
    plan, _ = check_exact(nn.Sequential(nn.Conv2d(3, 4, 3), NormAct(4, nn.ReLU())), (2, 3, 5, 5))
    assert only(plan).action == "keep" and "a BatchNorm subclass with its own forward" in only(plan).reason


def test_timm_batchnormact2d_folds():
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), timm_layers.BatchNormAct2d(6, act_layer=nn.SiLU),
                          nn.Conv2d(6, 4, 1), timm_layers.BatchNormAct2d(4, apply_act=False))
    plan, folded = check_exact(model, (2, 3, 5, 5))
    assert [(d.pattern, d.action) for d in plan.decisions] == [("conv->bn", "fold")] * 2
    assert "BatchNormAct2d: the BN part folds, its SiLU stays after it" in plan.decisions[0].reason
    assert count_bn(folded) == 0


def levit_like():
    return nn.Sequential(LinearNorm(6, 8), nn.Hardswish(), LinearNorm(8, 8), Lambda(lambda m, x: x.mean(1)),
                         NormLinear(8, 5))


def test_linear_norm_and_norm_linear_fold_exactly():
    plan, folded = check_exact(levit_like(), (3, 7, 6), use_example=True)
    assert [(d.bn, d.pattern, d.action) for d in plan.decisions] == [
        ("0.bn", "linear->flatten->bn1d", "fold"), ("2.bn", "linear->flatten->bn1d", "fold"),
        ("4.bn", "bn1d->linear", "fold")]
    assert count_bn(folded) == 0


def test_linear_norm_needs_shapes_and_bn1d_on_3d_stays_refused():
    plan = plan_folds(levit_like())
    assert [d.action for d in plan.decisions] == ["keep"] * 3
    assert "shapes around flatten are unknown" in plan.decisions[0].reason
    assert "rank is unknown" in plan.decisions[2].reason
    # BatchNorm1d straight on the 3-D Linear output normalises dim 1 (tokens), not the Linear's features
    three_d = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(7))
    plan, _ = check_exact(three_d, (2, 7, 6), use_example=True)
    assert only(plan).action == "keep" and "3-D" in only(plan).reason
    # a reshape that does not keep the Linear's features as the BN channels is not the pattern
    regroup = Lambda(lambda m, x: m.bn(m.linear(x).reshape(-1, 4)), linear=nn.Linear(6, 8), bn=nn.BatchNorm1d(4))
    plan, _ = check_exact(regroup, (2, 3, 6), use_example=True)
    assert only(plan).action == "keep" and "its features are not the BN's channels" in only(plan).reason
    head_3d = Lambda(lambda m, x: m.linear(m.bn(x)), bn=nn.BatchNorm1d(7), linear=nn.Linear(6, 3))
    plan, _ = check_exact(head_3d, (2, 7, 6), use_example=True)
    assert only(plan).action == "keep" and "BatchNorm1d input is 3-D" in only(plan).reason


@pytest.mark.parametrize("groups", [1, 2])
def test_identity_branch_joins_the_1x1_sibling(groups):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), RepVggBlock(4, groups=groups), RepVggBlock(4, groups=groups))
    plan, folded = check_exact(model, (2, 3, 6, 6))
    assert plan.n_keep == 0 and count_bn(folded) == 0
    merged = {d.bn: d for d in plan.decisions if d.pattern == "bn-identity->conv"}
    assert set(merged) == {"1.identity", "2.identity"}
    assert plan.identity_merges == {"1.identity": "1.conv_1x1", "2.identity": "2.conv_1x1"}
    assert "merged into sibling conv 1.conv_1x1 after 1.bn_1x1 folds into it" in merged["1.identity"].reason
    adds = [n for n in folded.graph.nodes if n.op == "call_function" and n.target.__name__ in ("add", "iadd")]
    assert len(adds) == 2, "one Add per block is left: the identity branch's is gone"


def test_identity_branch_joins_a_centred_kxk_sibling():
    """Without a 1x1 branch, the 3x3 conv takes the identity at its centre tap (padding = dilation)."""
    def forward(m, x):
        return m.bn(m.conv(x)) + m.identity(x)
    model = Lambda(forward, conv=nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False), bn=nn.BatchNorm2d(4),
                   identity=nn.BatchNorm2d(4))
    plan, _ = check_exact(model, (2, 4, 7, 7))
    assert plan.identity_merges == {"identity": "conv"}


IDENTITY_REFUSALS = [
    # shapes match only because the input is 1x1 here; a strided conv reads other positions in general
    ("stride-2", lambda: Lambda(lambda m, x: m.conv(x) + m.identity(x), conv=nn.Conv2d(4, 4, 3, 2, 1),
                                identity=nn.BatchNorm2d(4)), "sibling conv conv has stride (2, 2)"),
    ("even-kernel-same", lambda: Lambda(lambda m, x: m.conv(x) + m.identity(x),
                                        conv=nn.Conv2d(4, 4, 2, padding="same"), identity=nn.BatchNorm2d(4)),
     "sibling conv conv's kernel (2, 2) with padding same has no centre tap"),
    ("cropped", lambda: Lambda(lambda m, x: m.conv(x)[..., 1:-1, 1:-1] + m.identity(x)[..., 1:-1, 1:-1],
                               conv=nn.Conv2d(4, 4, 3, padding=1), identity=nn.BatchNorm2d(4)),
     "followed by getitem then add"),
    ("sum-read-twice", lambda: Lambda(lambda m, x: (lambda s: torch.cat([s + m.identity(x), s], 1))(m.conv(x)),
                                      conv=nn.Conv2d(4, 4, 1), identity=nn.BatchNorm2d(4)),
     "followed by add then cat: no exact fold exists"),
    ("other-input", lambda: Lambda(lambda m, x: m.conv(torch.relu(x)) + m.identity(x),
                                   conv=nn.Conv2d(4, 4, 1), identity=nn.BatchNorm2d(4)),
     "sibling conv conv reads another tensor than the BN"),
    # the 1-channel conv output broadcasts against the 4 channels of the branch
    ("broadcast-sibling", lambda: Lambda(lambda m, x: m.conv(x) + m.identity(x), conv=nn.Conv2d(4, 1, 1),
                                         identity=nn.BatchNorm2d(4)),
     "sibling conv conv maps 4 to 1 channels, the BN has 4"),
]


@pytest.mark.parametrize("factory, reason", [c[1:] for c in IDENTITY_REFUSALS], ids=[c[0] for c in IDENTITY_REFUSALS])
def test_identity_branch_refusals(request, factory, reason):
    shape = (2, 4, 1, 1) if request.node.callspec.id == "stride-2" else (2, 4, 6, 6)
    plan, _ = check_exact(factory(), shape)
    identity = next(d for d in plan.decisions if d.bn == "identity")
    assert identity.action == "keep" and not plan.identity_merges
    assert reason in identity.reason, identity.reason


def test_sibling_takes_one_identity_branch_only():
    def forward(m, x):
        return m.conv(x) + m.id_a(x) + m.id_b(x)
    model = Lambda(forward, conv=nn.Conv2d(4, 4, 1), id_a=nn.BatchNorm2d(4), id_b=nn.BatchNorm2d(4))
    plan, folded = check_exact(model, (2, 4, 5, 5))
    assert plan.identity_merges == {"id_a": "conv"}
    assert "already takes another identity branch" in next(d for d in plan.decisions if d.bn == "id_b").reason
    assert count_bn(folded) == 1


def test_tiny_scale_policy_is_one_threshold_for_both_passes():
    """A BN scale 1e-7 of the layer's largest used to fold in PyTorch (threshold 1e-8) and stay in ONNX (1e-6)."""
    import io

    import onnx

    from bnport.export.fold_onnx import fold_onnx_bn

    for ratio, action in ((1e-7, "keep"), (1e-5, "fold")):
        model = randomise_bn(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 3, padding=1))).eval()
        with torch.no_grad():
            model[1].weight.fill_(1.0)
            model[1].weight[2] = ratio
            model[1].running_var.fill_(1.0)
        assert only(plan_folds(model)).action == action
        buffer = io.BytesIO()
        torch.onnx.export(model, (torch.randn(1, 4, 5, 5),), buffer, dynamo=False, opset_version=17,
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
        _, summary = fold_onnx_bn(onnx.load_from_string(buffer.getvalue()))
        assert summary.decisions[0].action == action, summary.decisions[0].reason
        if action == "keep":
            assert only(plan_folds(model)).reason == summary.decisions[0].reason.split("; ")[-1]
