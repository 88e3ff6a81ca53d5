"""MODEL specs and weights: every spec form builds the right module, every checkpoint wrapper unwraps to the same
weights, and the loaded model computes exactly what the model that saved them computes."""
from __future__ import annotations

import hashlib
import inspect
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from bnport.atomic import sha256_file
from bnport.errors import BnportError
from bnport.model.arch import iresnet
from bnport.model.load import IMAGENET_SPEC, load_model, read_state_dict
from tests.helpers.models import randomize_bn

# TorchScript is deprecated upstream, but it is what many users ship: its warnings are expected here
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


class CustomConfig:
    """A class only this test module defines: unpickling it runs code, so weights_only must refuse it."""

    def __init__(self, lr: float):
        self.lr = lr


@pytest.fixture(scope="module")
def source() -> nn.Module:
    """A 'trained' iresnet_tiny: weights and BN statistics differ from the seeded initialisation."""
    model = load_model("iresnet_tiny").module
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return randomize_bn(model, seed=3).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_py(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


BN_RELU_CONV = """
    import torch.nn as nn

    def build():
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3))

    def broken():
        raise RuntimeError("no GPU here")

    def not_a_model():
        return 42
"""


# ---- MODEL specs ------------------------------------------------------------------------------------------------

def test_registered_name(x):
    loaded = load_model("iresnet_tiny")
    assert not loaded.module.training and all(not m.training for m in loaded.module.modules())
    assert (loaded.input_spec.height, loaded.input_spec.width) == (112, 112)
    assert loaded.input_spec.mean == (127.5,) * 3 and loaded.input_spec.std == (127.5,) * 3
    assert loaded.weights is None and loaded.weights_sha256 is None
    assert loaded.source_sha256 == sha(Path(inspect.getsourcefile(iresnet)))
    assert run(loaded.module, x).shape == (2, 32)


def test_unknown_registry_name_lists_the_registered_ones():
    with pytest.raises(BnportError) as err:
        load_model("iresnet_huge")
    assert "iresnet_huge" in err.value.message
    for name in ("iresnet50", "iresnet100", "mobilefacenet", "iresnet_tiny", "mobilefacenet_tiny"):
        assert name in err.value.hint


def test_torchvision_spec_builds_without_weights():
    loaded = load_model("torchvision:resnet18")
    assert type(loaded.module).__name__ == "ResNet" and not loaded.module.training
    assert loaded.input_spec == IMAGENET_SPEC
    assert sum(isinstance(m, nn.BatchNorm2d) for m in loaded.module.modules()) == 20
    # weights=None: fresh BN statistics, not the ImageNet-trained ones a weights download would bring
    assert torch.equal(loaded.module.bn1.running_var, torch.ones(64))
    with pytest.raises(BnportError, match="unknown torchvision model 'resnet9000'"):
        load_model("torchvision:resnet9000")


def test_file_factory_spec(tmp_path, x):
    path = write_py(tmp_path / "net.py", BN_RELU_CONV)
    loaded = load_model(f"{path}:build")
    assert [type(m) for m in loaded.module] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
    assert not loaded.module.training
    assert loaded.source_sha256 == sha(path)
    assert run(loaded.module, x).shape == (2, 2, 110, 110)


def test_file_factory_errors(tmp_path):
    path = write_py(tmp_path / "net.py", BN_RELU_CONV)
    with pytest.raises(BnportError, match="model file not found"):
        load_model(f"{tmp_path / 'missing.py'}:build")
    with pytest.raises(BnportError) as err:
        load_model(f"{path}:nothing")
    assert "'nothing'" in err.value.message and "build" in err.value.hint and "broken" in err.value.hint
    with pytest.raises(BnportError, match="calling broken\\(\\) failed: RuntimeError: no GPU here"):
        load_model(f"{path}:broken")
    with pytest.raises(BnportError, match="returned int, not a torch.nn.Module"):
        load_model(f"{path}:not_a_model")
    bad = write_py(tmp_path / "bad.py", "import nonexistent_module_xyz\n")
    with pytest.raises(BnportError, match="could not import .*bad.py: ModuleNotFoundError"):
        load_model(f"{bad}:build")


def test_package_module_factory_spec(tmp_path, monkeypatch, x):
    package = tmp_path / "bnport_test_userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    module = write_py(package / "nets.py", BN_RELU_CONV)
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model("bnport_test_userpkg.nets:build")
    assert isinstance(loaded.module[1], nn.BatchNorm2d) and not loaded.module.training
    assert loaded.source_sha256 == sha(module)
    with pytest.raises(BnportError, match="could not import module 'bnport_test_userpkg.nope'"):
        load_model("bnport_test_userpkg.nope:build")
    with pytest.raises(BnportError, match="has no 'missing'"):
        load_model("bnport_test_userpkg.nets:missing")


def test_torchscript_traced_file(tmp_path, source, x):
    path = tmp_path / "traced.pt"
    torch.jit.trace(source, x).save(str(path))
    loaded = load_model(str(path))
    assert isinstance(loaded.module, torch.jit.ScriptModule) and not loaded.module.training
    assert loaded.source_sha256 == sha(path)
    assert torch.equal(run(loaded.module, x), run(source, x))


def test_torchscript_scripted_file(tmp_path, x):
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.PReLU(4))).eval()
    scripted = torch.jit.script(model)
    path = tmp_path / "scripted.ts"
    scripted.save(str(path))
    loaded = load_model(str(path))
    assert not loaded.module.training
    assert torch.equal(run(loaded.module, x), run(model, x))


