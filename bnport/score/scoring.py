"""`bnport score`: the baseline and every snapshot of a run (or any ONNX files and MODEL specs) on onnxruntime over
face-verification benchmarks, one table of TPR@FPR, a stated selection rule, and the handoff bundle.

Steps: resolve the targets into candidates (bnport.score.candidates: snapshots exported behind the parity gate and
cached in the run), decode each benchmark once into a cache (bnport.score.cache), run every candidate over it
(bnport.score.embed), turn features into per-pair scores (bnport.score.bench) and scores into metrics
(bnport.score.metrics), select (bnport.score.select) and write the outputs. What to measure and how to choose is a
`ScoreSettings` (bnport.score.settings), checked once. Under `torchrun` the images are sharded across ranks and the
features gathered on rank 0, which alone exports, scores and writes: the table and the `.npy` files equal a single
process's.

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
from bnport.export.settings import ExportSettings, PrecisionSettings
from bnport.model.options import ModelOptions
from bnport.score.bench import Benchmark
from bnport.score.candidates import Candidate, measure_latency, resolve_targets, with_precisions
from bnport.score.select import Selection, choose_precision, select_model
from bnport.score.settings import ScoreSettings
from bnport.score.table import BenchResult, ScoreTable, fpr_label


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
    operating: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"out": str(self.out_dir), "handoff": str(self.handoff) if self.handoff else None,
                "selection": self.selection.to_dict() if self.selection else None, "notes": self.notes,
                "operating_point": self.operating,
                "seconds": round(self.seconds, 3), **self.table.to_dict()}

    def __str__(self) -> str:
        return self.format()

    def format(self, *, bundle: bool = True) -> str:
        """The table, the selection and where the outputs are; `bundle` False leaves out the bundle's line (for a
        caller that prints it last itself)."""
        from bnport.score.format import format_score_table

        lines = [*self.notes, format_score_table(self.table)]
        if self.selection is not None:
            from bnport.score.format import recipe_outcome

            lines += ["", *self.selection.lines(), *recipe_outcome(self.table, self.selection.to_dict())]
        point = self.operating.get(self.selection.bench) if self.selection is not None else None
        if point and point["threshold"] is not None:
            interval = point["interval"]
            around = f"; 95% bootstrap interval [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""
            lines.append(f"operating point on {self.selection.bench}: cosine >= {point['threshold']:.4f} gives FPR "
                         f"{point['achieved_fpr']:.2e} (target {point['fpr_target']:g}) and TPR "
                         f"{100 * point['tpr']:.2f}{around}")
        lines.append("")
        lines.append(f"table: {self.out_dir / 'table.txt'} (.json, .md); per-pair scores: {self.out_dir / 'scores'}")
        if self.handoff is not None and bundle:
            lines.append(f"handoff bundle: {self.handoff}")
        return "\n".join(lines)


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
                                      "scores": bench.scores_identity(), "format": 1},
                                     sort_keys=True).encode()).hexdigest()[:20]


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


def score(targets: list[str], settings: ScoreSettings, *, export: ExportSettings | None = None,
          precision: PrecisionSettings | None = None, model_options: ModelOptions | None = None,
          device: str = "auto", out: str | Path | None = None, command: str | None = None, progress: bool = True,
          log=None) -> ScoreResult:
    """Score `targets` (run folders, snapshots, .onnx files, MODEL specs) as `settings` say (its benchmarks are read
    here unless they were already).

    `export`: how snapshots and MODEL specs are exported (None: ExportSettings()); `precision`: how lower-precision
    files are made (None: PrecisionSettings()); `model_options`: load and input-spec options for MODEL / .onnx
    targets, and `weights`, the new place of a run's weights file when it moved (None: ModelOptions()). `device`:
    onnxruntime device (auto|cpu|cuda). `out`: the output folder (None: RUN/score for a run, ./bnport-score
    otherwise). `command`: the command line recorded in the bundle.
    """
    import torch

    from bnport.runtime.distributed import join_process_group
    from bnport.runtime.sessions import resolve_device

    began = time.perf_counter()
    log = log or (lambda message: print(message, file=sys.stderr))
    # scoring's collectives carry Python objects only, so a CPU (gloo) group serves on every machine; the ONNX
    # sessions run on CUDA or CPU independently of it
    ranks = join_process_group(torch.device("cpu"))
    rank, world = ranks.rank, ranks.world
    quiet = (lambda message: None) if rank else log
    try:
        settings = settings.with_benchmarks()
        ort_device, device_note = resolve_device(device)
        export = export or ExportSettings()

        def prepare():
            found = resolve_targets(list(targets), Path(out) if out else None, export, model_options or ModelOptions(),
                                    device=device, log=quiet)
            found.candidates = with_precisions(found.candidates, settings.precisions, precision or PrecisionSettings(),
                                               parity_data=export.parity_data, device=device, log=quiet)
            if settings.measure_latency:
                measure_latency(found.candidates, ort_device, settings.latency_runs, quiet)
            return found

        found = _on_rank0(prepare, rank, world)
        results, providers, session_settings = _score_candidates(found, settings, device=device, progress=progress,
                                                                 rank=rank, world=world, log=quiet)
        if rank == 0 and settings.bootstrap and settings.rule.metric == "tpr":
            _attach_paired(results, found, settings)
        if rank != 0:
            return ScoreResult(table=ScoreTable(list(settings.fprs), [], [], [], providers), selection=None,
                               out_dir=found.out_dir, handoff=None, candidates=found.candidates)
        if not providers:  # every score came from the cache: name what this call would have used
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if ort_device == "cuda" else \
                ["CPUExecutionProvider"]
        table = ScoreTable(fprs=list(settings.fprs), benches=[b.to_dict() for b in settings.benches],
                           models=[c.to_dict() for c in found.candidates], results=results, providers=providers,
                           device_note=device_note, session_settings=session_settings)
        result = _select_and_write(table, found, settings, command=command)
        result.seconds = time.perf_counter() - began
        return result
    finally:
        ranks.close()


def _score_candidates(found, settings: ScoreSettings, *, device: str, progress: bool, rank: int, world: int,
                      log) -> tuple[list[BenchResult], list[str], dict]:
    """Every passed candidate on every benchmark (each decoded once first): results (rank 0, in candidate order),
    the providers that ran and the scoring sessions' settings. Per-pair scores computed by an earlier call in the
    same folder are reused; so are embeddings cached by any earlier call (bnport.score.embeddings). The candidates
    that need inference on one benchmark run together, each batch prepared once for all of them."""
    scored = [c for c in found.candidates if c.passed]
    decoded = {}
    for bench in settings.benches:  # every image decoded once, before any model runs
        for size in sorted({(c.input_spec.height, c.input_spec.width) for c in scored}):
            decoded[bench.name, size] = _on_rank0(lambda b=bench, s=size: _decode(b, s, settings, progress, log),
                                                  rank, world)
    scores_dir = found.out_dir / "scores"
    slugs = _unique_slugs([c.label for c in found.candidates])
    bench_slugs = _unique_slugs([b.name for b in settings.benches])
    if rank == 0:  # the labels of this call's benchmarks, written anew: a benchmark may have changed
        for bench in settings.benches:
            atomic_write_bytes(scores_dir / f"{bench_slugs[bench.name]}.labels.npy", _npy_bytes(bench.labels()))
    run = _Inference(settings, device=device, progress=progress, rank=rank, world=world)
    results: dict[tuple[str, str], BenchResult] = {}
    for (bench_name, size), cache in decoded.items():
        bench = next(b for b in settings.benches if b.name == bench_name)
        labels_file = scores_dir / f"{bench_slugs[bench.name]}.labels.npy"
        pending = []
        for c in (c for c in scored if (c.input_spec.height, c.input_spec.width) == size):
            key = _scores_key(c, bench, cache.key)
            npy = scores_dir / f"{slugs[c.label]}__{bench_slugs[bench.name]}.npy"
            pairs = _cached_pairs(npy, key, bench) if rank == 0 else None
            if _on_rank0(lambda p=pairs: p is not None, rank, world):
                if rank == 0:
                    results[c.label, bench.name] = _bench_result(c, bench, pairs, settings, npy, 0.0, labels_file)
            else:
                pending.append((c, key, npy))
        began = time.perf_counter()
        features = run.features([c for c, _, _ in pending], bench, cache)
        seconds = (time.perf_counter() - began) / max(1, len(pending))
        for (c, key, npy), rows in zip(pending, features):
            if rank == 0:
                pairs = bench.score_pairs(rows)
                _save_pairs(npy, key, pairs, c, bench)
                results[c.label, bench.name] = _bench_result(c, bench, pairs, settings, npy, seconds, labels_file)
    ordered = [results[c.label, b.name] for c in scored for b in settings.benches if (c.label, b.name) in results]
    startup = {"sessions": run.started, "startup_seconds": round(run.startup, 3)} if run.started else {}
    return ordered, run.providers, {**run.session_settings, **startup}


class _Inference:
    """Features of candidates on a benchmark's decoded images: from the embedding cache, else by running every
    candidate that lacks them in one pass (bnport.score.embed.embed_many), written into the cache. Under torchrun
    each rank runs its contiguous share of the images and rank 0 gathers them, in order."""

    def __init__(self, settings: ScoreSettings, *, device: str, progress: bool, rank: int, world: int):
        from bnport.score.embeddings import EmbeddingCache

        self.settings, self.device, self.progress, self.rank, self.world = settings, device, progress, rank, world
        self.cache = EmbeddingCache(settings.cache_dir)
        self.providers: list[str] = []
        self.session_settings: dict = {}
        self.startup = 0.0  # seconds spent starting sessions
        self.started = 0

    def features(self, candidates: list[Candidate], bench: Benchmark, decoded) -> list[np.ndarray | None]:
        """One array per candidate (rank 0; None elsewhere)."""
        keys = [self.cache.key(c.sha256, decoded.key, bench.flip) for c in candidates]
        cached = [self.cache.load(bench.name, k, len(decoded.images)) if self.rank == 0 else None for k in keys]
        todo = [i for i, rows in enumerate(cached) if not _on_rank0(lambda r=rows: r is not None, self.rank,
                                                                     self.world)]
        for spec in dict.fromkeys(candidates[i].input_spec for i in todo):  # one pass per input spec
            group = [i for i in todo if candidates[i].input_spec == spec]
            made = self._run([candidates[i] for i in group], [keys[i] for i in group], bench, decoded)
            for i, rows in zip(group, made):
                cached[i] = rows
        return cached

    def _run(self, candidates: list[Candidate], keys: list[str], bench: Benchmark, decoded) -> list:
        from bnport.runtime.sessions import create_session, scoring_use
        from bnport.score.embed import embed_many

        n = len(decoded.images)
        began = time.perf_counter()
        use = scoring_use(n * (2 if bench.flip else 1))
        sessions = [create_session(c.onnx, device=self.device, use=use) for c in candidates]
        self.startup += time.perf_counter() - began
        self.started += len(sessions)
        for session in sessions:
            self.providers += [p for p in session.providers if p not in self.providers]
            self.session_settings = session.settings
        start, stop = self.rank * n // self.world, (self.rank + 1) * n // self.world
        writers = [self.cache.writer(bench.name, k) for k in keys] if self.world == 1 else None
        desc = f"{candidates[0].label} on {bench.name}" if len(candidates) == 1 else \
            f"{len(candidates)} models on {bench.name}"
        try:
            rows = embed_many(sessions, decoded.images, candidates[0].input_spec, flip=bench.flip,
                              batch_size=self.settings.batch_size, start=start, stop=stop,
                              out=[w.allocate for w in writers] if writers else None,
                              progress=self.progress and self.rank == 0, desc=desc)
        except BaseException:
            for writer in writers or []:
                writer.discard()
            raise
        if writers is not None:
            return [w.commit(_embedding_info(c, bench)) for w, c in zip(writers, candidates)]
        gathered = _gather(rows, self.rank, self.world)
        if self.rank != 0:
            return [None] * len(candidates)
        out = []
        for c, k, features in zip(candidates, keys, gathered):
            writer = self.cache.writer(bench.name, k)
            writer.allocate(*features.shape)[:] = features
            out.append(writer.commit(_embedding_info(c, bench)))
        return out


def _embedding_info(c: Candidate, bench: Benchmark) -> dict:
    return {"model": c.label, "onnx": str(c.onnx), "onnx_sha256": c.sha256, "bench": bench.name, "flip": bench.flip,
            "bnport": __version__}


def _gather(rows: list[np.ndarray], rank: int, world: int) -> list[np.ndarray] | None:
    """Each candidate's rows from every rank, concatenated in rank order on rank 0."""
    import torch.distributed as dist

    shards = [None] * world if rank == 0 else None
    dist.gather_object(rows, shards, dst=0)
    if rank != 0:
        return None
    out = []
    for k in range(len(rows)):
        parts = [shard[k] for shard in shards]
        width = max(p.shape[1] for p in parts if p.size)
        out.append(np.concatenate([p if p.size else np.zeros((0, width), np.float32) for p in parts]))
    return out


