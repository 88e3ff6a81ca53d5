"""ONNX export behind a parity gate: fold BatchNorm, export, fold again on the graph, simplify, prove parity, write.

`export_model` takes a MODEL spec or a snapshot path; `export_onnx` does the work on a module. The module is folded
in PyTorch (`bnport.export.fold_torch`), exported with the dynamo exporter (TorchScript as fallback or on request), folded again on
the ONNX graph (`bnport.export.fold_onnx`), simplified with onnxsim, folded once more, checked with `onnx.checker` and
compared with the original unfolded module on onnxruntime (`bnport.export.parity`). The file written is the one that passed
parity; if onnxsim breaks parity the unsimplified graph is checked and used instead, and the report says so. A file
that fails parity is written only as OUT.onnx.rejected, with its report beside it as OUT.onnx.rejected.json. Every
write is atomic. metadata_props carry the provenance, the input spec, the parity figures (with the bound that decided
and whether real images were among the inputs) and the fold summary.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from bnport import __version__
from bnport.data.transforms import InputSpec
from bnport.atomic import atomic_write_bytes
from bnport.errors import BnportError
from bnport.export.parity import ParityReference, ParityResult, build_parity_inputs

EXPORTERS = ("auto", "dynamo", "torchscript")
TORCHSCRIPT_DEFAULT_OPSET = 17
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


def _first_line(err: BaseException) -> str:
    """'Type: first line' of an exception, plus its root cause's (exporters wrap the informative error)."""
    def line(e: BaseException) -> str:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
        return f"{type(e).__name__}: {text[0] if text else ''}"

    root = err
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    summary = line(err) if root is err else f"{line(err)} (cause: {line(root)})"
    return summary[:400]


def _example_input(spec: InputSpec, batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, spec.height, spec.width, generator=torch.Generator().manual_seed(0))


def _export_dynamo(module: nn.Module, x: torch.Tensor, *, opset: int | None, dynamic: bool, output_names: list[str]):
    import onnx

    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    program = torch.onnx.export(module, (x,), dynamo=True, verbose=False, input_names=[INPUT_NAME],
                                output_names=output_names, opset_version=opset, dynamic_shapes=dynamic_shapes)
    model = program.model_proto
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _export_torchscript(module: nn.Module, x: torch.Tensor, *, opset: int | None, dynamic: bool,
                        output_names: list[str]):
    import onnx

    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in [INPUT_NAME, *output_names]} if dynamic else None
    torch.onnx.export(module, (x,), buffer, dynamo=False, input_names=[INPUT_NAME], output_names=output_names,
                      opset_version=opset or TORCHSCRIPT_DEFAULT_OPSET, dynamic_axes=axes, do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())


def _opset(model) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _simplify(model):
    """onnxsim, or (None, why) when it fails or its own check does not pass."""
    import onnxsim

    try:
        simplified, ok = onnxsim.simplify(model)
    except Exception as err:  # noqa: BLE001 - onnxsim raises whatever its passes raise; the unsimplified file stands
        return None, f"onnxsim failed ({_first_line(err)}); file left unsimplified"
    if not ok:
        return None, "onnxsim's own check failed; file left unsimplified"
    return simplified, ""


def _fold_graph(model, *, fold_bn: bool):
    """The ONNX-graph fold when folding; returns (model, fold summary or None)."""
    from bnport.export.fold_onnx import fold_onnx_bn

    return fold_onnx_bn(model) if fold_bn else (model, None)


def _output_names(count: int) -> list[str]:
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


@dataclass
class _TorchFold:
    module: nn.Module
    bn_after: int
    summary: dict | None
    remaining: list[RemainingBn]


