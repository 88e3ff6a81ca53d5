"""`ExportSettings` (how a model becomes a verified ONNX file: the fold, the exporter, the parity gate) and
`PrecisionSettings` (how a lower-precision file is made from it and judged). Declared once; `bnport export` and
`bnport score` take their options from here, as does the `[export]` table of `bnport run`. `PRECISIONS` and
`parse_precisions` are the one home of which precisions exist.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from bnport.errors import BnportError
from bnport.options import Setting, SettingsGroup

EXPORTERS = ("auto", "dynamo", "torchscript")
PRECISIONS = ("fp32", "fp16", "int8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


def check_precision(precision: str) -> str:
    """`precision` itself, or an error naming the ones that exist."""
    if precision not in PRECISIONS:
        raise BnportError(f"unknown precision {precision!r}", f"use one of {', '.join(PRECISIONS)}")
    return precision


def parse_precisions(precisions: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """"fp32,int8" or a list -> the precisions to score, float32 first (always scored: the others are judged against
    it); None -> fp32 only."""
    if precisions is None:
        return ["fp32"]
    items = [p.strip().lower() for text in ([precisions] if isinstance(precisions, str) else precisions)
             for p in text.split(",") if p.strip()]
    for item in items:
        check_precision(item)
    return ["fp32", *[p for p in dict.fromkeys(items) if p != "fp32"]]


@dataclass(frozen=True)
class ExportSettings(SettingsGroup):
    """`exporter`: "auto" (dynamo, then TorchScript if dynamo fails or fails parity), "dynamo" or "torchscript";
    `opset` None: the exporter's own (TorchScript: 17); `parity_data`: a data SRC of real images for the gate (None:
    a snapshot's calibration data, else noise only), `parity_limit` of them; `atol` (x output scale), `rtol`,
    `min_cos` None: bnport.export.parity's defaults; `fold_bn`: fold every BatchNorm that folds exactly;
    `static_batch`: batch fixed at 1; `simplify`: run onnxsim; `threads`: intra-op threads of the gate (None: each
    library's default)."""

    exporter: str = "auto"
    opset: int | None = None
    parity_data: str | None = None
    atol: float | None = None
    rtol: float | None = None
    min_cos: float | None = None
    fold_bn: bool = True
    static_batch: bool = False
    simplify: bool = True
    parity_limit: int = 16
    threads: int | None = None

    SETTINGS: ClassVar[tuple[Setting, ...]] = (
        Setting("exporter", "auto", "str", "auto: dynamo, then TorchScript if dynamo fails or fails parity",
                choices=EXPORTERS),
        Setting("opset", None, "int", "ONNX opset (default: the exporter's own)", minimum=7),
        Setting("parity_data", None, "str", "real images for the parity check (default: the run's calibration data)",
                path=True),
        Setting("atol", None, "float", "absolute parity tolerance, a fraction of each output's scale (default 1e-4); "
                "4x PyTorch float32's own error against float64 is allowed where that is larger", minimum=0.0,
                open_minimum=True),
        Setting("rtol", None, "float", "relative parity tolerance (default 1e-4)", minimum=0.0),
        Setting("min_cos", None, "float", "lowest cosine allowed between an output row and PyTorch's (default "
                "0.99999)", minimum=-1.0, maximum=1.0),
    )

    def __post_init__(self) -> None:
        if self.exporter not in EXPORTERS:
            raise BnportError(f"unknown exporter {self.exporter!r}", "use --exporter auto, dynamo or torchscript")

    def key_dict(self) -> dict:
        """What makes two exports differ, for cache keys."""
        return {"exporter": self.exporter, "opset": self.opset, "atol": self.atol, "rtol": self.rtol,
                "min_cos": self.min_cos, "parity_data": self.parity_data}

    def tolerances(self) -> dict[str, Any]:
        return {"atol": self.atol, "rtol": self.rtol, "min_cos": self.min_cos}


@dataclass(frozen=True)
class PrecisionSettings(SettingsGroup):
    """How an FP16 or INT8 file is made from a verified float32 one: INT8 calibrates on `calib_images` images of
    `calib_data` (None: the parity data, e.g. the run's calibration data) with `calib_method`; `min_cos` is the row
    cosine a converted file must keep against its float32 file (None: 0.9999 fp16, 0.99 int8)."""

    calib_data: str | None = None
    calib_images: int = 64
    calib_method: str = "minmax"
    min_cos: float | None = None

    SETTINGS: ClassVar[tuple[Setting, ...]] = (
        Setting("calib_data", None, "str", "INT8 calibration images (default: the parity data, e.g. the run's "
                "calibration data)", path=True),
        Setting("calib_images", 64, "int", "how many images INT8 fits its ranges to (others judge the result)",
                minimum=2),
        Setting("calib_method", "minmax", "str", "INT8 activation-range calibration", choices=CALIBRATION_METHODS),
        Setting("precision_min_cos", None, "float", "lowest row cosine a lower-precision file may have against its "
                "float32 file (default 0.9999 fp16, 0.99 int8)", minimum=-1.0, maximum=1.0),
    )

    def __post_init__(self) -> None:
        if self.calib_method not in CALIBRATION_METHODS:
            raise BnportError(f"unknown calibration method {self.calib_method!r}",
                              f"use one of {', '.join(CALIBRATION_METHODS)}")

    @classmethod
    def _convert(cls, values: dict[str, Any]) -> dict[str, Any]:
        out = dict(values)
        if "precision_min_cos" in out:
            out["min_cos"] = out.pop("precision_min_cos")
        return out
