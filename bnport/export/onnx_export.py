"""ONNX export behind a parity gate: fold BatchNorm, export, fold again on the graph, simplify, prove parity, write.

`export_model` takes a MODEL spec or a snapshot path; `export_onnx` does the work on a module. The module is folded
in PyTorch (`bnport.export.fold_torch`), exported with the dynamo exporter (TorchScript as fallback or on request),
folded again on the ONNX graph (`bnport.export.fold_onnx`), simplified with onnxsim, folded once more, checked with
`onnx.checker` and compared with the original unfolded module on onnxruntime (`bnport.export.parity`). The file
written is the one that passed parity; if onnxsim breaks parity the unsimplified graph is checked and used instead,
and the report says so. A file that fails parity is written only as OUT.onnx.rejected, with its report beside it as
OUT.onnx.rejected.json (bnport.export.export_report). How the export runs is an `ExportSettings`
(bnport.export.settings); a lower precision (`export_model(..., precision="int8")`) is made from the verified float32
file by bnport.export.precision.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from bnport.data.transforms import InputSpec
from bnport.errors import BnportError, one_line
from bnport.export.export_report import (INPUT_NAME, NOISE_ONLY_WARNING, PARITY_INPUTS_NOISE, PARITY_INPUTS_REAL,
                                         ExportAttempt, ExportReport, RemainingBn, write_export)
from bnport.export.parity import ParityReference, ParityResult, build_parity_inputs
from bnport.export.settings import ExportSettings, PrecisionSettings, check_precision

TORCHSCRIPT_DEFAULT_OPSET = 17


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
        return None, f"onnxsim failed ({one_line(err)}); file left unsimplified"
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
    """bnport.export.fold_torch on `module` (left unchanged); the plan, a second trace, is only made to explain BNs
    that stayed."""
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

    def __init__(self, reference: ParityReference, settings: ExportSettings, *, device: str, timings: dict):
        self.reference, self.device, self.timings, self.threads = reference, device, timings, settings.threads
        self.tolerances = settings.tolerances()
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


def export_onnx(module: nn.Module, out: str | os.PathLike, settings: ExportSettings | None = None, *,
                input_spec: InputSpec | None = None, parity_images: torch.Tensor | None = None, device: str = "auto",
                metadata: dict[str, str] | None = None, source: dict | None = None,
                warn: Callable[[str], None] | None = None) -> ExportReport:
    """Export `module` (left unchanged) to `out` behind the parity gate, as `settings` say (None: ExportSettings());
    see the module docstring.

    `input_spec`: None = InputSpec() (112x112, insightface normalisation). `parity_images`: real network inputs
    (Nx3xHxW) to check on, besides the noise inputs; None = noise inputs only, which the report and the card
    (`parity_inputs`) say. `device`: onnxruntime device for parity ("auto": CUDA when it really works). `metadata`:
    extra metadata_props; `source`: what the model is (spec, weights, sha256s), for the report. `warn`: called with
    one line per thing the user should know before trusting the file (parity on noise only); None = not called.
    """
    from bnport.export.fold_torch import count_bn
    from bnport.export.parity import reference_device
    from bnport.runtime.device import modes_kept
    from bnport.runtime.sessions import resolve_device

    settings = settings or ExportSettings()
    out = Path(out)
    if out.suffix != ".onnx":
        raise BnportError(f"output path {out} does not end in .onnx", "name the output like model.onnx")
    ort_device, _ = resolve_device(device)  # a --device cuda that cannot work fails now, not after the export
    spec = input_spec or InputSpec()
    timings: dict[str, float] = {}
    with modes_kept(module):  # the caller's module keeps its modes; eval for tracing and the reference
        module.eval()
        x = _example_input(spec, 1 if settings.static_batch else 2)
        began = time.perf_counter()
        bn_before = count_bn(module)
        torch_fold = _fold_in_torch(module, x) if settings.fold_bn else _TorchFold(module, bn_before, None, [])
        timings["torch fold"] = time.perf_counter() - began

        began = time.perf_counter()
        inputs, counts = build_parity_inputs(spec, real=parity_images)
        parity_inputs = PARITY_INPUTS_REAL if counts["real"] else PARITY_INPUTS_NOISE
        if parity_inputs == PARITY_INPUTS_NOISE and warn is not None:
            warn(NOISE_ONLY_WARNING)
        reference = ParityReference(module, inputs, counts=counts,
                                    batch_sizes=(1,) if settings.static_batch else (1, 2, 8))
        with torch_threads(settings.threads):
            output_names = _output_names(len(reference.outputs(reference_device(ort_device))[0]))
        timings["parity"] = time.perf_counter() - began
        gate = _Gate(reference, settings, device=device, timings=timings)
        attempts, passed, failed = _try_exporters(torch_fold.module, x, settings, gate, output_names)

    name, candidate = passed or failed or (None, None)
    remaining = list(torch_fold.remaining)
    if candidate is not None and candidate.onnx_fold is not None:
        remaining += [RemainingBn("onnx", d["node"], d["reason"]) for d in candidate.onnx_fold["decisions"]
                      if d["action"] == "keep"]
    report = ExportReport(
        passed=passed is not None, target=str(out), output=None, rejected=None, exporter=name,
        exporter_note=_exporter_note(settings.exporter, attempts), attempts=attempts,
        opset=_opset(candidate.model) if candidate is not None else None, dynamic_batch=not settings.static_batch,
        input_name=INPUT_NAME, output_names=output_names, simplified=bool(candidate and candidate.simplified),
        simplify_note=candidate.simplify_note if candidate is not None else "not reached", fold_bn=settings.fold_bn,
        bn_before=bn_before, bn_torch_after=torch_fold.bn_after,
        bn_onnx=_count_onnx_bn(candidate.model) if candidate is not None else None, remaining=remaining,
        parity=candidate.parity if candidate is not None else None,
        parity_other=candidate.parity_other if candidate is not None else None, sha256=None, metadata={},
        timings=timings, runtime=gate.runtime, torch_fold=torch_fold.summary,
        onnx_fold=candidate.onnx_fold if candidate is not None else None, source=dict(source or {}),
        parity_inputs=parity_inputs)
    if candidate is not None:
        write_export(candidate.model, out, report, spec=spec, metadata=metadata or {})
    return report


def _try_exporters(module: nn.Module, x: torch.Tensor, settings: ExportSettings, gate: "_Gate",
                   output_names: list[str]) -> tuple[list[ExportAttempt], tuple | None, tuple | None]:
    """Each exporter in turn ("auto": dynamo, then TorchScript) until one's file passes the gate: (attempts,
    (name, candidate) that passed or None, (name, candidate) that failed last or None)."""
    attempts: list[ExportAttempt] = []
    passed = failed = None
    dynamic = not settings.static_batch
    for name in (["dynamo", "torchscript"] if settings.exporter == "auto" else [settings.exporter]):
        began = time.perf_counter()
        try:
            # exporters print progress, graph dumps and warnings; what matters goes into the report instead
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                export = _export_dynamo if name == "dynamo" else _export_torchscript
                raw = export(module, x, opset=settings.opset, dynamic=dynamic, output_names=output_names)
            if settings.opset is not None and _opset(raw) != settings.opset:
                raise BnportError(f"{name} wrote opset {_opset(raw)}, not the requested {settings.opset}")
            gate.timings[f"export ({name})"] = time.perf_counter() - began
            graph, onnx_summary = _fold_graph(raw, fold_bn=settings.fold_bn)
            candidate = _simplify_and_check(graph, onnx_summary, gate, simplify=settings.simplify,
                                            fold_bn=settings.fold_bn)
        except Exception as err:  # noqa: BLE001 - any exporter failure means "try the next one", and is reported
            attempts.append(ExportAttempt(name, False, f"export failed: {one_line(err)}",
                                          time.perf_counter() - began))
            continue
        ok = bool(candidate.parity)
        note = "parity passed" if ok else "parity failed: " + "; ".join(candidate.parity.failures)
        attempts.append(ExportAttempt(name, ok, note, time.perf_counter() - began))
        if ok:
            return attempts, (name, candidate), failed
        failed = (name, candidate)
    return attempts, passed, failed


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
        why = f"onnxsim output failed onnx.checker or onnxruntime ({one_line(err)}); file left unsimplified"
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


def export_model(model: str, out: str | os.PathLike, *, options=None, settings: ExportSettings | None = None,
                 precision: str = "fp32", precision_settings: PrecisionSettings | None = None, device: str = "auto",
                 warn: Callable[[str], None] | None = None) -> ExportReport:
    """Export a MODEL spec (loaded as `options` say: a bnport.model.options.ModelOptions, None for defaults) or a
    snapshot path (RUN/snapshots/NNNN.safetensors) to `out`, as `settings` say.

    A snapshot applies its BN state to the base model recorded in its run, and its run's calibration data is the
    default parity data. `settings.parity_data`: a data SRC for real parity images (up to `settings.parity_limit`);
    None means the snapshot's calibration data, or noise inputs only for a plain model (then `warn` is told, and the
    report and the card say so). Input-spec options override the model's (or the run's) input spec.

    `precision` "fp16" or "int8": the verified float32 file is written beside `out` as OUT.fp32.onnx, then converted
    (bnport.export.precision, as `precision_settings` say) and gated against it; `out` is the lower-precision file
    (or OUT.onnx.rejected when its gate fails). INT8 calibrates on images of `precision_settings.calib_data` (None:
    the parity data).
    """
    from bnport.export.parity import load_parity_images
    from bnport.model.load import check_input_runs
    from bnport.model.resolve import resolve_model

    check_precision(precision)
    settings = settings or ExportSettings()
    precision_settings = precision_settings or PrecisionSettings()
    loaded = resolve_model(model, options)
    check_input_runs(loaded)
    provenance = dict(loaded.provenance)
    data_src = settings.parity_data or provenance.get("data")
    if settings.parity_data is None and data_src and not Path(data_src).exists():
        raise BnportError(f"the run's calibration data {data_src} is gone, and parity needs real images",
                          "pass --parity-data SRC (a folder, list, .rec or .bin of images like the model's)")
    images = load_parity_images(str(data_src), loaded.input_spec, limit=settings.parity_limit) if data_src else None
    source = {"model": loaded.spec, "weights": loaded.weights, "weights_sha256": loaded.weights_sha256,
              "source_sha256": loaded.source_sha256, "snapshot": str(model) if provenance else None,
              "parity_data": str(data_src) if data_src else None}
    out = Path(out)
    calib_src = precision_settings.calib_data or (str(data_src) if data_src else None)
    if precision == "int8" and calib_src is None:
        raise BnportError("INT8 needs calibration images and none are known for this model",
                          "pass --calib-data SRC (a folder, list, .rec or .bin of images like the model's)")
    fp32_out = out if precision == "fp32" else out.with_name(f"{out.stem}.fp32.onnx")
    report = export_onnx(loaded.module, fp32_out, settings, input_spec=loaded.input_spec, parity_images=images,
                         device=device, metadata=provenance_metadata(loaded), source=source, warn=warn)
    if precision == "fp32" or not report:
        return report
    from bnport.export.precision import lower_precision_file

    began = time.perf_counter()
    made = lower_precision_file(fp32_out, out, precision, precision_settings, spec=loaded.input_spec,
                                calib_src=calib_src, device=device)
    report.timings[f"{precision} conversion and gate"] = time.perf_counter() - began
    report.target = str(out)
    report.passed = made.passed
    report.output, report.rejected = (str(out), None) if made.passed else (None, str(made.path))
    report.sha256 = made.sha256 if made.passed else report.sha256
    report.precision = made.card(fp32_out)
    if not made.passed:
        made.write_report(report.to_dict())
    return report


def provenance_metadata(loaded) -> dict[str, str | None]:
    """The metadata_props that say where a model came from: its spec and sha256s and, for a snapshot, its id and
    calibration (the same for a full export and a reused graph)."""
    provenance = dict(loaded.provenance)
    return {"source": loaded.spec, "source_sha256": loaded.source_sha256, "weights_sha256": loaded.weights_sha256,
            "snapshot_id": str(provenance["snapshot"]) if "snapshot" in provenance else None,
            "calibration": json.dumps(provenance, default=str) if provenance else None}