def _fold_in_torch(module: nn.Module, x: torch.Tensor) -> _TorchFold:
    """bnport.export.fold_torch on `module` (left unchanged); the plan, a second trace, is only made to explain BNs that stayed."""
    from bnport.export.fold_torch import count_bn, fold_bn, plan_folds

    # the fold needs tensor ranks from its example input, so one image is enough
    folded = fold_bn(module, example_input=x[:1])
    bn_after = count_bn(folded)
    if not bn_after:
        return _TorchFold(folded, 0, {"traced": True, "n_fold": count_bn(module), "n_keep": 0, "decisions": []}, [])
    plan = plan_folds(module, example_input=x[:1])
    remaining = [RemainingBn("pytorch", d.bn, d.reason) for d in plan.decisions if d.action == "keep"]
    return _TorchFold(folded, bn_after, plan.to_dict(), remaining)


class _Gate:
    """Parity of candidate graphs against one reference, with the session description and time it took."""

    def __init__(self, reference: ParityReference, *, device: str, atol, rtol, min_cos, timings: dict,
                 threads: int | None = None):
        self.reference, self.device, self.timings, self.threads = reference, device, timings, threads
        self.tolerances = {"atol": atol, "rtol": rtol, "min_cos": min_cos}
        self.runtime = ""

    def judge(self, model, label: str) -> ParityResult:
        """onnx.checker, then parity on onnxruntime; a graph the checker refuses raises (the attempt fails)."""
        import onnx

        from bnport.runtime.sessions import GATE, create_session

        began = time.perf_counter()
        data = model.SerializeToString()
        onnx.checker.check_model(data)
        session = create_session(data, device=self.device, threads=self.threads, use=GATE)
        self.runtime = session.describe()
        with torch_threads(self.threads):
            result = self.reference.compare(session, label=label, **self.tolerances)
        self.timings["parity"] = self.timings.get("parity", 0.0) + time.perf_counter() - began
        return result


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """PyTorch's intra-op thread count set to `threads` for the duration (None: left as it is)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class _Candidate:
    """One exporter's graph after folding, simplification and the parity gate."""

    model: object
    simplified: bool
    simplify_note: str
    onnx_fold: dict | None
    parity: ParityResult
    parity_other: ParityResult | None = None


