"""What `bnport score` scores: its targets (run folders, snapshots, `.onnx` files, MODEL specs) resolved into
`Candidate`s, each a verified ONNX file (bnport.export.cached makes and caches them) with the name the tables give it;
the lower-precision versions of each (`with_precisions`); and the latency of every file (`measure_latency`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bnport.data.transforms import InputSpec
from bnport.errors import BnportError
from bnport.export.export_report import ExportedFile, verdict
from bnport.export.settings import ExportSettings, PrecisionSettings
from bnport.model.options import ModelOptions
from bnport.runs import Run, SnapshotRef

DEFAULT_OUT = "bnport-score"


@dataclass
class Candidate:
    """One model to score. `onnx` is the parity-verified file (None when the export failed parity: then `passed` is
    False and `failure` says why). `how` says where the file came from: "full export", "graph reused",
    "cached export", "given" (an ONNX file), "export". `parity` is the parity record (None for a foreign ONNX)."""

    label: str
    kind: str
    onnx: Path | None
    input_spec: InputSpec
    passed: bool
    how: str
    parity: dict | None = None
    failure: str = ""
    seconds: float = 0.0
    snapshot: SnapshotRef | None = None
    run: Run | None = None
    provenance: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    sha256: str | None = None
    precision: str = "fp32"
    base: str | None = None
    latency: dict | None = None
    recipe: str | None = None  # the run's folder name when several runs (recipes) are scored together
    consistency: dict | None = None  # a snapshot's held-out consistency figure (bnport.calibrate.consistency)

    @classmethod
    def of(cls, file: ExportedFile, *, label: str, kind: str, input_spec: InputSpec, **identity) -> "Candidate":
        """The candidate of an exported file, named `label`; `identity`: snapshot, run, precision, base."""
        return cls(label=label, kind=kind, onnx=file.onnx, input_spec=input_spec, passed=file.passed, how=file.how,
                   parity=file.parity, failure=file.failure, seconds=file.seconds, provenance=file.provenance,
                   report=file.report, sha256=file.sha256, **identity)

    @property
    def file(self) -> ExportedFile:
        return ExportedFile(onnx=self.onnx, passed=self.passed, how=self.how, parity=self.parity,
                            failure=self.failure, report=self.report, sha256=self.sha256, provenance=self.provenance,
                            seconds=self.seconds)

    @property
    def is_baseline(self) -> bool:
        return self.snapshot is not None and self.snapshot.index == 0 and self.precision == "fp32"

    def to_dict(self) -> dict:
        return {"label": self.label, "kind": self.kind, "onnx": str(self.onnx) if self.onnx else None,
                "sha256": self.sha256, "input_spec": self.input_spec.to_dict(), "passed": self.passed,
                "how": self.how, "failure": self.failure, "seconds": round(self.seconds, 3),
                "snapshot": self.snapshot.id if self.snapshot else None,
                "run": str(self.run.path) if self.run else None, "parity": self.parity,
                "precision": self.precision, "base": self.base or self.label, "latency": self.latency,
                "recipe": self.recipe, "consistency": self.consistency}


def onnx_candidate(model, *, label: str | None = None) -> Candidate:
    """An ONNX file scored as it is (bnport.model.resolve.OnnxModel)."""
    parity = model.parity
    passed = parity is None or bool(parity.get("passed", True))
    return Candidate(label=label or model.path.name, kind="onnx", onnx=model.path, input_spec=model.input_spec,
                     passed=passed, how="given", parity=parity, failure="" if passed else verdict(parity),
                     provenance=model.provenance, sha256=model.sha256,
                     report={"metadata": {k: v for k, v in model.metadata.items() if k != "parity"},
                             "spec_source": model.spec_source})


@dataclass
class Targets:
    """The candidates of a score call, the folder it writes to, the baseline's label and notes for the user."""

    candidates: list[Candidate]
    out_dir: Path
    baseline: str | None
    notes: list[str]


