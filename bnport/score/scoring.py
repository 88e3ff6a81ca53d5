"""`bnport score`: the baseline and every snapshot of a run (or any ONNX files and MODEL specs) on onnxruntime over
face-verification benchmarks, one table of TPR@FPR, a stated selection rule, and the handoff bundle.

Steps: resolve the targets into candidates (snapshots exported behind the parity gate and cached in the run, see
bnport.score.exports), decode each benchmark once into a cache (bnport.score.cache), run every candidate over it
(bnport.score.embed), turn features into per-pair scores (bnport.score.bench) and scores into metrics
(bnport.score.metrics), select (bnport.score.select) and write the outputs. Under `torchrun` the images are sharded
across ranks and the features gathered on rank 0, which alone exports, scores and writes: the table and the `.npy`
files equal a single process's.

Output folder (default `RUN/score/` for a run, `./bnport-score/` otherwise): `table.txt`, `table.json`, `table.md`,
`scores/<model>__<bench>.npy` (float64 per-pair scores in pair order, with a `.json` naming what made them, so a later
call reuses them), and `handoff/`.
"""
from __future__ import annotations

import hashlib
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bnport import __version__
from bnport.atomic import atomic_write_bytes, atomic_write_json, file_name_part
from bnport.errors import BnportError
from bnport.score.bench import Benchmark, parse_benches
from bnport.score.exports import Candidate, ExportSettings, RunExporter, model_candidate, onnx_candidate
from bnport.score.select import Selection, check_rule, choose_precision, parse_rule, select_model
from bnport.score.table import DEFAULT_FPRS, BenchResult, ScoreTable, fpr_label

DEFAULT_OUT = "bnport-score"


@dataclass
class ScoreResult:
    """What `score` produced: the table, the selection (None when nothing could be selected), where it wrote."""

    table: ScoreTable
    selection: Selection | None
    out_dir: Path
    handoff: Path | None
    candidates: list[Candidate]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"out": str(self.out_dir), "handoff": str(self.handoff) if self.handoff else None,
                "selection": self.selection.to_dict() if self.selection else None, "notes": self.notes,
                "seconds": round(self.seconds, 3), **self.table.to_dict()}

    def __str__(self) -> str:
        return self.format()

    def format(self, *, bundle: bool = True) -> str:
        """The table, the selection and where the outputs are; `bundle` False leaves out the bundle's line (for a
        caller that prints it last itself)."""
        from bnport.score.format import format_score_table

        lines = [*self.notes, format_score_table(self.table)]
        if self.selection is not None:
            lines += ["", *self.selection.lines()]
        lines.append("")
        lines.append(f"table: {self.out_dir / 'table.txt'} (.json, .md); per-pair scores: {self.out_dir / 'scores'}")
        if self.handoff is not None and bundle:
            lines.append(f"handoff bundle: {self.handoff}")
        return "\n".join(lines)


def parse_fprs(fprs: str | list[float] | tuple[float, ...] | None) -> list[float]:
    """"1e-6,1e-4" or a list -> sorted unique FPR targets in (0, 1); None -> 1e-6 ... 1e-1."""
    if fprs is None:
        return list(DEFAULT_FPRS)
    if isinstance(fprs, str):
        try:
            values = [float(v) for v in fprs.split(",") if v.strip()]
        except ValueError:
            raise BnportError(f"bad FPR list {fprs!r}", "give numbers separated by commas, e.g. 1e-6,1e-4,1e-2") \
                from None
    else:
        values = [float(v) for v in fprs]
    if not values or any(not 0 < v < 1 for v in values):
        raise BnportError(f"FPR targets must lie between 0 and 1, got {fprs}", "e.g. 1e-6,1e-5,1e-4")
    return sorted(set(values))


def _on_rank0(fn, rank: int, world: int):
    """Run `fn` on rank 0 and give every rank its result; an error on rank 0 is raised on every rank."""
    if world == 1:
        return fn()
    import torch.distributed as dist

    box = [None]
    if rank == 0:
        try:
            box = [("ok", fn())]
        except BnportError as e:
            box = [("error", (e.message, e.hint))]
        except BaseException as e:  # noqa: BLE001 - re-raised on rank 0 below, reported as a failure elsewhere
            box = [("crash", f"{type(e).__name__}: {e}")]
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "ok":
        return value
    if status == "error":
        raise BnportError(*value)
    raise BnportError(f"rank 0 failed: {value}", "see rank 0's output")