def export_onnx(module: nn.Module, out: str | os.PathLike, *, input_spec: InputSpec | None = None,
                fold_bn: bool = True, exporter: str = "auto", opset: int | None = None, static_batch: bool = False,
                simplify: bool = True, parity_images: torch.Tensor | None = None, atol: float | None = None,
                rtol: float | None = None, min_cos: float | None = None, device: str = "auto",
                metadata: dict[str, str] | None = None, source: dict | None = None, threads: int | None = None,
                warn: Callable[[str], None] | None = None) -> ExportReport:
    """Export `module` (left unchanged) to `out` behind the parity gate; see the module docstring.

    `input_spec`: None = InputSpec() (112x112, insightface normalisation). `exporter`: "auto" (dynamo, then
    TorchScript if dynamo fails or fails parity), "dynamo" or "torchscript". `opset`: None = the exporter's default
    (TorchScript: 17). `static_batch`: fix the batch at 1 instead of a dynamic batch dimension. `parity_images`:
    real network inputs (Nx3xHxW) to check on, besides the noise inputs; None = noise inputs only, which the report
    and the card (`parity_inputs`) say. `atol` (x output scale), `rtol`, `min_cos`: None = the bnport.export.parity
    defaults. `device`: onnxruntime device for parity ("auto": CUDA when it really works). `metadata`: extra
    metadata_props; `source`: what the model is (spec, weights, sha256s), for the report. `threads`: intra-op threads
    of the parity check, PyTorch and onnxruntime alike (None: each library's default). `warn`: called with one line
    per thing the user should know before trusting the file (parity on noise only); None = not called.
    """
    from bnport.runtime.device import modes_kept
    from bnport.export.fold_torch import count_bn
    from bnport.export.parity import reference_device
    from bnport.runtime.sessions import resolve_device

    if exporter not in EXPORTERS:
        raise BnportError(f"unknown exporter {exporter!r}", "use --exporter auto, dynamo or torchscript")
    out = Path(out)
    if out.suffix != ".onnx":
        raise BnportError(f"output path {out} does not end in .onnx", "name the output like model.onnx")
    ort_device, _ = resolve_device(device)  # a --device cuda that cannot work fails now, not after the export
    spec = input_spec or InputSpec()
    timings: dict[str, float] = {}
    with modes_kept(module):  # the caller's module keeps its modes; eval for tracing and the reference
        module.eval()
        dynamic = not static_batch
        x = _example_input(spec, 2 if dynamic else 1)

        began = time.perf_counter()
        bn_before = count_bn(module)
        torch_fold = _fold_in_torch(module, x) if fold_bn else _TorchFold(module, bn_before, None, [])
        timings["torch fold"] = time.perf_counter() - began

        began = time.perf_counter()
        inputs, counts = build_parity_inputs(spec, real=parity_images)
        parity_inputs = PARITY_INPUTS_REAL if counts["real"] else PARITY_INPUTS_NOISE
        if parity_inputs == PARITY_INPUTS_NOISE and warn is not None:
            warn(NOISE_ONLY_WARNING)
        reference = ParityReference(module, inputs, counts=counts, batch_sizes=(1, 2, 8) if dynamic else (1,))
        with torch_threads(threads):
            output_names = _output_names(len(reference.outputs(reference_device(ort_device))[0]))
        timings["parity"] = time.perf_counter() - began
        gate = _Gate(reference, device=device, atol=atol, rtol=rtol, min_cos=min_cos, timings=timings, threads=threads)

        attempts: list[ExportAttempt] = []
        passed = failed = None
        for name in (["dynamo", "torchscript"] if exporter == "auto" else [exporter]):
            began = time.perf_counter()
            try:
                # exporters print progress, graph dumps and warnings; what matters goes into the report instead
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                        contextlib.redirect_stderr(io.StringIO()):
                    warnings.simplefilter("ignore")
                    export = _export_dynamo if name == "dynamo" else _export_torchscript
                    raw = export(torch_fold.module, x, opset=opset, dynamic=dynamic, output_names=output_names)
                if opset is not None and _opset(raw) != opset:
                    raise BnportError(f"{name} wrote opset {_opset(raw)}, not the requested {opset}")
                timings[f"export ({name})"] = time.perf_counter() - began
                graph, onnx_summary = _fold_graph(raw, fold_bn=fold_bn)
                candidate = _simplify_and_check(graph, onnx_summary, gate, simplify=simplify, fold_bn=fold_bn)
            except Exception as err:  # noqa: BLE001 - any exporter failure means "try the next one", and is reported
                attempts.append(ExportAttempt(name, False, f"export failed: {_first_line(err)}",
                                              time.perf_counter() - began))
                continue
            ok = bool(candidate.parity)
            note = "parity passed" if ok else "parity failed: " + "; ".join(candidate.parity.failures)
            attempts.append(ExportAttempt(name, ok, note, time.perf_counter() - began))
            if ok:
                passed = (name, candidate)
                break
            failed = (name, candidate)

        name, candidate = passed or failed or (None, None)
        remaining = list(torch_fold.remaining)
        if candidate is not None and candidate.onnx_fold is not None:
            remaining += [RemainingBn("onnx", d["node"], d["reason"]) for d in candidate.onnx_fold["decisions"]
                          if d["action"] == "keep"]
        report = ExportReport(
            passed=passed is not None, target=str(out), output=None, rejected=None, exporter=name,
            exporter_note=_exporter_note(exporter, attempts), attempts=attempts,
            opset=_opset(candidate.model) if candidate is not None else None, dynamic_batch=dynamic,
            input_name=INPUT_NAME, output_names=output_names, simplified=bool(candidate and candidate.simplified),
            simplify_note=candidate.simplify_note if candidate is not None else "not reached", fold_bn=fold_bn,
            bn_before=bn_before, bn_torch_after=torch_fold.bn_after,
            bn_onnx=_count_onnx_bn(candidate.model) if candidate is not None else None, remaining=remaining,
            parity=candidate.parity if candidate is not None else None,
            parity_other=candidate.parity_other if candidate is not None else None, sha256=None, metadata={},
            timings=timings, runtime=gate.runtime, torch_fold=torch_fold.summary,
            onnx_fold=candidate.onnx_fold if candidate is not None else None, source=dict(source or {}),
            parity_inputs=parity_inputs)
        if candidate is not None:
            _write(candidate.model, out, report, spec=spec, metadata=metadata or {})
        return report