def _attach_paired(results: list[BenchResult], found, settings: ScoreSettings) -> None:
    """Each float32 model's strict TPR at the rule's FPR on the rule's benchmark minus the baseline's, with its paired
    bootstrap interval (bnport.score.paired), in the model's result as `extra["paired"]`."""
    from bnport.score.paired import paired_tpr_deltas
    from bnport.score.select import check_rule

    bench_name = check_rule(settings.rule, [b.to_dict() for b in settings.benches])
    bench = next(b for b in settings.benches if b.name == bench_name)
    fp32 = [c.label for c in found.candidates if c.passed and c.precision == "fp32"]
    mine = {r.model: r for r in results if r.bench == bench_name and r.model in fp32}
    baseline = found.baseline if found.baseline in mine else next(iter(mine), None)
    if baseline is None or len(mine) < 2:
        return
    release = getattr(bench, "release", None)
    deltas = paired_tpr_deltas({label: np.load(r.scores_file) for label, r in mine.items()}, bench.labels(),
                               baseline, settings.rule.fpr, clusters=release.pairs if release is not None else None,
                               replicates=settings.bootstrap, seed=settings.seed)
    for label, delta in deltas.items():
        mine[label].extra["paired"] = {"vs": baseline, "fpr": fpr_label(settings.rule.fpr),
                                       "units": "templates" if release is not None else "pairs", **delta.to_dict()}