def _plan(targets: list[str]) -> tuple[list[tuple[str, object]], list[str]]:
    """Each target as ("snapshot", SnapshotRef) or ("model", spec), a run expanded into its complete snapshots."""
    from bnport.runs import looks_like_snapshot

    plan: list[tuple[str, object]] = []
    notes: list[str] = []
    for target in targets:
        path = Path(target)
        if path.is_dir():
            run = Run.open(path)
            snapshots = run.snapshots()
            if not snapshots:
                raise BnportError(f"run {path} has no complete snapshot", "run bnport calibrate (or --resume it)")
            if run.status != "complete":
                notes.append(f"note: run {path} is {run.status or 'unfinished'}; scoring the {len(snapshots)} "
                             "complete snapshots it has")
            plan += [("snapshot", s) for s in snapshots]
        elif looks_like_snapshot(path):
            run, index = Run.of_snapshot(path)
            snapshot = run.snapshot(index)
            if not snapshot.complete:
                raise BnportError(f"snapshot {path} is missing or incomplete",
                                  "give RUN/snapshots/NNNN.safetensors of a complete snapshot")
            plan.append(("snapshot", snapshot))
        else:
            plan.append(("model", target))
    return plan, notes


def _consistency(snapshot) -> dict | None:
    """The snapshot's held-out consistency figure in brief (worst and median layer), None when it has none."""
    figure = (snapshot.meta().get("consistency") or {}).get("held_out")
    if not figure or figure.get("worst") is None:
        return None
    return {key: figure.get(key) for key in ("worst", "worst_layer", "median_layer", "images")}


def resolve_targets(targets: list[str], out_dir: Path | None, settings: ExportSettings, options: ModelOptions, *,
                    device: str, log) -> Targets:
    """Targets -> candidates (exported behind the parity gate and cached, or taken as given), the output folder
    (a single run scores into RUN/score/, anything else into ./bnport-score/) and the baseline's label."""
    from bnport.export.cached import RunExporter, export_model_cached
    from bnport.model.resolve import resolve_model

    if not targets:
        raise BnportError("nothing to score", "give a run folder, snapshots, .onnx files or MODEL specs")
    plan, notes = _plan(targets)
    multi_run = len({item.run.path.resolve() for kind, item in plan if kind == "snapshot"}) > 1
    # one baseline among several runs (the recipes of one model share it): it keeps its plain name
    shared_baseline = sum(1 for kind, item in plan if kind == "snapshot" and item.index == 0) == 1
    if options.sets_input and all(kind == "snapshot" for kind, _ in plan):
        notes.append(f"note: {', '.join(options.input_names())} apply to .onnx and MODEL targets; a run's snapshots "
                     "keep the input spec recorded in its run.json")
    runs = [Path(t) for t in targets if Path(t).is_dir()]
    if out_dir is None:
        out_dir = runs[0] / "score" if len(targets) == 1 and runs else Path(DEFAULT_OUT)
    out_dir = Path(out_dir)
    exporters: dict[Path, RunExporter] = {}
    candidates: list[Candidate] = []
    baseline = None
    for kind, item in plan:
        if kind == "snapshot":
            key = item.run.path.resolve()
            if key not in exporters:
                exporters[key] = RunExporter(item.run, settings, device=device, weights=options.weights, log=log)
            spec = InputSpec.from_dict(exporters[key].manifest["input_spec"])
            plain = not multi_run or (item.index == 0 and shared_baseline)
            label = item.label if plain else f"{item.run.path.name}/{item.label}"
            candidate = Candidate.of(exporters[key].export(item), label=label, kind="snapshot", input_spec=spec,
                                     snapshot=item, run=item.run,
                                     recipe=item.run.path.name if multi_run and not plain else None,
                                     consistency=_consistency(item))
            if item.index == 0 and baseline is None:
                baseline = candidate.label
        else:
            loaded = resolve_model(item, options, allow_onnx=True)
            if hasattr(loaded, "module"):
                exported = export_model_cached(loaded, out_dir, settings, device=device, log=log)
                candidate = Candidate.of(exported, label=loaded.spec, kind="model", input_spec=loaded.input_spec)
            else:
                candidate = onnx_candidate(loaded)
                if candidate.parity is None:
                    notes.append(f"note: {candidate.label} carries no bnport parity record (a foreign file); it is "
                                 f"scored as given, input spec from {loaded.spec_source}")
        log(f"{candidate.label}: {_export_line(candidate)}")
        candidates.append(candidate)
    labels = [c.label for c in candidates]
    for i, candidate in enumerate(candidates):
        if labels.count(candidate.label) > 1:
            candidate.label = f"{candidate.label}#{labels[:i + 1].count(candidate.label)}"
    return Targets(candidates, out_dir, baseline, notes)