def _count_onnx_bn(model) -> int:
    from bnport.export.fold_onnx import count_bn_nodes

    return count_bn_nodes(model)


def _simplify_and_check(graph, onnx_summary, gate: _Gate, *, simplify: bool, fold_bn: bool) -> _Candidate:
    """Simplify, re-fold and judge; fall back to the unsimplified graph when onnxsim breaks parity or fails."""
    summary = onnx_summary.to_dict() if onnx_summary is not None else None
    if not simplify:
        return _Candidate(graph, False, "skipped (--no-simplify)", summary,
                          gate.judge(graph, "exported, not simplified"))
    began = time.perf_counter()
    simplified, why = _simplify(graph)
    again = None
    if simplified is not None:
        simplified, again = _fold_graph(simplified, fold_bn=fold_bn)
    gate.timings["simplify"] = gate.timings.get("simplify", 0.0) + time.perf_counter() - began
    if simplified is None:
        return _Candidate(graph, False, why, summary, gate.judge(graph, "exported, not simplified"))
    merged = _merge_summaries(summary, again.to_dict()) if again is not None and summary is not None else summary
    try:
        parity = gate.judge(simplified, "simplified")
    except Exception as err:  # noqa: BLE001 - a graph onnxsim left invalid is reported, not shipped
        why = f"onnxsim output failed onnx.checker or onnxruntime ({_first_line(err)}); file left unsimplified"
        return _Candidate(graph, False, why, summary, gate.judge(graph, "exported, not simplified"))
    if parity:
        return _Candidate(simplified, True, "onnxsim, parity checked after simplification", merged, parity)
    unsimplified = gate.judge(graph, "exported, not simplified")
    if unsimplified:
        return _Candidate(graph, False, "onnxsim output failed parity; the unsimplified graph passed and was kept",
                          summary, unsimplified, parity_other=parity)
    return _Candidate(simplified, True, "onnxsim; parity failed before and after it", merged, parity,
                      parity_other=unsimplified)


def _merge_summaries(first: dict, second: dict) -> dict:
    """The ONNX fold decisions of the exported graph, then those of the simplified graph's second pass."""
    decisions = [d for d in first["decisions"] if d["action"] == "fold"] + second["decisions"]
    return {"bn_before": first["bn_before"], "bn_after": second["bn_after"],
            "shift_convs": first["shift_convs"] + second["shift_convs"], "decisions": decisions}


def _exporter_note(exporter: str, attempts: list[ExportAttempt]) -> str:
    good = next((a for a in attempts if a.ok), None)
    if exporter != "auto":
        return f"{exporter} (as asked)"
    if good is None:
        return "auto: no exporter produced a file that passed parity"
    if good.exporter == "dynamo":
        return "auto: dynamo (the default) produced a file that passed parity"
    why = "failed to export" if attempts[0].note.startswith("export failed") else "produced a file that failed parity"
    return f"auto: torchscript, because dynamo {why}"