def _select_and_write(table: ScoreTable, found, settings: ScoreSettings, *, command: str | None) -> ScoreResult:
    """Select by the rule, choose the precision, write the tables and the bundle (or remove a stale one)."""
    candidates, out_dir = found.candidates, found.out_dir
    selection = select_model(table, settings.rule, guard=settings.guard, baseline=found.baseline) \
        if candidates else None
    if selection is not None and len(settings.precisions) > 1:
        choose_precision(table, selection, max_drop=settings.max_drop)
    result = ScoreResult(table=table, selection=selection, out_dir=out_dir, handoff=None, candidates=candidates,
                         notes=found.notes)
    _write_tables(result)
    if settings.handoff and selection is not None and selection.handoff is not None:
        from bnport.score.format import format_score_markdown, recipe_outcome
        from bnport.score.handoff import write_handoff

        from bnport.score.operating import usage_lines

        chosen = next(c for c in candidates if c.label == selection.handoff)
        result.operating = _operating_points(table, selection, settings)
        point = result.operating.get(selection.bench)
        result.handoff = write_handoff(out_dir / "handoff", chosen, table=table, selection=selection,
                                       markdown=format_score_markdown(result, command=command),
                                       command=command or "",
                                       extra_card={"precisions": _precisions_tried(table, selection),
                                                   "recipes": recipe_outcome(table, selection.to_dict())
                                                   or None,
                                                   "operating_point": result.operating,
                                                   "operating_point_usage": usage_lines(point, selection.bench)
                                                   if point and point["threshold"] is not None else None})
    elif (out_dir / "handoff").exists():  # an older bundle would contradict the table just written beside it
        import shutil

        shutil.rmtree(out_dir / "handoff")
        result.notes.append(f"note: removed the previous handoff bundle in {out_dir / 'handoff'}: it no longer "
                            "matches table.json" + (" (--no-handoff)" if not settings.handoff else
                                                    " (no model passed parity)"))
    return result


