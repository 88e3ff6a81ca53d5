"""`bnport run CONFIG.toml`: the TOML file that holds a whole pipeline, read with the standard library's tomllib.

It has a top-level `out` (the output folder) and `device`, and the sections `[model]` (the MODEL spec and its
`ModelOptions`), `[calibrate]` (`data` and `CalibrationSettings`), `[export]` (`ExportSettings` and
`PrecisionSettings`) and `[score]` (`ScoreSettings`). Every key is the declared setting of those groups (bnport.options:
one definition of each default, type and range, shared with the CLI); this module only maps sections onto groups,
resolves relative paths against the config file's folder (so a config works from anywhere) and names unknown keys.
`bnport run --print-config` prints a commented example.
"""
from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bnport.calibrate.settings import DATA, CalibrationSettings
from bnport.errors import BnportError
from bnport.export.settings import ExportSettings, PrecisionSettings
from bnport.model.options import SPEC, ModelOptions
from bnport.options import Setting, check_value
from bnport.runtime.sessions import DEVICE_CHOICES
from bnport.score.select import confident_by_default
from bnport.score.settings import ScoreSettings

TOP = (
    Setting("out", None, "str", "output folder: the run, its score/ and handoff/", required=True, path=True),
    Setting("device", "auto", "str", "auto = CUDA if it really works, else CPU", choices=DEVICE_CHOICES),
)
# each section's keys: the settings of its groups, plus what the section alone has (the MODEL spec, the data)
GROUPS: dict[str, tuple] = {"model": (ModelOptions,), "calibrate": (CalibrationSettings,),
                            "export": (ExportSettings, PrecisionSettings), "score": (ScoreSettings,)}
SECTIONS: dict[str, tuple[Setting, ...]] = {
    "model": (SPEC, *ModelOptions.SETTINGS), "calibrate": (DATA, *CalibrationSettings.SETTINGS),
    "export": (*ExportSettings.SETTINGS, *PrecisionSettings.SETTINGS), "score": ScoreSettings.SETTINGS}


def setting(section: str, key: str) -> Setting:
    table = TOP if section == "" else SECTIONS[section]
    return next(s for s in table if s.key == key)


def defaults(section: str) -> dict[str, Any]:
    table = TOP if section == "" else SECTIONS[section]
    return {s.key: (list(s.default) if isinstance(s.default, list) else s.default) for s in table}


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


RECIPE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")


@dataclass(frozen=True)
class Recipe:
    """One calibration of a multi-recipe run (`[[calibrate.recipe]]`): its `name` (its run folder is
    OUT/recipes/NAME), its calibration `data` and settings: the [calibrate] section's, overridden by the recipe's."""

    name: str
    data: str
    calibrate: CalibrationSettings


@dataclass
class PipelineConfig:
    """A checked config: where it writes (`out`), the `device`, the MODEL `spec` and its `model` options, the
    calibration `data` and settings, and the export, precision and score settings."""

    out: Path
    device: str
    spec: str
    model: ModelOptions
    data: str
    calibrate: CalibrationSettings
    export: ExportSettings
    precision: PrecisionSettings
    score: ScoreSettings
    source: Path | None = None
    recipes: tuple[Recipe, ...] = ()


def _section(data: dict, section: str, table: tuple[Setting, ...], *, base: Path, where_file: str) -> dict:
    """One section's values: keys known, types checked, paths resolved against `base`, required ones present."""
    given = data if section == "" else data.get(section, {})
    if section and not isinstance(given, dict):
        raise BnportError(f"{where_file}: {section} must be a table [{section}]", "see bnport run --print-config")
    known = {s.key: s for s in table}
    values: dict[str, Any] = {}
    for key, value in given.items():
        if section == "" and key in SECTIONS:
            continue
        if key not in known:
            place = f"[{section}]" if section else "the top level"
            raise BnportError(f"{where_file}: unknown key {key!r} in {place}",
                              f"known keys there: {', '.join(sorted(known))}")
        s = known[key]
        value = check_value(f"{where_file}: {section + '.' if section else ''}{key}", s, value)
        if (section, key) == ("model", "spec"):
            value = _resolve_model_spec(value, base)
        elif (section, key) == ("calibrate", "noise"):
            value = [_resolve_noise(v, base) for v in value]
        elif s.path and value is not None:
            value = [_resolve_path(v, base) for v in value] if isinstance(value, list) else _resolve_path(value, base)
        values[key] = value
    for s in table:
        if s.required and values.get(s.key) in (None, []):
            name = f"{section}.{s.key}" if section else s.key
            raise BnportError(f"{where_file}: {name} is required", f"{s.key}: {s.help}")
    return values