def _resolve_targets(targets: list[str], out_dir: Path | None, settings: ExportSettings, model_options: dict,
                     log) -> tuple[list[Candidate], Path, str | None, list[str]]:
    """Targets -> candidates (exported and parity-checked), the output folder and the baseline's label."""
    from bnport.model.resolve import resolve_model
    from bnport.runs import Run, looks_like_snapshot

    if not targets:
        raise BnportError("nothing to score", "give a run folder, snapshots, .onnx files or MODEL specs")
    runs = [Path(t) for t in targets if Path(t).is_dir()]
    candidates: list[Candidate] = []
    notes: list[str] = []
    baseline = None
    exporters: dict[Path, RunExporter] = {}

    def exporter_for(run: Run) -> RunExporter:
        key = run.path.resolve()
        if key not in exporters:
            exporters[key] = RunExporter(run, settings, weights=model_options.get("weights"), log=log)
        return exporters[key]

    plan: list[tuple[str, object]] = []
    for target in targets:
        path = Path(target)
        if path.is_dir():
            run = Run.open(path)
            status = run.status
            snapshots = run.snapshots()
            if not snapshots:
                raise BnportError(f"run {path} has no complete snapshot", "run bnport calibrate (or --resume it)")
            if status != "complete":
                notes.append(f"note: run {path} is {status or 'unfinished'}; scoring the {len(snapshots)} complete "
                             "snapshots it has")
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
    multi_run = len({item.run.path.resolve() for kind, item in plan if kind == "snapshot"}) > 1
    ignored = [f"--{k.replace('_', '-')}" for k in ("input_size", "mean", "std", "bgr") if model_options.get(k)]
    if ignored and all(kind == "snapshot" for kind, _ in plan):
        notes.append(f"note: {', '.join(ignored)} apply to .onnx and MODEL targets; a run's snapshots keep the input "
                     "spec recorded in its run.json")
    if out_dir is None:  # a single run folder scores into RUN/score/; anything else into ./bnport-score/
        out_dir = runs[0] / "score" if len(targets) == 1 and runs else Path(DEFAULT_OUT)
    out_dir = Path(out_dir)
    for kind, item in plan:
        if kind == "snapshot":
            snap = item
            candidate = exporter_for(snap.run).export(snap)
            if multi_run:
                candidate.label = f"{snap.run.path.name}/{candidate.label}"
            if snap.index == 0 and baseline is None:
                baseline = candidate.label
            log(f"{candidate.label}: {_export_line(candidate)}")
        else:
            loaded = resolve_model(item, allow_onnx=True, **model_options)
            if hasattr(loaded, "module"):
                candidate = model_candidate(loaded, out_dir, settings, log=log)
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
    return candidates, out_dir, baseline, notes


def _export_line(c: Candidate) -> str:
    if not c.passed:
        return f"parity FAILED ({c.failure}); not scored, never selected"
    parity = c.parity or {}
    figure = f", parity max abs {parity['max_abs']:.2e}, min cos {parity['min_cos']:.7f}" if parity.get("max_abs") \
        is not None and isinstance(parity.get("max_abs"), float) else ""
    return f"{c.how} in {c.seconds:.1f}s{figure}"


def _slug(label: str) -> str:
    return file_name_part(label.replace(" (baseline)", ""), 60)


def _unique_slugs(labels: list[str]) -> dict[str, str]:
    """A file-name slug per label, distinct even where two labels slug alike ("x y" and "x_y" get -2)."""
    out: dict[str, str] = {}
    for label in labels:
        slug, n = _slug(label), 1
        while slug in out.values():
            n += 1
            slug = f"{_slug(label)}-{n}"
        out[label] = slug
    return out


def _scores_key(candidate: Candidate, bench: Benchmark, cache_key: str) -> str:
    return hashlib.sha256(json.dumps({"model": candidate.sha256, "bench": cache_key, "settings": bench.settings(),
                                      "format": 1}, sort_keys=True).encode()).hexdigest()[:20]