def _export_line(c: Candidate) -> str:
    if not c.passed:
        return f"parity FAILED ({c.failure}); not scored, never selected"
    parity = c.parity or {}
    figure = f", parity max abs {parity['max_abs']:.2e}, min cos {parity['min_cos']:.7f}" if parity.get("max_abs") \
        is not None and isinstance(parity.get("max_abs"), float) else ""
    return f"{c.how} in {c.seconds:.1f}s{figure}"


def with_precisions(candidates: list[Candidate], precisions: tuple[str, ...], settings: PrecisionSettings, *,
                    parity_data: str | None, device: str, log) -> list[Candidate]:
    """Each passed float32 candidate followed by its lower-precision versions (made and gated, or cached). INT8
    calibrates on `settings.calib_data`, else a run's calibration data, else `parity_data` or the model's own."""
    if len(precisions) == 1:
        return candidates
    from bnport.export.cached import LowerPrecisionCache

    cache = LowerPrecisionCache(settings, device=device)
    out = []
    for c in candidates:
        out.append(c)
        if not c.passed:
            continue
        if c.run is not None:
            source = c.run.manifest().get("data", {}).get("src")
        else:
            source = parity_data or (c.provenance.get("data") if isinstance(c.provenance, dict) else None)
        for precision in precisions[1:]:
            made = cache.make(c.file, precision, spec=c.input_spec, source=source, label=c.label)
            lower = Candidate.of(made, label=f"{c.label} {precision}", kind=c.kind, input_spec=c.input_spec,
                                 snapshot=c.snapshot, run=c.run, precision=precision, base=c.label,
                                 recipe=c.recipe, consistency=c.consistency)
            log(f"{lower.label}: " + (f"{lower.how}, gate passed (min row cosine "
                                      f"{lower.parity['min_cos']:.6f} vs float32) in {lower.seconds:.1f}s"
                                      if lower.passed else f"gate FAILED ({lower.failure}); not selected"))
            out.append(lower)
    return out


def measure_latency(candidates: list[Candidate], device: str, runs: int, log) -> None:
    """Median latency at batch 1 and 8 per file. The precisions of one model are timed together, runs interleaved,
    so they are compared under the same machine load. Snapshots of one run share a graph per precision (only the BN
    statistics differ), so the first snapshot's files are timed and the others carry their figures."""
    from bnport.runtime.latency import measure_latencies

    measured: dict = {}
    passed = [c for c in candidates if c.passed]
    for c in passed:
        group = str(c.run.path) if c.run is not None else (c.base or c.label)
        if (group, c.precision) in measured:
            c.latency = measured[group, c.precision]
            continue
        family = [f for f in passed if (f.base or f.label) == (c.base or c.label)]
        results = measure_latencies({f.precision: f.onnx for f in family}, device=device, batch_sizes=(1, 8),
                                    runs=runs, tensorrt=("int8",) if device == "cuda" else ())
        for f in family:
            measured[group, f.precision] = {**results[f.precision].to_dict(), "measured_on": f.label}
            result = results[f.precision]
            log(f"{f.label}: latency " + ", ".join(f"batch {b} {ms:.2f} ms" for b, ms in result.median_ms.items())
                + f" (median of {runs}, interleaved with its other precisions, {', '.join(result.providers)})"
                + (f"; {result.note}" if result.note else ""))
        c.latency = measured[group, c.precision]