def test_state_dict_file_given_as_model_says_use_weights(tmp_path, source):
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)
    with pytest.raises(BnportError) as err:
        load_model(str(path))
    assert "not a TorchScript file" in err.value.message and "--weights" in err.value.hint
    with pytest.raises(BnportError, match="model file not found"):
        load_model(str(tmp_path / "missing.pt"))


def test_seeded_initialisation(x):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = load_model("iresnet_tiny").module.state_dict()
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random stream is left alone
    torch.manual_seed(999)
    b = load_model("iresnet_tiny").module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["conv1.weight"].std() > 0.05  # really initialised, not zeros


# ---- weights ----------------------------------------------------------------------------------------------------

def prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


WRAPPERS = {
    "plain": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 12},
    "state_dict_backbone": lambda sd: {"epoch": 3, "global_step": 9000, "state_dict_backbone": prefixed(sd, "module."),
                                       "state_dict_softmax_fc": {"weight": torch.zeros(4, 32)},
                                       "state_optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}},
    "net_state_dict": lambda sd: {"net_state_dict": sd, "optimizer": {"state": {}}},
    "model": lambda sd: {"model": sd, "arch": "r100"},
    "module.": lambda sd: prefixed(sd, "module."),
    "_orig_mod.": lambda sd: prefixed(sd, "_orig_mod."),
    "module._orig_mod.": lambda sd: prefixed(sd, "module._orig_mod."),
    "_orig_mod.module.": lambda sd: prefixed(sd, "_orig_mod.module."),
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_weight_wrappers_are_recognised(tmp_path, source, x, wrapper):
    path = tmp_path / "checkpoint.pt"
    torch.save(WRAPPERS[wrapper](source.state_dict()), path)
    loaded = load_model("iresnet_tiny", weights=path)
    assert not loaded.module.training
    assert loaded.weights == str(path) and loaded.weights_sha256 == sha(path)
    got, want = loaded.module.state_dict(), source.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(run(loaded.module, x), run(source, x))


def test_loaded_output_is_the_source_output_not_the_initialisation(tmp_path, source, x):
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)
    loaded = load_model("iresnet_tiny", weights=path)
    fresh = load_model("iresnet_tiny")
    assert torch.equal(run(loaded.module, x), run(source, x))
    assert not torch.allclose(run(fresh.module, x), run(source, x), atol=1e-3)


def test_weights_key_names_the_state_dict(tmp_path, source, x):
    other = {k: torch.zeros_like(v) for k, v in source.state_dict().items()}
    path = tmp_path / "two.pt"
    torch.save({"ema": source.state_dict(), "raw": other}, path)
    with pytest.raises(BnportError) as err:
        load_model("iresnet_tiny", weights=path)
    assert "no state dict found" in err.value.message
    assert "ema, raw" in err.value.hint and "--weights-key" in err.value.hint
    loaded = load_model("iresnet_tiny", weights=path, weights_key="ema")
    assert torch.equal(run(loaded.module, x), run(source, x))
    assert loaded.load_options["weights_key"] == "ema"
    with pytest.raises(BnportError) as err:
        load_model("iresnet_tiny", weights=path, weights_key="teacher")
    assert "'teacher'" in err.value.message and "ema, raw" in err.value.hint


