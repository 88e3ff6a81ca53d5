"""What an export produced and how it is written: `ExportReport` (the fold counts, the exporter tried, the parity
figures, the file), the metadata_props a verified file carries, and the one rule for writing a gated file: a file
that passed its gate is written as OUT.onnx (stale rejected files removed), one that failed only as
OUT.onnx.rejected with its report as OUT.onnx.rejected.json. Every write is atomic. Used by the float32 export, the
graph reused for later snapshots and the lower-precision files alike.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bnport import __version__
from bnport.atomic import atomic_write_bytes
from bnport.data.transforms import InputSpec
from bnport.export.parity import ParityResult

INPUT_NAME = "data"
PARITY_INPUTS_REAL = "real images and noise"
PARITY_INPUTS_NOISE = "noise only"
NOISE_ONLY_WARNING = "parity is checked on noise inputs only (no real images): pass --parity-data SRC with images " \
                     "like the model's to check it on real data"


@dataclass
class ExportAttempt:
    """One exporter's try: `ok` when its file passed every check; `note` says what happened."""

    exporter: str
    ok: bool
    note: str
    seconds: float


@dataclass
class RemainingBn:
    """A BatchNorm that was not folded: `where` is "pytorch" (kept by the torch fold) or "onnx" (a node in the file)."""

    where: str
    name: str
    reason: str