def _metrics(pairs, fprs: list[float], *, bootstrap: int, seed: int) -> dict:
    """TPR@FPR under both rules, with the noise flag, achieved FPR, threshold and (with `bootstrap`) intervals."""
    from bnport.score.metrics import compute_tpr_at_fpr

    table = compute_tpr_at_fpr(pairs.labels, pairs.scores, fprs=fprs, bootstrap=bootstrap or None, seed=seed)
    out = {"n_genuine": table.n_genuine, "n_impostor": table.n_impostor, "tpr": {}, "achieved_fpr": {},
           "thresholds": {}, "noisy": {}, "intervals": {} if bootstrap else None}
    for cell in table.cells:
        key = fpr_label(cell.fpr_target)
        out["tpr"].setdefault(cell.rule, {})[key] = cell.tpr
        out["achieved_fpr"].setdefault(cell.rule, {})[key] = cell.fpr
        out["thresholds"].setdefault(cell.rule, {})[key] = cell.threshold if np.isfinite(cell.threshold) else None
        out["noisy"][key] = cell.unreliable
        if bootstrap:
            out["intervals"].setdefault(cell.rule, {})[key] = list(cell.interval)
    return out


def score(targets: list[str], benches: list[str], *, out: str | Path | None = None, fprs=None,
          select: str | None = None, guard: float | None = None, bootstrap: int = 0, batch_size: int | None = None,
          device: str = "auto", cache_dir: str | Path | None = None, workers: int | None = None,
          export: ExportSettings | None = None, model_options: dict | None = None, seed: int = 0,
          precisions: str | list[str] | None = None, max_drop: float = 0.2, latency: bool | None = None,
          latency_runs: int = 20, precision_options: dict | None = None, handoff: bool = True, progress: bool = True,
          command: str | None = None, log=None) -> ScoreResult:
    """Score `targets` (run folders, snapshots, .onnx files, MODEL specs) on `benches` (bench specs).

    `fprs`: FPR targets (None: 1e-6 ... 1e-1). `select`: the rule (None: strict TPR@1e-4 on the first benchmark);
    `guard`: TPR points no other FPR may lose vs the baseline. `bootstrap`: replicates for percentile intervals (0:
    none). `batch_size`: None = 32 on CPU, 256 on CUDA. `device`: onnxruntime device (auto|cpu|cuda). `cache_dir`:
    decoded-image cache (None: $BNPORT_CACHE_DIR or ~/.cache/bnport). `workers`: decode processes (None: up to 8).
    `export`: how snapshots and MODEL specs are exported (None: bnport.export.onnx_export's defaults). `model_options`: load and
    input-spec options for MODEL / .onnx targets (weights, weights_key, strict, trust_pickle, input_size, mean, std,
    bgr). `precisions`: "fp32,int8" or a list (None: fp32 only; fp32 is always scored): every model is also scored
    in each lower precision (bnport.export.precision; `precision_options`: calib_data, calib_images, method, min_cos), and
    the selected snapshot ships in the fastest precision whose rule figure is at most `max_drop` points below its
    float32 one. `latency`: measure each file's latency at batch 1 and 8 (median of `latency_runs`; None: when
    lower precisions are scored). `handoff`: write the bundle of the selected model. `command`: the command line
    recorded in the bundle.
    """
    import torch

    from bnport.runtime.distributed import join_process_group
    from bnport.runtime.sessions import create_session, resolve_device

    began = time.perf_counter()
    log = log or (lambda message: print(message, file=sys.stderr))
    # scoring's collectives carry Python objects only, so a CPU (gloo) group serves on every machine; the ONNX
    # sessions run on CUDA or CPU independently of it
    ranks = join_process_group(torch.device("cpu"))
    rank, world = ranks.rank, ranks.world
    quiet = (lambda message: None) if rank else log
    try:
        checked = check_score_settings(benches, fprs=fprs, select=select, guard=guard, bootstrap=bootstrap,
                                       precisions=precisions, max_drop=max_drop)
        benchmarks, fpr_list, rule, precision_list = (checked.benchmarks, checked.fprs, checked.rule,
                                                      checked.precisions)
        ort_device, device_note = resolve_device(device)
        settings = export or ExportSettings(device=device)
        measure = latency if latency is not None else len(precision_list) > 1

        def prepare():
            found = _resolve_targets(list(targets), Path(out) if out else None, settings, model_options or {}, quiet)
            candidates = _with_precisions(found[0], precision_list,
                                          {"parity_data": settings.parity_data, **(precision_options or {})},
                                          device, quiet)
            if measure:
                _measure_latency(candidates, ort_device, latency_runs, quiet)
            return (candidates, *found[1:])

        candidates, out_dir, baseline, notes = _on_rank0(prepare, rank, world)
        scored = [c for c in candidates if c.passed]
        decoded = {}
        for bench in benchmarks:  # every image decoded once, before any model runs
            for size in sorted({(c.input_spec.height, c.input_spec.width) for c in scored}):
                decoded[bench.name, size] = _on_rank0(lambda b=bench, s=size: _decode(b, s, cache_dir, workers,
                                                                                      progress, quiet), rank, world)
        results: list[BenchResult] = []
        providers: list[str] = []
        session_settings: dict = {}
        scores_dir = out_dir / "scores"
        slugs = _unique_slugs([c.label for c in candidates])
        bench_slugs = _unique_slugs([b.name for b in benchmarks])
        if rank == 0:  # the labels of this call's benchmarks, written anew: a benchmark may have changed
            for bench in benchmarks:
                atomic_write_bytes(scores_dir / f"{bench_slugs[bench.name]}.labels.npy", _npy_bytes(bench.labels()))
        for c in scored:
            session = None
            for bench in benchmarks:
                cache = decoded[bench.name, (c.input_spec.height, c.input_spec.width)]
                key = _scores_key(c, bench, cache.key)
                npy = scores_dir / f"{slugs[c.label]}__{bench_slugs[bench.name]}.npy"
                pairs = _cached_pairs(npy, key, bench) if rank == 0 else None
                started = time.perf_counter()
                reuse = _on_rank0(lambda p=pairs: p is not None, rank, world) if world > 1 else pairs is not None
                if not reuse:
                    if session is None:
                        session = create_session(c.onnx, device=device)
                        providers += [p for p in session.providers if p not in providers]
                        session_settings = session.settings
                    features = _embed_sharded(session, cache.images, c.input_spec, bench.flip, batch_size,
                                              rank, world, progress and rank == 0, f"{c.label} on {bench.name}")
                    if rank == 0:
                        pairs = bench.score_pairs(features)
                        _save_pairs(npy, key, pairs, c, bench)
                if rank == 0:
                    results.append(_bench_result(c, bench, pairs, fpr_list, npy, bootstrap, seed,
                                                 time.perf_counter() - started,
                                                 scores_dir / f"{bench_slugs[bench.name]}.labels.npy"))
        if rank != 0:
            return ScoreResult(table=ScoreTable(fpr_list, [], [], [], providers), selection=None, out_dir=out_dir,
                               handoff=None, candidates=candidates)
        if not providers:  # every score came from the cache: name what this call would have used
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if ort_device == "cuda" else \
                ["CPUExecutionProvider"]
        table = ScoreTable(fprs=fpr_list, benches=[b.to_dict() for b in benchmarks],
                           models=[c.to_dict() for c in candidates], results=results, providers=providers,
                           device_note=device_note, session_settings=session_settings)
        selection = select_model(table, rule, guard=guard, baseline=baseline) if candidates else None
        if selection is not None and len(precision_list) > 1:
            choose_precision(table, selection, max_drop=max_drop)
        result = ScoreResult(table=table, selection=selection, out_dir=out_dir, handoff=None, candidates=candidates,
                             notes=notes)
        _write_tables(result)
        if handoff and selection is not None and selection.handoff is not None:
            from bnport.score.format import format_score_markdown
            from bnport.score.handoff import write_handoff

            chosen = next(c for c in candidates if c.label == selection.handoff)
            result.handoff = write_handoff(out_dir / "handoff", chosen, table=table, selection=selection,
                                           markdown=format_score_markdown(result, command=command),
                                           command=command or "",
                                           extra_card={"precisions": _precisions_tried(table, selection)})
        elif (out_dir / "handoff").exists():  # an older bundle would contradict the table just written beside it
            import shutil

            shutil.rmtree(out_dir / "handoff")
            result.notes.append(f"note: removed the previous handoff bundle in {out_dir / 'handoff'}: it no longer "
                                "matches table.json" + (" (--no-handoff)" if not handoff else
                                                        " (no model passed parity)"))
        result.seconds = time.perf_counter() - began
        return result
    finally:
        ranks.close()