def operating_fpr(table: ScoreTable, selection: Selection) -> float:
    """The FPR the handoff states its threshold at: the rule's, or for a rule without one (acc, tpir) the table's
    FPR nearest bnport.score.operating.OPERATING_FPR."""
    from bnport.score.operating import OPERATING_FPR

    if selection.rule.metric == "tpr":
        return selection.rule.fpr
    return min(table.fprs, key=lambda f: abs(np.log10(f) - np.log10(OPERATING_FPR)))


def _precisions_tried(table: ScoreTable, selection: Selection) -> dict:
    """For the card: every precision of the selected snapshot, its file, gate, latency, rule figure and its
    threshold at the operating FPR on the selection benchmark, with the shift from float32's."""
    fpr = fpr_label(operating_fpr(table, selection))
    out = {}
    for model in table.models:
        if (model.get("base") or model["label"]) != selection.selected:
            continue
        precision = model.get("precision", "fp32")
        result = table.result(model["label"], selection.bench)
        value = result.value(selection.rule.metric, selection.rule.rule, selection.rule.fpr) if result else None
        threshold = result.thresholds.get("strict", {}).get(fpr) if result else None
        out[precision] = {"label": model["label"], "file": model["onnx"], "passed": model["passed"],
                          "latency_ms": (model.get("latency") or {}).get("median_ms"), "rule": selection.rule.short(),
                          "value": value, "reason": selection.precision_reasons.get(precision, ""),
                          "threshold": threshold, "threshold_at_fpr": fpr}
    base = (out.get("fp32") or {}).get("threshold")
    for entry in out.values():
        entry["threshold_shift"] = entry["threshold"] - base if None not in (entry["threshold"], base) else None
    return out


