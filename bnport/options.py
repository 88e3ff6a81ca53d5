"""Option groups, declared once: each settings object of a stage (`ModelOptions`, `CalibrationSettings`,
`ExportSettings`, `PrecisionSettings`, `ScoreSettings`) lists its `Setting`s (key, default, type, range, help), and
both the command line (`bnport.cli`) and the TOML loader (`bnport.config`) build it through `from_values`, which
checks every value against its declaration and then the group's own rules, once. A default, a range or a rule
therefore lives in one place, as Polygraphy's argument groups do. Core: imports nothing of bnport's stages.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from bnport.errors import BnportError


@dataclass(frozen=True)
class Setting:
    """One setting: `kind` is "str", "int", "float", "bool", "numbers", "list[str]" or "list[float]"; `path` marks
    values that are file paths (or specs holding one), resolved against a config file's folder; `field` names the
    settings object's attribute when it differs from `key`."""

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


def check_value(where: str, s: Setting, value: Any) -> Any:
    """`value` checked against `s` (type, choices, range) and normalised (ints to floats, one string to a list, numbers
    to their text form); a BnportError naming `where` otherwise."""
    def wrong(expected: str) -> BnportError:
        return BnportError(f"{where}: expected {expected}, got {type(value).__name__} {value!r}", f"{s.key}: {s.help}")

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
        if isinstance(value, (str, tuple)):
            value = [value] if isinstance(value, str) else list(value)
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


class SettingsGroup:
    """Base of a settings dataclass whose declared `SETTINGS` map onto its fields of the same names. `from_values`
    takes the values as given (a TOML table, the CLI's parsed options), leaves out None (the default), checks each
    against its declaration, turns the text forms into typed values (`_convert`) and builds the object, whose own
    `__post_init__` checks the rules that tie settings together."""

    SETTINGS: ClassVar[tuple[Setting, ...]] = ()

    @classmethod
    def setting(cls, key: str) -> Setting:
        return next(s for s in cls.SETTINGS if s.key == key)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {s.key: (list(s.default) if isinstance(s.default, list) else s.default) for s in cls.SETTINGS}

    @classmethod
    def from_values(cls, values: Mapping[str, Any], *, where: str = "") -> "SettingsGroup":
        """The group from `values` keyed by setting key; unknown keys are an error, None means the default."""
        known = {s.key: s for s in cls.SETTINGS}
        checked: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                raise BnportError(f"{where}unknown setting {key!r}", f"known: {', '.join(sorted(known))}")
            if value is None:
                continue
            checked[key] = check_value(f"{where}{key}", known[key], value)
        names = {f.name for f in fields(cls)}
        converted = cls._convert(checked)
        return cls(**{k: v for k, v in converted.items() if k in names})

    @classmethod
    def _convert(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Text forms to typed values (a group overrides this where it has any)."""
        return values