def test_safetensors_weights(tmp_path, source, x):
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = load_model("iresnet_tiny", weights=path)
    assert loaded.weights_sha256 == sha(path) == sha256_file(path)
    assert torch.equal(run(loaded.module, x), run(source, x))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:200])
    with pytest.raises(BnportError, match="could not read safetensors file"):
        load_model("iresnet_tiny", weights=broken)


def test_mismatched_keys_are_listed_and_non_strict_loads_anyway(tmp_path, source):
    sd = dict(source.state_dict())
    del sd["fc.bias"], sd["layer2.0.bn3.running_var"]
    sd["head.extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pt"
    torch.save(sd, path)
    with pytest.raises(BnportError) as err:
        load_model("iresnet_tiny", weights=path)
    message = err.value.message
    assert "missing 2: layer2.0.bn3.running_var, fc.bias" in message
    assert "unexpected 1: head.extra.weight" in message
    assert "--non-strict" in err.value.hint
    loaded = load_model("iresnet_tiny", weights=path, strict=False)
    got, fresh = loaded.module.state_dict(), load_model("iresnet_tiny").module.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items() if k in got)
    assert torch.equal(got["fc.bias"], fresh["fc.bias"])  # what is missing keeps its seeded initialisation
    assert loaded.load_options["strict"] is False


def test_shape_mismatch_names_the_key_even_when_not_strict(tmp_path, source):
    sd = dict(source.state_dict())
    sd["layer3.0.conv2.weight"] = torch.zeros(16, 32, 3, 3)
    path = tmp_path / "wrong.pt"
    torch.save(sd, path)
    for strict in (True, False):
        with pytest.raises(BnportError) as err:
            load_model("iresnet_tiny", weights=path, strict=strict)
        assert "shape mismatch in layer3.0.conv2.weight (16, 32, 3, 3) vs (32, 32, 3, 3)" in err.value.message


def test_wrong_architecture_is_a_shape_error(tmp_path, source):
    path = tmp_path / "wide.pt"
    torch.save(load_model("iresnet_tiny").module.state_dict(), path)
    with pytest.raises(BnportError) as err:
        load_model("mobilefacenet_tiny", weights=path)
    assert "does not match the model" in err.value.message
    assert "missing" in err.value.message and "unexpected" in err.value.message


def test_custom_pickle_needs_trust_pickle(tmp_path, source, x):
    path = tmp_path / "with_config.pt"
    torch.save({"state_dict": source.state_dict(), "config": CustomConfig(lr=0.1)}, path)
    with pytest.raises(BnportError) as err:
        load_model("iresnet_tiny", weights=path)
    assert "weights_only" in err.value.message and "--trust-pickle" in err.value.hint
    loaded = load_model("iresnet_tiny", weights=path, trust_pickle=True)
    assert torch.equal(run(loaded.module, x), run(source, x))
    assert loaded.load_options["trust_pickle"] is True


def test_whole_pickled_module_needs_trust_pickle(tmp_path, source, x):
    path = tmp_path / "whole.pt"
    torch.save(source, path)
    with pytest.raises(BnportError, match="not unpickled"):
        read_state_dict(path)
    loaded = load_model("iresnet_tiny", weights=path, trust_pickle=True)
    assert torch.equal(run(loaded.module, x), run(source, x))


def test_unreadable_and_missing_weights(tmp_path):
    with pytest.raises(BnportError) as err:
        load_model("iresnet_tiny", weights=tmp_path / "nope.pth")
    assert "weights file not found" in err.value.message and "--weights" in err.value.hint
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(BnportError, match="could not read weights"):
        load_model("iresnet_tiny", weights=junk)
    scalar = tmp_path / "scalar.pt"
    torch.save(torch.zeros(3), scalar)
    with pytest.raises(BnportError, match="not a state dict"):
        load_model("iresnet_tiny", weights=scalar)


def test_weights_into_torchscript_model(tmp_path, source, x):
    traced = tmp_path / "fresh.pt"
    torch.jit.trace(load_model("iresnet_tiny").module, x).save(str(traced))
    weights = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), weights)
    loaded = load_model(str(traced), weights=weights)
    assert torch.equal(run(loaded.module, x), run(source, x))