def _operating_points(table: ScoreTable, selection: Selection, settings: ScoreSettings) -> dict:
    """For the card: the shipped file's operating point on every benchmark at the operating FPR."""
    from bnport.score.operating import DEFAULT_REPLICATES, operating_point

    fpr = operating_fpr(table, selection)
    replicates = settings.bootstrap or DEFAULT_REPLICATES
    return {r.bench: operating_point(r, fpr, replicates=replicates, seed=settings.seed)
            for r in table.results if r.model == selection.handoff}


def _decode(bench: Benchmark, size, settings: ScoreSettings, progress: bool, log):
    from bnport.score.cache import decoded_images

    return decoded_images(bench, size, cache_dir=settings.cache_dir, workers=settings.workers, progress=progress,
                          log=log)


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


def _bench_result(c: Candidate, bench: Benchmark, pairs, settings: ScoreSettings, npy: Path, seconds: float,
                  labels_file: Path) -> BenchResult:
    m = _metrics(pairs, list(settings.fprs), bootstrap=settings.bootstrap, seed=settings.seed)
    accuracy = pairs.extra.get("accuracy")
    if accuracy is not None:
        accuracy = accuracy if isinstance(accuracy, dict) else accuracy.to_dict()
        accuracy = (100 * float(accuracy["accuracy"]), 100 * float(accuracy["std"]))
    return BenchResult(model=c.label, bench=bench.name, n_genuine=m["n_genuine"], n_impostor=m["n_impostor"],
                       tpr=m["tpr"], noisy=m["noisy"], achieved_fpr=m["achieved_fpr"], thresholds=m["thresholds"],
                       intervals=m["intervals"], accuracy=accuracy,
                       identification=pairs.extra.get("identification"), scores_file=str(npy), seconds=seconds,
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
