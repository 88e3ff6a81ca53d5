"""Architecture registry: insightface IResNet / MobileFaceNet names, BN placement, BN and parameter counts.

Counts are checked two ways: against a closed-form count written from insightface's arcface_torch definitions, and
against insightface's published sizes. Big models are built once per module on the meta device (no memory, no
compute), so shapes and names are real while the file stays fast.
"""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from bnport.errors import BnportError
from bnport.model import arch
from bnport.model.arch.iresnet import IBasicBlock

IRESNET_LAYERS = {"iresnet18": [2, 2, 2, 2], "iresnet34": [3, 4, 6, 3], "iresnet50": [3, 4, 14, 3],
                  "iresnet100": [3, 13, 30, 3], "iresnet200": [6, 26, 60, 6]}


def bn_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def iresnet_params(layers: list[int], width: int = 64, features: int = 512) -> int:
    """Closed-form parameter count of arcface_torch's IResNet (conv 3x3 stem, IBasicBlock stages, 7x7 fc head)."""
    total = 3 * width * 9 + 2 * width + width  # conv1, bn1, prelu
    inplanes = width
    for stage, blocks in enumerate(layers):
        planes = width * 2 ** stage
        for b in range(blocks):
            total += 2 * inplanes + inplanes * planes * 9 + 2 * planes + planes + planes * planes * 9 + 2 * planes
            if b == 0:  # every stage starts with stride 2: conv1x1 + BN downsample
                total += inplanes * planes + 2 * planes
            inplanes = planes
    return total + 2 * inplanes + inplanes * 49 * features + features + 2 * features  # bn2, fc, features


def mobilefacenet_params(blocks=(1, 4, 6, 2), scale: int = 2, features: int = 512) -> int:
    """Closed-form parameter count of arcface_torch's MobileFaceNet (`get_mbf`)."""
    def conv_block(i, o, k, g=1):  # conv + BN + PReLU
        return i // g * o * k * k + 3 * o

    def linear_block(i, o, k, g=1):  # conv + BN
        return i // g * o * k * k + 2 * o

    def depthwise(i, o, g):
        return conv_block(i, g, 1) + conv_block(g, g, 3, g) + linear_block(g, o, 1)

    c1, c2 = 64 * scale, 128 * scale
    total = conv_block(3, c1, 3)
    total += conv_block(c1, c1, 3, 64) if blocks[0] == 1 else blocks[0] * depthwise(c1, c1, 128)
    total += depthwise(c1, c1, 128) + blocks[1] * depthwise(c1, c1, 128)
    total += depthwise(c1, c2, 256) + blocks[2] * depthwise(c2, c2, 256)
    total += depthwise(c2, c2, 512) + blocks[3] * depthwise(c2, c2, 256)
    total += conv_block(c2, 512, 1)
    return total + linear_block(512, 512, 7, 512) + 512 * features + 2 * features  # GDC


@pytest.fixture(scope="module")
def big() -> dict[str, nn.Module]:
    """Every full-size registered model, built once on the meta device."""
    with torch.device("meta"):
        return {name: arch.create_model(name) for name in [*IRESNET_LAYERS, "mobilefacenet", "mobilefacenet_large"]}


def test_registry_lists_insightface_names_and_tiny_variants():
    names = arch.list_models()
    for name in [*IRESNET_LAYERS, "mobilefacenet", "iresnet_tiny", "mobilefacenet_tiny"]:
        assert name in names
        assert arch.get_entry(name).input_size == (112, 112)


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(BnportError) as err:
        arch.create_model("iresnet101")
    assert "iresnet101" in err.value.message
    for name in ("iresnet50", "iresnet100", "mobilefacenet", "iresnet_tiny"):
        assert name in err.value.hint


@pytest.mark.parametrize("name", list(IRESNET_LAYERS))
def test_iresnet_bn_and_parameter_counts_match_insightface(big, name):
    model = big[name]
    layers = IRESNET_LAYERS[name]
    # stem bn1 + 3 per block + one downsample BN per stage + head bn2 and features
    assert len(bn_layers(model)) == 3 * sum(layers) + 1 + 4 + 2
    assert n_params(model) == iresnet_params(layers)