@dataclass
class ExportReport:
    """What `export_onnx` did; truthy when a parity-verified file was written to `output`.

    `target` is the path asked for; `output` is it once written, `rejected` the OUT.onnx.rejected written instead.
    `bn_before` counts BatchNorm modules in the model, `bn_torch_after` those left by the PyTorch fold, `bn_onnx`
    the BatchNormalization nodes in the file; `remaining` says why each kept one was kept. `parity` judges the file
    written; `parity_other` the other graph checked, when onnxsim changed the verdict. `parity_inputs` is "real
    images and noise" or "noise only". `runtime` names the onnxruntime providers that ran the check. `timings` are
    seconds per stage.
    """

    passed: bool
    target: str
    output: str | None
    rejected: str | None
    exporter: str | None
    exporter_note: str
    attempts: list[ExportAttempt]
    opset: int | None
    dynamic_batch: bool
    input_name: str
    output_names: list[str]
    simplified: bool
    simplify_note: str
    fold_bn: bool
    bn_before: int
    bn_torch_after: int
    bn_onnx: int | None
    remaining: list[RemainingBn]
    parity: ParityResult | None
    parity_other: ParityResult | None
    sha256: str | None
    metadata: dict[str, str]
    timings: dict[str, float]
    runtime: str = ""
    torch_fold: dict | None = None
    onnx_fold: dict | None = None
    source: dict = field(default_factory=dict)
    precision: dict | None = None
    parity_inputs: str = PARITY_INPUTS_REAL

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        d = asdict(self)
        d["parity"] = self.parity.to_dict() if self.parity is not None else None
        d["parity_other"] = self.parity_other.to_dict() if self.parity_other is not None else None
        return d

    def __str__(self) -> str:
        lines = []
        if self.passed:
            lines.append(f"wrote {self.output} (sha256 {self.sha256[:16]}...), exporter {self.exporter}, "
                         f"opset {self.opset}, {'dynamic' if self.dynamic_batch else 'static'} batch")
        else:
            where = f"; rejected file at {self.rejected}" if self.rejected else ""
            stale = f" (an older {self.target} was left as it was)" if Path(self.target).exists() else ""
            lines.append(f"export FAILED: no ONNX file written{stale}{where}")
        lines.append(f"exporter: {self.exporter_note}")
        lines += [f"  {a.exporter}: {'ok' if a.ok else 'failed'} in {a.seconds:.1f}s ({a.note})" for a in self.attempts]
        lines.append(f"simplify: {self.simplify_note}")
        bn_file = "-" if self.bn_onnx is None else str(self.bn_onnx)
        if self.fold_bn:
            lines.append(f"BatchNorm: {self.bn_before} in the model, {self.bn_torch_after} left after the PyTorch "
                         f"fold, {bn_file} BatchNormalization nodes in the file")
        else:
            lines.append(f"BatchNorm: {self.bn_before} in the model, not folded (no --fold-bn), {bn_file} "
                         "BatchNormalization nodes in the file")
        lines += [f"  PyTorch fold kept {r.name}: {r.reason}" for r in self.remaining if r.where == "pytorch"]
        onnx_folds = [d for d in (self.onnx_fold or {}).get("decisions", []) if d["action"] == "fold"]
        if onnx_folds:
            patterns = sorted({d["pattern"] for d in onnx_folds})
            lines.append(f"  ONNX pass folded {len(onnx_folds)} BatchNormalization node(s) the exporter left: "
                         f"{', '.join(patterns)}")
        shift_convs = (self.onnx_fold or {}).get("shift_convs", 0)
        if shift_convs:
            lines.append(f"  {shift_convs} BN shift(s) in front of zero-padded convs (exact there, unlike a bias) "
                         "written as 1x1 depthwise convs")
        lines += [f"  left in the file: {r.name}: {r.reason}" for r in self.remaining if r.where == "onnx"]
        if self.runtime:
            lines.append(self.runtime)
        if self.parity_inputs == PARITY_INPUTS_NOISE:
            lines.append(f"warning: {NOISE_ONLY_WARNING}")
        if self.parity is not None:
            lines.append(str(self.parity))
        if self.parity_other is not None and self.parity_other is not self.parity:
            lines.append(str(self.parity_other))
        if self.precision is not None:
            lines += self.precision["text"]
        lines.append("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()))
        return "\n".join(lines)


@dataclass
class ExportedFile:
    """A file made for scoring (bnport.export.cached): `onnx` is the verified file (None when its gate failed: then
    `passed` is False and `failure` says why); `how` says where it came from ("full export", "graph reused",
    "cached ...", "export", "INT8 static QDQ", "float16"); `parity` is its gate's record; `report` what the export
    wrote beside it; `provenance` what it was made from."""

    onnx: Path | None
    passed: bool
    how: str
    parity: dict | None = None
    failure: str = ""
    report: dict = field(default_factory=dict)
    sha256: str | None = None
    provenance: dict = field(default_factory=dict)
    seconds: float = 0.0


def verdict(parity: dict | None) -> str:
    """Why a gate failed, from its record ("" without one)."""
    if not parity:
        return ""
    return "; ".join(parity.get("failures") or []) or "parity failed"


def parity_props(parity: ParityResult | None) -> dict[str, str]:
    """The metadata_props that carry a file's parity record: the figures, whether real images were among the
    inputs, and the bound that decided."""
    if parity is None:
        return {"parity": json.dumps(None), "parity_bound": "not reached"}
    return {"parity": json.dumps(parity.to_dict()), "parity_bound": parity.bound_text,
            "parity_inputs": PARITY_INPUTS_NOISE if parity.noise_only else PARITY_INPUTS_REAL}


def stamp(model, props: dict[str, str | None]) -> None:
    """Add `props` (None values left out) to `model`'s metadata_props, keeping the others."""
    import onnx

    merged = {p.key: p.value for p in model.metadata_props}
    merged.update({k: v for k, v in props.items() if v is not None})
    onnx.helper.set_model_props(model, merged)


def write_or_reject(out: Path, data: bytes, *, passed: bool, report: dict | None = None) -> Path:
    """Write a gated file: OUT.onnx when it `passed` (a stale OUT.onnx.rejected and its .json removed), else
    OUT.onnx.rejected with `report` beside it as OUT.onnx.rejected.json. Returns the path written."""
    out = Path(out)
    rejected = out.with_name(out.name + ".rejected")
    rejected_json = out.with_name(out.name + ".rejected.json")
    if passed:
        atomic_write_bytes(out, data)
        rejected.unlink(missing_ok=True)
        rejected_json.unlink(missing_ok=True)
        return out
    atomic_write_bytes(rejected, data)
    if report is not None:
        atomic_write_bytes(rejected_json, (json.dumps(report, indent=1, default=str) + "\n").encode())
    return rejected


def write_export(model, out: Path, report: ExportReport, *, spec: InputSpec, metadata: dict[str, str]) -> None:
    """Stamp the export's metadata_props (version, input spec and name, parity, fold summary, `metadata`) and write
    OUT.onnx or OUT.onnx.rejected (write_or_reject); `report` learns the file, its sha256 and its props."""
    stamp(model, {"bnport_version": __version__, "input_spec": json.dumps(spec.to_dict()),
                  "input_name": report.input_name, **parity_props(report.parity),
                  "parity_inputs": report.parity_inputs,
                  "fold": json.dumps({"fold_bn": report.fold_bn, "bn_before": report.bn_before,
                                      "bn_torch_after": report.bn_torch_after, "bn_onnx": report.bn_onnx,
                                      "exporter": report.exporter, "simplified": report.simplified,
                                      "remaining": [asdict(r) for r in report.remaining]}),
                  **metadata})
    report.metadata = {p.key: p.value for p in model.metadata_props}
    data = model.SerializeToString()
    report.sha256 = hashlib.sha256(data).hexdigest()
    written = write_or_reject(out, data, passed=report.passed, report=None if report.passed else report.to_dict())
    if report.passed:
        report.output = str(written)
    else:
        report.rejected = str(written)
