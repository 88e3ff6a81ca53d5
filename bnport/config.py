"""One definition of the pipeline's settings (key, default, type, help), read by the CLI options of each command and
by `bnport run CONFIG.toml`, so a default lives in one place.

A config file is TOML (read with the standard library's tomllib) with a top-level `out` (the output folder) and
`device`, and the sections `[model]`, `[calibrate]`, `[export]`, `[score]`; `bnport run --print-config` prints a
commented example. Unknown keys and wrong types are one-line errors naming the key; relative paths are taken from
the config file's folder, so a config works from anywhere.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnport.errors import BnportError


@dataclass(frozen=True)
class Setting:
    """One setting: `kind` is "str", "int", "float", "bool", "numbers", "list[str]" or "list[float]"; `path` marks
    values that are file paths (or specs holding one), resolved against the config file's folder."""

    key: str
    default: Any
    kind: str
    help: str
    choices: tuple[str, ...] | None = None
    required: bool = False
    path: bool = False
    minimum: float | None = None
    maximum: float | None = None
    open_minimum: bool = False

    @property
    def option(self) -> str:
        return "--" + self.key.replace("_", "-")


MODEL = (
    Setting("spec", None, "str", "MODEL: a registered name (iresnet50, mobilefacenet...), torchvision:NAME, "
            "path/to/file.py:factory, package.module:factory or a TorchScript file", required=True),
    Setting("weights", None, "str", "state dict (.pt/.pth/.safetensors)", path=True),
    Setting("weights_key", None, "str", "key of the checkpoint dict that holds the state dict"),
    Setting("non_strict", False, "bool", "load weights even if some keys are missing or unexpected"),
    Setting("trust_pickle", False, "bool", "allow full unpickling of the weights file (runs its code)"),
    Setting("input_size", None, "str", "HxW (default: the architecture's, 112x112 for face models)"),
    Setting("mean", None, "numbers", "per-channel mean, one or three numbers (default 127.5)"),
    Setting("std", None, "numbers", "per-channel std, one or three numbers (default 127.5)"),
    Setting("bgr", False, "bool", "the model takes BGR input (default RGB)"),
)
CALIBRATE = (
    Setting("data", None, "str", "calibration images: a folder, list file, train.rec (+.idx) or .bin pack",
            required=True, path=True),
    Setting("noise", [], "list[str]", "noise sources: blur:p=0.05,sigma=3-5 | gauss-append:ratio=0.05,std=1 | "
            "gauss-add:std=0.1 | ood:DIR,ratio=0.05 | fractal:ratio=0.05"),
    Setting("mode", "ema", "str", "ema: BN momentum updates; exact: pooled float64 statistics over all images",
            choices=("ema", "exact")),
    Setting("momentum", None, "float", "BN momentum for --mode ema only, in (0, 1] (default: the model's own)",
            minimum=0.0, maximum=1.0, open_minimum=True),
    Setting("batch_size", 32, "int", "images per batch and process (at least 2)", minimum=2),
    Setting("steps", None, "int", "number of steps (batches per process)", minimum=1),
    Setting("epochs", None, "int", "passes over the data (default 1 when steps is not given)", minimum=1),
    Setting("snapshot_every", None, "int", "steps between snapshots (default: a tenth of the run)", minimum=1),
    Setting("seed", 0, "int", "seed of the batch order and the noise"),
    Setting("workers", 2, "int", "DataLoader workers", minimum=0),
    Setting("strict_data", False, "bool", "stop at the first unreadable image instead of skipping it"),
)
EXPORT = (
    Setting("exporter", "auto", "str", "auto: dynamo, then TorchScript if dynamo fails or fails parity",
            choices=("auto", "dynamo", "torchscript")),
    Setting("opset", None, "int", "ONNX opset (default: the exporter's own)", minimum=7),
    Setting("parity_data", None, "str", "real images for the parity check (default: the run's calibration data)",
            path=True),
    Setting("atol", None, "float", "absolute parity tolerance, a fraction of each output's scale (default 1e-4); 4x "
            "PyTorch float32's own error against float64 is allowed where that is larger", minimum=0.0,
            open_minimum=True),
    Setting("rtol", None, "float", "relative parity tolerance (default 1e-4)", minimum=0.0),
    Setting("min_cos", None, "float", "lowest cosine allowed between an output row and PyTorch's (default 0.99999)"),
    Setting("calib_data", None, "str", "INT8 calibration images (default: the parity data, e.g. the run's "
            "calibration data)", path=True),
    Setting("calib_images", 64, "int", "how many images INT8 fits its ranges to (others judge the result)",
            minimum=2),
    Setting("calib_method", "minmax", "str", "INT8 activation-range calibration",
            choices=("minmax", "entropy", "percentile")),
    Setting("precision_min_cos", None, "float", "lowest row cosine a lower-precision file may have against its "
            "float32 file (default 0.9999 fp16, 0.99 int8)"),
)
SCORE = (
    Setting("bench", [], "list[str]", "benchmarks: PATH.bin | ijbc:DIR | ijbb:DIR | pairs:FILE.csv | folder:DIR",
            required=True, path=True),
    Setting("fpr", None, "list[float]", "FPR targets (default 1e-6 ... 1e-1)"),
    Setting("select", "tpr@1e-4", "str", "selection rule: tpr@1e-4 | strict:tpr@1e-5 | insightface:tpr@1e-6 | acc, "
            "optionally ,bench=NAME"),
    Setting("guard", None, "float", "no other FPR may fall more than this many points below the baseline",
            minimum=0.0),
    Setting("bootstrap", 0, "int", "bootstrap replicates for percentile intervals", minimum=0),
    Setting("batch_size", None, "int", "images per inference batch (default 32 CPU, 256 CUDA)", minimum=1),
    Setting("cache_dir", None, "str", "decoded-image cache (default $BNPORT_CACHE_DIR or ~/.cache/bnport)",
            path=True),
    Setting("workers", None, "int", "decode processes (default: up to 8)", minimum=0),
    Setting("precision", ["fp32"], "list[str]", "precisions to score (fp32, fp16, int8); float32 is always scored"),
    Setting("max_drop", 0.2, "float", "a lower precision ships when faster and at most this many points below "
            "float32 at the selection rule's figure", minimum=0.0),
)
TOP = (
    Setting("out", None, "str", "output folder: the run, its score/ and handoff/", required=True, path=True),
    Setting("device", "auto", "str", "auto = CUDA if it really works, else CPU", choices=("auto", "cpu", "cuda")),
)
SECTIONS: dict[str, tuple[Setting, ...]] = {"model": MODEL, "calibrate": CALIBRATE, "export": EXPORT,
                                            "score": SCORE}