def _precisions_tried(table: ScoreTable, selection: Selection) -> dict:
    """For the card: every precision of the selected snapshot, its file, gate, latency and rule figure."""
    out = {}
    for model in table.models:
        if (model.get("base") or model["label"]) != selection.selected:
            continue
        precision = model.get("precision", "fp32")
        result = table.result(model["label"], selection.bench)
        value = result.value(selection.rule.metric, selection.rule.rule, selection.rule.fpr) if result else None
        out[precision] = {"label": model["label"], "file": model["onnx"], "passed": model["passed"],
                          "latency_ms": (model.get("latency") or {}).get("median_ms"), "rule": selection.rule.short(),
                          "value": value, "reason": selection.precision_reasons.get(precision, "")}
    return out


@dataclass
class ScoreSettings:
    """Checked score settings: the benchmarks (read), FPR targets (with the rule's), the rule, the precisions."""

    benchmarks: list[Benchmark]
    fprs: list[float]
    rule: object
    precisions: list[str]


def check_score_settings(benches, *, fprs=None, select: str | None = None, guard: float | None = None,
                         bootstrap: int = 0, precisions=None, max_drop: float = 0.2) -> ScoreSettings:
    """Check everything `score` takes before any model runs (benchmark files read, rule and FPRs parsed), so a typo
    fails in seconds, not after a calibration. `benches`: specs, or Benchmark objects checked before."""
    fpr_list = parse_fprs(fprs)
    rule = parse_rule(select)
    precision_list = parse_precisions(precisions)
    if guard is not None and guard < 0:
        raise BnportError(f"the guard must be >= 0 points, got {guard}", "e.g. 0.1")
    if bootstrap < 0:
        raise BnportError(f"bootstrap replicates must be >= 0, got {bootstrap}", "e.g. 200")
    if max_drop < 0:
        raise BnportError(f"the allowed precision drop must be >= 0 points, got {max_drop}", "e.g. 0.2")
    benchmarks = parse_benches(benches)
    check_rule(rule, [b.to_dict() for b in benchmarks])
    if rule.metric == "tpr" and fpr_label(rule.fpr) not in {fpr_label(f) for f in fpr_list}:
        fpr_list = sorted([*fpr_list, rule.fpr])  # the rule's FPR is always in the table
    return ScoreSettings(benchmarks, fpr_list, rule, precision_list)