def test_published_sizes(big):
    assert len(bn_layers(big["iresnet100"])) == 154
    assert n_params(big["iresnet100"]) == pytest.approx(65.2e6, rel=0.01)
    assert n_params(big["iresnet50"]) == pytest.approx(43.6e6, rel=0.01)
    mbf = n_params(big["mobilefacenet"])
    assert mbf == mobilefacenet_params()
    # insightface quotes "~2.0M"; its own definition (and this one, which matches it key for key) gives 2.06M
    assert mbf == 2_059_520
    assert mbf == pytest.approx(2.0e6, rel=0.03)
    assert len(bn_layers(big["mobilefacenet"])) == 50


def test_mobilefacenet_large_count(big):
    assert n_params(big["mobilefacenet_large"]) == mobilefacenet_params((2, 8, 12, 4), scale=4)


def test_iresnet_key_names(big):
    keys = big["iresnet100"].state_dict().keys()
    for key in ["conv1.weight", "bn1.running_mean", "prelu.weight",
                "layer1.0.bn1.weight", "layer1.0.conv1.weight", "layer1.0.bn2.bias", "layer1.0.prelu.weight",
                "layer1.0.conv2.weight", "layer1.0.bn3.running_var", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.running_var", "layer1.0.downsample.1.num_batches_tracked",
                "layer2.12.bn3.weight", "layer3.29.conv2.weight", "layer4.2.prelu.weight",
                "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var",
                "fc.weight", "fc.bias", "features.weight", "features.bias", "features.running_mean",
                "features.running_var"]:
        assert key in keys, key
    for absent in ["layer1.1.downsample.0.weight", "layer2.13.bn1.weight", "layer3.30.bn1.weight", "fc.0.weight"]:
        assert absent not in keys, absent
    # one block holds exactly these tensors, in this order (order matters for checkpoints saved as lists)
    block = [k[len("layer1.0."):] for k in keys if k.startswith("layer1.0.")]
    assert block == [f"bn1.{b}" for b in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")] + \
        ["conv1.weight"] + [f"bn2.{b}" for b in ("weight", "bias", "running_mean", "running_var",
                                                  "num_batches_tracked")] + \
        ["prelu.weight", "conv2.weight"] + [f"bn3.{b}" for b in ("weight", "bias", "running_mean", "running_var",
                                                                 "num_batches_tracked")] + \
        ["downsample.0.weight"] + [f"downsample.1.{b}" for b in ("weight", "bias", "running_mean", "running_var",
                                                                 "num_batches_tracked")]


def test_iresnet_shapes_and_insightface_details(big):
    model = big["iresnet100"]
    sd = model.state_dict()
    assert tuple(sd["conv1.weight"].shape) == (64, 3, 3, 3)
    assert tuple(sd["layer1.0.bn1.weight"].shape) == (64,)
    assert tuple(sd["layer2.0.downsample.0.weight"].shape) == (128, 64, 1, 1)
    assert tuple(sd["fc.weight"].shape) == (512, 512 * 7 * 7)
    assert tuple(sd["features.running_mean"].shape) == (512,)
    block = model.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv1.padding == (1, 1)
    assert block.conv2.stride == (2, 2) and block.conv2.padding == (1, 1)
    assert block.downsample[0].stride == (2, 2)
    assert model.layer2[1].downsample is None
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert isinstance(model.features, nn.BatchNorm1d) and not model.features.weight.requires_grad
    assert model.fc.bias is not None


