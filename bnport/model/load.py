"""MODEL spec + weights -> an eval-mode `nn.Module` with its input spec and provenance.

A MODEL spec is a registered name (`iresnet50`), `torchvision:NAME`, `path/to/file.py:factory`,
`package.module:factory` or a TorchScript file. Weights are a state dict in a `.pt/.pth` pickle (loaded with
`weights_only=True` unless the user trusts it) or `.safetensors`; the usual wrappers (`state_dict`,
`state_dict_backbone`, `net_state_dict`, `model`, a `module.` prefix) are unwrapped. Mismatched keys are an error
that lists them unless `strict=False`. Nothing is downloaded: torchvision models are built with `weights=None`.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

from bnport.data.transforms import InputSpec
from bnport.atomic import sha256_file
from bnport.errors import BnportError

WRAPPER_KEYS = ("state_dict_backbone", "state_dict", "net_state_dict", "model", "backbone", "module")
STRIP_PREFIXES = ("module.", "_orig_mod.", "backbone.")
IMAGENET_SPEC = InputSpec(224, 224, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))


@dataclass
class LoadedModel:
    """A model ready to run: `module` is in eval mode; the rest says where it came from."""

    module: nn.Module
    spec: str
    input_spec: InputSpec
    weights: str | None = None
    weights_sha256: str | None = None
    source_sha256: str | None = None
    provenance: dict = field(default_factory=dict)
    load_options: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"spec": self.spec, "weights": self.weights, "weights_sha256": self.weights_sha256,
                "source_sha256": self.source_sha256, "input_spec": self.input_spec.to_dict(), **self.provenance}


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def is_torchscript_file(path: Path) -> bool:
    """TorchScript archives are zips with a `code/` folder; plain `torch.save` zips have none."""
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in name for name in z.namelist())


def _factory_from_file(path: Path, name: str):
    if not path.is_file():
        raise BnportError(f"model file not found: {path}", "give path/to/file.py:factory with an existing file")
    # as under `python file.py`, the file's own folder is importable, so it can import the modules beside it
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    module_name = f"bnport_user_model_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # so torch.fx and pickling can find classes defined in it
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise BnportError(f"could not import {path}: {type(e).__name__}: {e}", "fix the model file") from e
    if not hasattr(module, name):
        raise BnportError(f"{path} has no {name!r}", f"callables there: {', '.join(_callables(module)) or 'none'}")
    return getattr(module, name), sha256_file(path)


def _callables(module) -> list[str]:
    return sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                  and getattr(v, "__module__", None) == module.__name__)


def _factory_from_module(module_name: str, name: str):
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BnportError(f"could not import module {module_name!r}: {e}",
                          "install it or give path/to/file.py:factory") from e
    if not hasattr(module, name):
        raise BnportError(f"module {module_name} has no {name!r}", f"callables there: {', '.join(_callables(module))}")
    source = inspect.getsourcefile(module)
    return getattr(module, name), sha256_file(source) if source else None


def build_module(spec: str) -> tuple[nn.Module, InputSpec, str | None]:
    """Build the architecture named by `spec` (random or TorchScript weights).

    Returns the module, its default input spec and the sha256 of its source."""
    from bnport.model import arch

    path = Path(spec)
    if spec.startswith("torchvision:"):
        import torchvision

        name = spec.split(":", 1)[1]
        try:
            module = torchvision.models.get_model(name, weights=None)
        except ValueError:
            raise BnportError(f"unknown torchvision model {name!r}",
                              "see torchvision.models.list_models() for the names") from None
        return module, IMAGENET_SPEC, _sha256_text(f"torchvision=={torchvision.__version__}:{name}")
    if path.suffix in (".pt", ".pth", ".ts", ".jit", ".torchscript") or path.is_file():
        if not path.exists():
            raise BnportError(f"model file not found: {path}", "check the path")
        if not is_torchscript_file(path):
            raise BnportError(f"{path} is not a TorchScript file",
                              "give the architecture as a MODEL spec (e.g. iresnet50 or file.py:factory) "
                              "and this file as --weights")
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise BnportError(f"could not load TorchScript file {path}: {e}", "re-save it with torch.jit.save") from e
        return module, InputSpec(), sha256_file(path)
    if ":" in spec:
        target, _, name = spec.rpartition(":")
        if target.endswith(".py"):
            factory, sha = _factory_from_file(Path(target), name)
        else:
            factory, sha = _factory_from_module(target, name)
        try:
            module = factory()
        except Exception as e:
            raise BnportError(f"{spec}: calling {name}() failed: {type(e).__name__}: {e}",
                              "the factory must build the model with no arguments") from e
        if not isinstance(module, nn.Module):
            raise BnportError(f"{spec} returned {type(module).__name__}, not a torch.nn.Module",
                              "the factory must return the model")
        return module, InputSpec(), sha
    entry = arch.get_entry(spec)
    source = inspect.getsourcefile(entry.factory)
    return arch.create_model(spec), InputSpec(*entry.input_size), sha256_file(source) if source else None


def read_state_dict(path: str | Path, *, weights_key: str | None = None, trust_pickle: bool = False) -> dict:
    """Read a state dict from `.pt/.pth/.bin` (pickle) or `.safetensors`, unwrapping the common containers."""
    path = Path(path)
    if not path.is_file():
        raise BnportError(f"weights file not found: {path}", "check the --weights path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
        except Exception as e:
            raise BnportError(f"could not read safetensors file {path}: {e}", "is the file complete?") from e
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
        except Exception as e:
            if not trust_pickle and "weights_only" in str(e):
                raise BnportError(f"{path} holds more than tensors, so it was not unpickled (weights_only=True)",
                                  "if you trust this file, add --trust-pickle") from None
            raise BnportError(f"could not read weights {path}: {type(e).__name__}: {str(e).splitlines()[0]}",
                              "give a state dict saved with torch.save or a .safetensors file") from None
    return unwrap_state_dict(obj, weights_key=weights_key, source=str(path))


def unwrap_state_dict(obj, *, weights_key: str | None = None, source: str = "weights") -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a checkpoint: an explicit key, a known wrapper key, or a pickled module."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if weights_key is not None:
        if not isinstance(obj, dict) or weights_key not in obj:
            keys = ", ".join(map(str, obj.keys())) if isinstance(obj, dict) else type(obj).__name__
            raise BnportError(f"{source} has no key {weights_key!r}", f"top-level keys: {keys}")
        return unwrap_state_dict(obj[weights_key], source=source)
    if not isinstance(obj, dict):
        raise BnportError(f"{source} holds a {type(obj).__name__}, not a state dict", "save model.state_dict()")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    else:
        for key in WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], (dict, nn.Module)):
                return unwrap_state_dict(obj[key], source=source)
        raise BnportError(f"{source}: no state dict found", f"top-level keys: {', '.join(map(str, obj))}; "
                          "name the one holding the weights with --weights-key")
    return state


def _strip_prefixes(state: dict[str, torch.Tensor], own: dict) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (`module.` from DDP, `_orig_mod.` from torch.compile) the model itself does not use.

    Wrappers nest in either order (`module._orig_mod.`, `_orig_mod.module.`), so strip until none is left."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in STRIP_PREFIXES:
            if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def _summarise(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def apply_state_dict(module: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True,
                     source: str = "weights") -> None:
    """Load `state` into `module`; mismatched keys or shapes are one error listing them (unless not strict)."""
    own = module.state_dict()
    state = _strip_prefixes(state, own)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if shapes:
        raise BnportError(f"{source} does not fit this architecture: shape mismatch in {_summarise(shapes, 4)}",
                          "check the MODEL spec (e.g. iresnet50 vs iresnet100) and --input-size")
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_summarise(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_summarise(unexpected)}")
        raise BnportError(f"{source} does not match the model: " + "; ".join(parts),
                          "check the MODEL spec, name the wrapper key with --weights-key, or pass --non-strict")
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def load_model(spec: str, *, weights: str | Path | None = None, weights_key: str | None = None, strict: bool = True,
               trust_pickle: bool = False, input_spec: InputSpec | None = None) -> LoadedModel:
    """Build `spec`, load `weights` into it, put it in eval mode. `input_spec` None = the architecture's default.

    Without weights the initialisation is seeded (seed 0), so the same spec always gives the same model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module, default_spec, source_sha = build_module(spec)
    weights_sha = None
    if weights is not None:
        state = read_state_dict(weights, weights_key=weights_key, trust_pickle=trust_pickle)
        apply_state_dict(module, state, strict=strict, source=str(weights))
        weights_sha = sha256_file(weights)
    module.eval()
    return LoadedModel(module=module, spec=spec, input_spec=input_spec or default_spec,
                       weights=str(weights) if weights is not None else None, weights_sha256=weights_sha,
                       source_sha256=source_sha,
                       load_options={"weights_key": weights_key, "strict": strict, "trust_pickle": trust_pickle})


def check_input_runs(loaded: LoadedModel) -> None:
    """Run two blank images of the input spec's size through the model (eval mode, no grad), so a wrong
    --input-size is one clear error before anything is written, not a shape error deep inside a run."""
    from bnport.runtime.device import modes_kept

    spec = loaded.input_spec
    module = loaded.module
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    try:
        with modes_kept(module), torch.no_grad():
            module.eval()(torch.zeros(2, 3, spec.height, spec.width, device=device))
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise BnportError(f"a {spec.height}x{spec.width} input does not run through {loaded.spec}: "
                          f"{type(e).__name__}: {first}",
                          "give the input size the model was built for with --input-size HxW") from None


def with_input_spec(loaded: LoadedModel, *, size: tuple[int, int] | None = None, mean=None, std=None,
                    bgr: bool | None = None) -> LoadedModel:
    """A copy of `loaded` whose input spec has the given fields overridden (None keeps the model's default)."""
    spec = loaded.input_spec
    spec = InputSpec(height=size[0] if size else spec.height, width=size[1] if size else spec.width,
                     mean=mean if mean is not None else spec.mean, std=std if std is not None else spec.std,
                     bgr=spec.bgr if bgr is None else bgr)
    return replace(loaded, input_spec=spec)