def parse_precisions(precisions: str | list[str] | None) -> list[str]:
    """"fp32,int8" or a list -> the precisions to score, float32 first (always scored: the others are judged
    against it)."""
    from bnport.export.precision import PRECISIONS

    if precisions is None:
        return ["fp32"]
    items = [p.strip().lower() for text in ([precisions] if isinstance(precisions, str) else precisions)
             for p in text.split(",") if p.strip()]
    unknown = [p for p in items if p not in PRECISIONS]
    if unknown:
        raise BnportError(f"unknown precision {unknown[0]!r}", f"use a comma-separated list of {', '.join(PRECISIONS)}")
    return ["fp32", *[p for p in dict.fromkeys(items) if p != "fp32"]]


def _with_precisions(candidates: list[Candidate], precisions: list[str], options: dict, device: str,
                     log) -> list[Candidate]:
    """Each passed float32 candidate followed by its lower-precision versions (made and gated, or cached)."""
    if len(precisions) == 1:
        return candidates
    from bnport.score.exports import PrecisionMaker

    maker = PrecisionMaker(device=device, log=log, **options)
    out = []
    for c in candidates:
        out.append(c)
        if not c.passed:
            continue
        for precision in precisions[1:]:
            lower = maker.make(c, precision)
            log(f"{lower.label}: " + (f"{lower.how}, gate passed (min row cosine "
                                      f"{lower.parity['min_cos']:.6f} vs float32) in {lower.seconds:.1f}s"
                                      if lower.passed else f"gate FAILED ({lower.failure}); not selected"))
            out.append(lower)
    return out