def parse_config(data: dict, *, base: Path, source: Path | None = None) -> PipelineConfig:
    """Check a config dict (as read from TOML) and build its settings; paths are resolved against `base`."""
    where_file = str(source) if source else "config"
    for key in data:
        if key not in SECTIONS and key not in {s.key for s in TOP}:
            known = ", ".join([s.key for s in TOP] + [f"[{k}]" for k in SECTIONS])
            raise BnportError(f"{where_file}: unknown key {key!r}", f"top-level keys are {known}")
    top = _section(data, "", TOP, base=base, where_file=where_file)
    calibrate = data.get("calibrate", {})
    tables = calibrate.get("recipe", []) if isinstance(calibrate, dict) else []
    if isinstance(calibrate, dict) and "recipe" in calibrate:  # the caller's dict stays as it was
        data = {**data, "calibrate": {k: v for k, v in calibrate.items() if k != "recipe"}}
    values = {section: _section(data, section, table, base=base, where_file=where_file)
              for section, table in SECTIONS.items()}
    recipes = _recipes(tables, values["calibrate"], base=base, where_file=where_file)
    groups = {cls: _group(cls, values[section], where=f"{where_file}: {section}.")
              for section, classes in GROUPS.items() for cls in classes}
    # a run selects by a win that is more than noise unless its rule says otherwise (,confident=off)
    score = replace(groups[ScoreSettings], rule=confident_by_default(groups[ScoreSettings].rule))
    return PipelineConfig(out=Path(top["out"]), device=top.get("device", "auto"), spec=values["model"]["spec"],
                          model=groups[ModelOptions], data=values["calibrate"]["data"],
                          calibrate=groups[CalibrationSettings], export=groups[ExportSettings],
                          precision=groups[PrecisionSettings], score=score, source=source, recipes=recipes)


def _group(cls, values: dict, *, where: str):
    """The settings group `cls` built from a section's checked `values` (the keys that are its own)."""
    keys = {s.key for s in cls.SETTINGS}
    return cls.from_values({k: v for k, v in values.items() if k in keys}, where=where)


def _recipes(tables, shared: dict, *, base: Path, where_file: str) -> tuple[Recipe, ...]:
    """`[[calibrate.recipe]]` tables -> Recipes: each a name and any [calibrate] keys, which override the section's."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise BnportError(f"{where_file}: calibrate.recipe must be a list of tables", "write each as "
                          "[[calibrate.recipe]] with a name and the [calibrate] keys it changes")
    table = tuple(dataclasses.replace(s, required=False) for s in SECTIONS["calibrate"])
    recipes, names = [], set()
    for number, given in enumerate(tables, 1):
        name = given.get("name")
        if not isinstance(name, str) or not RECIPE_NAME.match(name) or name in names:
            raise BnportError(f"{where_file}: recipe {number} needs a unique name of letters, digits, '.', '_' or "
                              f"'-' (got {name!r})", 'e.g. name = "blur"')
        names.add(name)
        own = _section({"calibrate": {k: v for k, v in given.items() if k != "name"}}, "calibrate", table,
                       base=base, where_file=f"{where_file}: recipe {name!r}")
        merged = {**shared, **own}
        # a recipe that changes the mode leaves behind the section's keys that mode refuses, unless it sets them
        if own.get("mode", "ema") != "ema" and "momentum" not in own:
            merged.pop("momentum", None)
        if own.get("mode") == "sequential" and "snapshot_every" not in own:
            merged.pop("snapshot_every", None)
        settings = _group(CalibrationSettings, merged, where=f"{where_file}: recipe {name!r}: calibrate.")
        recipes.append(Recipe(name, merged["data"], settings))
    return tuple(recipes)


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


RECIPE_EXAMPLE = [
    "", "# To compare calibration recipes in one run, add [[calibrate.recipe]] tables: each a name and the [calibrate]",
    "# keys it changes. Each recipe is calibrated into OUT/recipes/NAME (resumed per recipe); every snapshot of every",
    "# recipe and the shared baseline are scored in one table with a recipe column, and one selection picks across",
    "# them.",
    "# [[calibrate.recipe]]", '# name = "blur"', '# noise = ["blur:p=0.05,sigma=3-5"]',
    "# [[calibrate.recipe]]", '# name = "noise-images"', '# noise = ["gauss-append:ratio=0.05,std=1"]',
    "# [[calibrate.recipe]]", '# name = "sequential"', '# mode = "sequential"']


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
        if section == "calibrate":
            lines.extend(RECIPE_EXAMPLE)
    return "\n".join(lines) + "\n"