def _write(model, out: Path, report: ExportReport, *, spec: InputSpec, metadata: dict[str, str]) -> None:
    """Stamp metadata_props and write OUT.onnx (passed) or OUT.onnx.rejected + .rejected.json (failed)."""
    import onnx

    props = {p.key: p.value for p in model.metadata_props}
    props.update({
        "bnport_version": __version__,
        "input_spec": json.dumps(spec.to_dict()),
        "input_name": report.input_name,
        "parity": json.dumps(report.parity.to_dict() if report.parity is not None else None),
        "parity_inputs": report.parity_inputs,
        "parity_bound": report.parity.bound_text if report.parity is not None else "not reached",
        "fold": json.dumps({"fold_bn": report.fold_bn, "bn_before": report.bn_before,
                            "bn_torch_after": report.bn_torch_after, "bn_onnx": report.bn_onnx,
                            "exporter": report.exporter, "simplified": report.simplified,
                            "remaining": [asdict(r) for r in report.remaining]}),
    })
    props.update({k: v for k, v in metadata.items() if v is not None})
    onnx.helper.set_model_props(model, props)
    report.metadata = props
    data = model.SerializeToString()
    report.sha256 = hashlib.sha256(data).hexdigest()
    rejected = out.with_name(out.name + ".rejected")
    rejected_json = out.with_name(out.name + ".rejected.json")
    if report.passed:
        atomic_write_bytes(out, data)
        report.output = str(out)
        rejected.unlink(missing_ok=True)
        rejected_json.unlink(missing_ok=True)
    else:
        atomic_write_bytes(rejected, data)
        report.rejected = str(rejected)
        atomic_write_bytes(rejected_json, (json.dumps(report.to_dict(), indent=1, default=str) + "\n").encode())


def export_model(model: str, out: str | os.PathLike, *, weights: str | os.PathLike | None = None,
                 weights_key: str | None = None, strict: bool = True, trust_pickle: bool = False,
                 input_size: tuple[int, int] | None = None, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None, bgr: bool | None = None, fold_bn: bool = True,
                 exporter: str = "auto", opset: int | None = None, static_batch: bool = False, simplify: bool = True,
                 parity_data: str | None = None, parity_limit: int = 16, atol: float | None = None,
                 rtol: float | None = None, min_cos: float | None = None, device: str = "auto",
                 threads: int | None = None, warn: Callable[[str], None] | None = None, precision: str = "fp32",
                 calib_data: str | None = None, calib_images: int = 64, calib_method: str | None = None,
                 precision_min_cos: float | None = None) -> ExportReport:
    """Export a MODEL spec (with `weights`) or a snapshot path (RUN/snapshots/NNNN.safetensors) to `out`.

    `precision` "fp16" or "int8": the verified float32 file is written beside `out` as OUT.fp32.onnx, then
    converted (bnport.export.precision) and gated against it; `out` is the lower-precision file (or OUT.onnx.rejected when
    its gate fails). INT8 calibrates on `calib_images` images of `calib_data` (None: the parity data) with
    `calib_method` (None: minmax); the gate uses other images of the same source and `precision_min_cos` (None:
    bnport.export.precision.DEFAULT_MIN_COS).

    A snapshot applies its BN state to the base model recorded in its run, and its run's calibration data is the
    default parity data. `parity_data`: a data SRC for real parity images (up to `parity_limit` of them); None means
    the snapshot's calibration data, or noise inputs only for a plain model (then `warn` is told, and the report and
    the card say so). `input_size`, `mean`, `std`, `bgr` override the model's (or the run's) input spec; None keeps
    it. Other options as in `export_onnx`.
    """
    from bnport.model.load import check_input_runs
    from bnport.export.parity import load_parity_images
    from bnport.export.precision import PRECISIONS
    from bnport.model.resolve import resolve_model

    if precision not in PRECISIONS:
        raise BnportError(f"unknown precision {precision!r}", f"use one of {', '.join(PRECISIONS)}")
    loaded = resolve_model(model, weights=weights, weights_key=weights_key, strict=strict, trust_pickle=trust_pickle,
                           input_size=input_size, mean=mean, std=std, bgr=bgr)
    check_input_runs(loaded)
    provenance = dict(loaded.provenance)
    data_src = parity_data or provenance.get("data")
    if parity_data is None and data_src and not Path(data_src).exists():
        raise BnportError(f"the run's calibration data {data_src} is gone, and parity needs real images",
                          "pass --parity-data SRC (a folder, list, .rec or .bin of images like the model's)")
    images = load_parity_images(str(data_src), loaded.input_spec, limit=parity_limit) if data_src else None
    source = {"model": loaded.spec, "weights": loaded.weights, "weights_sha256": loaded.weights_sha256,
              "source_sha256": loaded.source_sha256, "snapshot": str(model) if provenance else None,
              "parity_data": str(data_src) if data_src else None}
    metadata = {"source": loaded.spec, "source_sha256": loaded.source_sha256,
                "weights_sha256": loaded.weights_sha256,
                "snapshot_id": str(provenance["snapshot"]) if "snapshot" in provenance else None,
                "calibration": json.dumps(provenance, default=str) if provenance else None}
    out = Path(out)
    calib_src = calib_data or (str(data_src) if data_src else None)
    if precision == "int8" and calib_src is None:
        raise BnportError("INT8 needs calibration images and none are known for this model",
                          "pass --calib-data SRC (a folder, list, .rec or .bin of images like the model's)")
    fp32_out = out if precision == "fp32" else out.with_name(f"{out.stem}.fp32.onnx")
    report = export_onnx(loaded.module, fp32_out, input_spec=loaded.input_spec, fold_bn=fold_bn, exporter=exporter,
                         opset=opset, static_batch=static_batch, simplify=simplify, parity_images=images, atol=atol,
                         rtol=rtol, min_cos=min_cos, device=device, metadata=metadata, source=source, threads=threads,
                         warn=warn)
    if precision == "fp32" or not report:
        return report
    return _lower_precision(report, fp32_out, out, precision, spec=loaded.input_spec, calib_src=calib_src,
                            calib_images=calib_images, method=calib_method, min_cos=precision_min_cos, device=device)