def _measure_latency(candidates: list[Candidate], device: str, runs: int, log) -> None:
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
                                    runs=runs)
        for f in family:
            measured[group, f.precision] = {**results[f.precision].to_dict(), "measured_on": f.label}
            log(f"{f.label}: latency " + ", ".join(f"batch {b} {ms:.2f} ms" for b, ms in
                                                   results[f.precision].median_ms.items())
                + f" (median of {runs}, interleaved with its other precisions, {device})")
        c.latency = measured[group, c.precision]


def _decode(bench: Benchmark, size, cache_dir, workers, progress, log):
    from bnport.score.cache import decoded_images

    return decoded_images(bench, size, cache_dir=cache_dir, workers=workers, progress=progress, log=log)


def _embed_sharded(session, images, spec, flip, batch_size, rank, world, progress, desc):
    """This rank's contiguous share of the images; rank 0 gathers every share, in order."""
    from bnport.score.embed import embed_images

    n = len(images)
    start, stop = rank * n // world, (rank + 1) * n // world
    features = embed_images(session, images, spec, flip=flip, batch_size=batch_size, start=start, stop=stop,
                            progress=progress, desc=desc)
    if world == 1:
        return features
    import torch.distributed as dist

    shards = [None] * world if rank == 0 else None
    dist.gather_object(features, shards, dst=0)
    if rank != 0:
        return None
    width = max(s.shape[1] for s in shards if s.size)
    return np.concatenate([s if s.size else np.zeros((0, width), np.float32) for s in shards])


def _cached_pairs(npy: Path, key: str, bench: Benchmark):
    from bnport.score.bench import PairScores

    sidecar = npy.with_suffix(".json")
    if not (npy.is_file() and sidecar.is_file()):
        return None
    try:
        info = json.loads(sidecar.read_text())
        if info.get("key") != key:
            return None
        scores = np.load(npy)
    except (OSError, ValueError):
        return None
    if scores.shape != (bench.n_pairs,):
        return None
    return PairScores(scores=scores, labels=bench.labels(), extra=info.get("extra", {}))


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _save_pairs(npy: Path, key: str, pairs, candidate: Candidate, bench: Benchmark) -> None:
    atomic_write_bytes(npy, _npy_bytes(np.asarray(pairs.scores, dtype=np.float64)))
    extra = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in pairs.extra.items()}
    atomic_write_json(npy.with_suffix(".json"), {"key": key, "model": candidate.label, "onnx": str(candidate.onnx),
                                                 "onnx_sha256": candidate.sha256, "bench": bench.to_dict(),
                                                 "pairs": int(len(pairs.scores)), "extra": extra,
                                                 "bnport": __version__})


def _bench_result(c: Candidate, bench: Benchmark, pairs, fprs, npy: Path, bootstrap: int, seed: int,
                  seconds: float, labels_file: Path) -> BenchResult:
    m = _metrics(pairs, fprs, bootstrap=bootstrap, seed=seed)
    accuracy = pairs.extra.get("accuracy")
    if accuracy is not None:
        accuracy = accuracy if isinstance(accuracy, dict) else accuracy.to_dict()
        accuracy = (100 * float(accuracy["accuracy"]), 100 * float(accuracy["std"]))
    return BenchResult(model=c.label, bench=bench.name, n_genuine=m["n_genuine"], n_impostor=m["n_impostor"],
                       tpr=m["tpr"], noisy=m["noisy"], achieved_fpr=m["achieved_fpr"], thresholds=m["thresholds"],
                       intervals=m["intervals"], accuracy=accuracy, scores_file=str(npy), seconds=seconds,
                       extra={"labels_file": str(labels_file)})


def _write_tables(result: ScoreResult) -> None:
    from bnport.score.format import format_score_markdown, format_score_table

    out = result.out_dir
    text = format_score_table(result.table)
    if result.selection is not None:
        text += "\n\n" + "\n".join(result.selection.lines())
    atomic_write_bytes(out / "table.txt", (text + "\n").encode())
    atomic_write_json(out / "table.json", result.to_dict())
    atomic_write_bytes(out / "table.md", format_score_markdown(result).encode())


def command_line() -> str:
    """The command as the user typed it (for report.md's reproduce line)."""
    return " ".join(shlex.quote(a) for a in ["bnport", *sys.argv[1:]])