def setting(section: str, key: str) -> Setting:
    table = TOP if section == "" else SECTIONS[section]
    return next(s for s in table if s.key == key)


def defaults(section: str) -> dict[str, Any]:
    table = TOP if section == "" else SECTIONS[section]
    return {s.key: (list(s.default) if isinstance(s.default, list) else s.default) for s in table}


def _check(where: str, s: Setting, value: Any) -> Any:
    def wrong(expected: str) -> BnportError:
        return BnportError(f"{where}: expected {expected}, got {type(value).__name__} {value!r}",
                           f"{s.key}: {s.help}")

    if s.kind == "bool":
        if not isinstance(value, bool):
            raise wrong("true or false")
    elif s.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
    elif s.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        value = float(value)
    elif s.kind == "str":
        if not isinstance(value, str):
            raise wrong("a string")
    elif s.kind == "numbers":  # 127.5, [123.7, 116.3, 103.5] or "123.7,116.3,103.5": kept as the CLI's text form
        items = value if isinstance(value, list) else [value]
        if isinstance(value, str):
            items = []
        elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
            raise wrong("a number or a list of numbers")
        value = value if isinstance(value, str) else ",".join(repr(float(v)) for v in items)
    elif s.kind == "list[str]":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong("a list of strings")
    elif s.kind == "list[float]":
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in value):
            raise wrong("a list of numbers")
        value = [float(v) for v in value]
    if s.choices is not None and value not in s.choices:
        raise BnportError(f"{where}: {value!r} is not one of {', '.join(s.choices)}", f"{s.key}: {s.help}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if s.minimum is not None and (value < s.minimum or (s.open_minimum and value == s.minimum)):
            bound = f"above {s.minimum:g}" if s.open_minimum else f"at least {s.minimum:g}"
            raise BnportError(f"{where}: {value!r} is out of range (must be {bound})", f"{s.key}: {s.help}")
        if s.maximum is not None and value > s.maximum:
            raise BnportError(f"{where}: {value!r} is out of range (must be at most {s.maximum:g})",
                              f"{s.key}: {s.help}")
    return value


def _resolve_path(value: str, base: Path) -> str:
    """A relative path (or the path part of a `kind:PATH,options` spec) made absolute against `base`."""
    prefix, sep, rest = value.partition(":")
    if sep and len(prefix) > 1 and prefix.isalpha():  # ijbc:DIR, pairs:FILE, folder:DIR (not C:\\...)
        return f"{prefix}:{_resolve_path(rest, base)}"
    path_text, comma, options = value.partition(",")
    path = Path(path_text).expanduser()
    return str(path if path.is_absolute() else (base / path)) + comma + options


def _resolve_model_spec(spec: str, base: Path) -> str:
    """A MODEL spec naming a file (file.py:factory, a TorchScript file) relative to the config's folder is made
    absolute; registry names, torchvision:NAME and module:factory are left as they are."""
    target, sep, name = spec.rpartition(":")
    if sep and target.endswith(".py") and not Path(target).is_absolute():
        return f"{base / target}:{name}"
    if not sep and (base / spec).is_file():
        return str(base / spec)
    return spec


def _resolve_noise(spec: str, base: Path) -> str:
    """ood:DIR,ratio=... takes DIR from the config's folder; other noise specs hold no path."""
    kind, sep, rest = spec.partition(":")
    return f"{kind}:{_resolve_path(rest, base)}" if kind.strip().lower() == "ood" and sep else spec


@dataclass
class PipelineConfig:
    """A checked config: `out`, `device` and one dict per section, every key present (defaults filled in)."""

    out: Path
    device: str
    model: dict[str, Any]
    calibrate: dict[str, Any]
    export: dict[str, Any]
    score: dict[str, Any]
    source: Path | None = None

    def to_dict(self) -> dict:
        return {"out": str(self.out), "device": self.device, "model": self.model, "calibrate": self.calibrate,
                "export": self.export, "score": self.score}


def parse_config(data: dict, *, base: Path, source: Path | None = None) -> PipelineConfig:
    """Check a config dict (as read from TOML) and fill in defaults; paths are resolved against `base`."""
    where_file = str(source) if source else "config"
    values: dict[str, dict] = {}
    for key in data:
        if key not in SECTIONS and key not in {s.key for s in TOP}:
            known = ", ".join([s.key for s in TOP] + [f"[{k}]" for k in SECTIONS])
            raise BnportError(f"{where_file}: unknown key {key!r}", f"top-level keys are {known}")
    for section, table in [("", TOP), *SECTIONS.items()]:
        given = data if section == "" else data.get(section, {})
        if section and not isinstance(given, dict):
            raise BnportError(f"{where_file}: {section} must be a table [{section}]", "see bnport run --print-config")
        out = defaults(section)
        names = {s.key for s in table}
        for key, value in given.items():
            if section == "" and key in SECTIONS:
                continue
            where = f"{where_file}: {section + '.' if section else ''}{key}"
            if key not in names:
                place = f"[{section}]" if section else "the top level"
                raise BnportError(f"{where_file}: unknown key {key!r} in {place}",
                                  f"known keys there: {', '.join(sorted(names))}")
            s = next(s for s in table if s.key == key)
            value = _check(where, s, value)
            if (section, key) == ("model", "spec"):
                value = _resolve_model_spec(value, base)
            elif (section, key) == ("calibrate", "noise"):
                value = [_resolve_noise(v, base) for v in value]
            elif s.path and value is not None:
                value = [_resolve_path(v, base) for v in value] if isinstance(value, list) else \
                    _resolve_path(value, base)
            out[key] = value
        for s in table:
            if s.required and (out[s.key] is None or out[s.key] == []):
                name = f"{section}.{s.key}" if section else s.key
                raise BnportError(f"{where_file}: {name} is required", f"{s.key}: {s.help}")
        values[section] = out
    top = values.pop("")
    return PipelineConfig(out=Path(top["out"]), device=top["device"], source=source, **values)


def load_config(path: str | Path) -> PipelineConfig:
    """Read and check a TOML config file."""
    path = Path(path)
    if not path.is_file():
        raise BnportError(f"config file not found: {path}", "write one with bnport run --print-config > run.toml")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BnportError(f"{path} is not valid TOML: {e}", "check the syntax (strings in quotes, [sections])") \
            from None
    return parse_config(data, base=path.resolve().parent, source=path)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


EXAMPLE_VALUES = {
    "": {"out": "runs/r50"},
    "model": {"spec": "iresnet50", "weights": "backbone.pth"},
    "calibrate": {"data": "faces_emore/", "noise": ["blur:p=0.05,sigma=3-5", "fractal:ratio=0.05"],
                  "mode": "ema", "steps": 2000, "snapshot_every": 200, "batch_size": 128},
    "score": {"bench": ["lfw.bin", "cfp_fp.bin", "ijbc:IJB_release/IJBC"], "select": "tpr@1e-4,bench=IJBC",
              "guard": 0.1},
}


def example_config() -> str:
    """A commented example config: every key with its help; keys left at their default are commented out."""
    lines = ["# bnport run CONFIG.toml: calibrate -> export every snapshot behind the parity gate -> score -> select",
             "# -> handoff bundle -> report. Relative paths are taken from this file's folder. Run it again to",
             "# resume where it stopped.", ""]

    def block(section: str, table: tuple[Setting, ...]) -> None:
        if section:
            lines.extend(["", f"[{section}]"])
        examples = EXAMPLE_VALUES.get(section, {})
        for s in table:
            lines.append(f"# {s.help}" + (f" ({', '.join(s.choices)})" if s.choices else "")
                         + (" [required]" if s.required else ""))
            if s.key in examples:
                lines.append(f"{s.key} = {_toml_value(examples[s.key])}")
            else:
                default = "(unset)" if s.default is None else _toml_value(s.default)
                lines.append(f"# {s.key} = {default}")

    block("", TOP)
    for section, table in SECTIONS.items():
        block(section, table)
    return "\n".join(lines) + "\n"