def _lower_precision(report: ExportReport, fp32_out: Path, out: Path, precision: str, *, spec: InputSpec,
                     calib_src: str | None, calib_images: int, method: str | None, min_cos: float | None,
                     device: str) -> ExportReport:
    """Convert the verified float32 file to `precision` behind its gate; write OUT.onnx or OUT.onnx.rejected."""
    from bnport.export.precision import load_precision_images, make_precision, stamp_precision_metadata

    began = time.perf_counter()
    calibration = parity = None
    fingerprint = None
    if calib_src is not None:
        calibration, parity, fingerprint = load_precision_images(calib_src, spec, calibration=calib_images)
    result = make_precision(fp32_out, precision, calibration_images=calibration if precision == "int8" else None,
                            parity_images=parity, method=method, input_spec=spec, min_cos=min_cos,
                            device="cpu" if precision == "int8" else device)
    model = stamp_precision_metadata(result, calibration_data=fingerprint)
    data = model.SerializeToString()
    rejected = out.with_name(out.name + ".rejected")
    report.timings[f"{precision} conversion and gate"] = time.perf_counter() - began
    report.target = str(out)
    if result:
        atomic_write_bytes(out, data)
        rejected.unlink(missing_ok=True)
        out.with_name(out.name + ".rejected.json").unlink(missing_ok=True)
        report.output, report.sha256 = str(out), hashlib.sha256(data).hexdigest()
        head = f"wrote {out} ({precision}, sha256 {report.sha256[:16]}...) from the float32 file {fp32_out}"
    else:
        atomic_write_bytes(rejected, data)
        report.passed, report.output, report.rejected = False, None, str(rejected)
        head = f"{precision} FAILED its gate against the float32 file: no {out} written; rejected file at {rejected}"
    report.precision = {"precision": precision, "passed": result.passed, "fp32_file": str(fp32_out),
                        **result.to_dict(), "calibration_data": fingerprint, "text": [head, str(result)]}
    if not result:
        atomic_write_bytes(out.with_name(out.name + ".rejected.json"),
                           (json.dumps(report.to_dict(), indent=1, default=str) + "\n").encode())
    return report