def test_mobilefacenet_key_names(big):
    keys = big["mobilefacenet"].state_dict().keys()
    for key in ["layers.0.layers.0.weight", "layers.0.layers.1.running_mean", "layers.0.layers.2.weight",
                "layers.1.layers.0.weight", "layers.2.layers.0.layers.0.weight", "layers.2.layers.2.layers.1.weight",
                "layers.3.layers.3.layers.1.layers.0.weight", "layers.5.layers.5.layers.2.layers.1.running_var",
                "layers.7.layers.1.layers.2.layers.1.bias",
                "conv_sep.layers.0.weight", "conv_sep.layers.1.running_mean", "conv_sep.layers.2.weight",
                "features.layers.0.layers.0.weight", "features.layers.0.layers.1.running_var",
                "features.layers.2.weight", "features.layers.3.running_mean", "features.layers.3.weight"]:
        assert key in keys, key
    for absent in ["features.layers.2.bias", "layers.3.layers.4.layers.0.layers.0.weight", "layers.8.layers.0.weight"]:
        assert absent not in keys, absent
    sd = big["mobilefacenet"].state_dict()
    assert tuple(sd["layers.1.layers.0.weight"].shape) == (128, 2, 3, 3)  # 64 groups over 128 channels
    assert tuple(sd["features.layers.0.layers.0.weight"].shape) == (512, 1, 7, 7)
    assert tuple(sd["features.layers.2.weight"].shape) == (512, 512)


def call_modules(graph_module: fx.GraphModule) -> list[str]:
    return [n.target for n in graph_module.graph.nodes if n.op == "call_module"]


def test_block_op_order_is_bn_conv_bn_prelu_conv_bn():
    block = IBasicBlock(8, 8)
    assert call_modules(fx.symbolic_trace(block)) == ["bn1", "conv1", "bn2", "prelu", "conv2", "bn3"]
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    traced = fx.symbolic_trace(IBasicBlock(8, 16, stride=2, downsample=down))
    assert call_modules(traced) == ["bn1", "conv1", "bn2", "prelu", "conv2", "bn3", "downsample.0", "downsample.1"]
    # the residual add takes the bn3 output and the downsample output
    add = [n for n in traced.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(add) == 1 and {a.target for a in add[0].args} == {"bn3", "downsample.1"}


def test_iresnet_head_order_is_bn_flatten_dropout_fc_features():
    traced = fx.symbolic_trace(arch.create_model("iresnet_tiny"))
    nodes = [n for n in traced.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    tail = [(n.op, n.target if n.op != "call_function" else n.target.__name__) for n in nodes[-5:]]
    assert tail == [("call_module", "bn2"), ("call_function", "flatten"), ("call_module", "dropout"),
                    ("call_module", "fc"), ("call_module", "features")]
    head = [n.target for n in nodes[:3]]
    assert head == ["conv1", "bn1", "prelu"]


def test_mobilefacenet_every_bn_follows_a_conv_or_linear():
    model = arch.create_model("mobilefacenet_tiny")
    traced = fx.symbolic_trace(model)
    modules = dict(traced.named_modules())
    bns = [n for n in traced.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.BatchNorm2d)]
    assert len(bns) == len(bn_layers(model)) - 1
    for node in bns:
        assert isinstance(modules[node.args[0].target], nn.Conv2d), node.target
    last = [n for n in traced.graph.nodes if n.op == "call_module"][-2:]
    assert [type(modules[n.target]) for n in last] == [nn.Linear, nn.BatchNorm1d]


@pytest.mark.parametrize("name", list(IRESNET_LAYERS) + ["mobilefacenet", "mobilefacenet_large"])
def test_full_models_give_512_d_embeddings(big, name):
    with torch.no_grad():
        out = big[name].eval()(torch.empty(3, 3, 112, 112, device="meta"))
    assert tuple(out.shape) == (3, 512)


@pytest.mark.parametrize("name, bns", [("iresnet_tiny", 19), ("mobilefacenet_tiny", 23)])
def test_tiny_variants_run_for_real(name, bns):
    model = arch.create_model(name).eval()
    assert len(bn_layers(model)) == bns
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 32) and torch.isfinite(out).all()
    # the same module tree as the full model, only narrower
    full = {"iresnet_tiny": "iresnet18", "mobilefacenet_tiny": "mobilefacenet"}[name]
    with torch.device("meta"):
        reference = arch.create_model(full)
    assert {type(m) for m in model.modules()} == {type(m) for m in reference.modules()}


def test_full_model_runs_for_real_on_cpu():
    model = arch.create_model("mobilefacenet").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 512) and torch.isfinite(out).all()
