"""`bnport run CONFIG.toml` and `bnport demo`: the whole pipeline in one call, resumable.

calibrate (resumed when the run folder holds an unfinished run, skipped when it is complete) -> score (every snapshot
exported behind the parity gate; exports and per-pair scores cached in the run, so a second call redoes nothing) ->
selection -> handoff bundle -> report (plots and report.md, also copied into the bundle). The output folder `out` is
the run folder: `out/run.json`, `out/snapshots/`, `out/exports/`, `out/score/` (tables, scores, `handoff/`) and
`out/report/`. `demo` runs the same on the embedded model and data in bnport/demo/.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bnport.atomic import atomic_replace_dir
from bnport.config import PipelineConfig, parse_config
from bnport.errors import BnportError


@dataclass
class PipelineResult:
    """What a pipeline run did: the calibration (None when the run was already complete), the score, the report
    files and the bundle."""

    out: Path
    calibrated: bool
    score: object
    report_files: list[Path] = field(default_factory=list)
    handoff: Path | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [self.score.format(bundle=False)]
        if self.report_files:
            lines.append(f"report: {self.report_files[-1]} ({len(self.report_files) - 1} plots beside it)")
        lines += self.notes
        lines.append(f"done in {self.seconds:.0f}s")
        if self.handoff is not None:
            lines.append(f"handoff bundle: {self.handoff}")
        return "\n".join(lines)


@dataclass
class Calibration:
    """One calibration of a pipeline: its recipe `name` (None for a single run), its run folder, data and settings."""

    name: str | None
    run: object  # bnport.runs.Run
    data: str
    settings: object  # bnport.calibrate.settings.CalibrationSettings


def calibrations(config: PipelineConfig) -> list[Calibration]:
    """The runs `config` makes: OUT itself, or OUT/recipes/NAME per `[[calibrate.recipe]]`. A folder laid out the
    other way is refused before anything is written."""
    from bnport.runs import Run

    out = config.out
    if not config.recipes:
        if not (out / "run.json").is_file() and (out / "recipes").is_dir():
            raise BnportError(f"{out} holds a recipe comparison (recipes/), and this config has no recipe",
                              "set another out folder, or add the [[calibrate.recipe]] tables it was made with")
        return [Calibration(None, Run(out), config.data, config.calibrate)]
    if (out / "run.json").is_file():
        raise BnportError(f"{out} holds a single run, and this config compares recipes (they go in {out}/recipes/)",
                          "set another out folder for the recipe comparison")
    return [Calibration(r.name, Run(out / "recipes" / r.name), r.data, r.calibrate) for r in config.recipes]


def run_pipeline(config: PipelineConfig, *, progress: bool = True, log=None, command: str | None = None
                 ) -> PipelineResult:
    """Run calibrate -> score -> select -> handoff -> report as `config` says; see the module docstring."""
    from bnport.model.resolve import resolve_model
    from bnport.score.scoring import score

    began = time.perf_counter()
    log = log or (lambda message: print(message, file=sys.stderr))
    # everything the score step takes is checked now: a typo must not wait for the end of a calibration
    score_settings = config.score.with_benchmarks()
    loaded = resolve_model(config.spec, config.model)
    runs = calibrations(config)
    calibrated = _calibrate_all(loaded, runs, config, progress=progress, log=log)
    score_dir = config.out / "score"
    result = score(score_targets(runs), score_settings, export=config.export, precision=config.precision,
                   device=config.device, out=score_dir, command=command, progress=progress, log=log)
    run, recipes = report_runs(config.out)
    files = make_report(run, config.out / "report", log=log, score_dir=score_dir, recipes=recipes)
    return PipelineResult(out=config.out, calibrated=calibrated, score=result, report_files=files,
                          handoff=result.handoff, seconds=time.perf_counter() - began)


def _calibrate_all(loaded, runs: list[Calibration], config: PipelineConfig, *, progress: bool, log) -> bool:
    """Calibrate (or resume) every run that is not complete; every run's settings are checked against its folder
    first. Returns whether any calibration ran."""
    from bnport.calibrate.engine import calibrate
    from bnport.calibrate.run_record import run_differences

    for c in runs:
        if c.run.exists():
            differ = run_differences(c.run, loaded, c.data, c.settings)
            if differ:
                raise BnportError(f"{c.run.path} holds a run made with other settings than this config "
                                  f"({', '.join(differ)} differ)",
                                  "set another out folder, or delete that run to calibrate anew")
        elif c.name:  # a recipe's data and noise sources, checked before the first recipe's calibration starts
            if not Path(c.data).expanduser().exists():
                raise BnportError(f"recipe {c.name!r}: data path not found: {c.data}", "fix calibrate.data")
            try:
                c.settings.sources()
            except BnportError as e:
                raise BnportError(f"recipe {c.name!r}: {e.message}", e.hint) from None
    calibrated = False
    for c in runs:
        what = f"calibration{f' ({c.name})' if c.name else ''}"
        if c.run.exists() and c.run.status == "complete":
            log(f"{what}: {c.run.path} is complete ({len(c.run.snapshots())} snapshots, same settings); "
                "going on to scoring")
            continue
        if c.run.exists():
            log(f"{what}: resuming the run in {c.run.path} from its last complete snapshot")
        elif c.name:
            log(f"{what}: {c.settings.mode} mode, noise {', '.join(map(str, c.settings.noise)) or 'none'}")
        calibrate(loaded, c.data, c.run.path, c.settings, device=config.device, resume=c.run.exists(),
                  progress=progress, log=log)
        calibrated = True
    return calibrated


def score_targets(runs: list[Calibration]) -> list[str]:
    """What the score step scores: the run; with recipes, the first recipe's run (its baseline is every recipe's
    baseline: the same model and weights) and the other recipes' snapshots after their baseline."""
    targets = [str(runs[0].run.path)]
    for c in runs[1:]:
        targets += [str(s.tensors) for s in c.run.snapshots() if s.index > 0]
    return targets


def report_runs(folder: str | Path):
    """(the run whose snapshots the report analyses, the recipe runs in table order ([] for a single run)) of
    `folder`: a run, or the OUT of a recipe comparison, whose analysed run is the one holding the selected model."""
    from bnport.runs import Run

    folder = Path(folder)
    if (folder / "run.json").is_file() or not (folder / "recipes").is_dir():
        return Run.open(folder), []
    runs = {p.name: Run(p) for p in sorted((folder / "recipes").iterdir()) if (p / "run.json").is_file()}
    if not runs:
        raise BnportError(f"{folder}/recipes holds no run", "run bnport run CONFIG.toml with its recipes first")
    table_path = folder / "score" / "table.json"
    table = json.loads(table_path.read_text()) if table_path.is_file() else {}
    order = [Path(m["run"]).name for m in table.get("models", []) if m.get("run")]
    # the recipes the table scored (a recipe since dropped from the config keeps its folder, not its place here)
    recipes = [runs[name] for name in dict.fromkeys(order) if name in runs] or list(runs.values())
    selection = table.get("selection") or {}
    chosen = next((m for m in table.get("models", [])
                   if m["label"] in (selection.get("selected"), selection.get("final")) and m.get("run")), None)
    run = runs.get(Path(chosen["run"]).name, recipes[0]) if chosen else recipes[0]
    return run, recipes


def make_report(run, out_dir: Path, *, log=None, ood: str | Path | None = None, analysis_images: int = 32,
                score_dir: Path | None = None, recipes: list | None = None) -> list[Path]:
    """Draw the report of `run` (with `recipes`, of a recipe comparison whose tables are in `score_dir`) into
    `out_dir` and copy it into the handoff bundle when there is one; `ood` and `analysis_images` as
    bnport.report.data.report_data takes them."""
    from bnport.report.data import report_data
    from bnport.report.write import write_report

    score_dir = Path(score_dir) if score_dir is not None else run.score_dir
    data = report_data(run, score_dir=score_dir, ood=ood, analysis_images=analysis_images, recipes=recipes)
    files = write_report(data, out_dir)
    bundle = score_dir / "handoff"
    if bundle.is_dir():
        shipped = json.loads((bundle / "model.json").read_text()).get("model", {}).get("label")
        selected = ((data.table or {}).get("selection") or {}).get("final")
        if shipped == selected:
            attach_report(bundle, files)
        elif log is not None:
            log(f"note: the report was not copied into {bundle}: the bundle holds {shipped}, while the score table "
                f"selects {selected}; re-run bnport score to rebuild the bundle")
    return files


def attach_report(bundle: Path, files: list[Path]) -> None:
    """Put the report's plots and report.md into the bundle (the score tables' report.md is kept as scores.md),
    replacing the bundle in one rename so it is never seen half-updated."""
    def fill(tmp: Path) -> None:
        for f in bundle.iterdir():
            target = tmp / ("scores.md" if f.name == "report.md" and not (bundle / "scores.md").exists() else f.name)
            shutil.copy2(f, target)
        for f in files:
            shutil.copy2(f, tmp / Path(f).name)

    atomic_replace_dir(bundle, fill)


DEMO_RECIPES = (("blur", ["blur:p=0.2,sigma=1-2"]), ("noise-images", ["gauss-append:ratio=0.1,std=1"]),
                ("fractal", ["fractal:ratio=0.1"]))


def demo_config(out: str | Path | None = None, *, device: str = "auto") -> PipelineConfig:
    """The pipeline on the embedded demo model: three calibration recipes compared (blurred images, Gaussian-noise
    images, fractals; 30 ema steps each, a snapshot every 10), both committed benchmarks, one selection across them by
    strict TPR@1e-3 on pairs.csv (its 10,000 impostor pairs make 1e-3 the lowest FPR that is not noise), a win
    counting only when its paired interval clears 0."""
    from bnport.demo import demo_files

    files = demo_files()
    out = Path(out) if out is not None else Path("bnport-demo")
    data = {
        "out": str(out.resolve()),
        "device": device,
        "model": {"spec": files.model, "weights": str(files.weights)},
        "calibrate": {"data": str(files.calibration), "mode": "ema", "momentum": 0.1, "batch_size": 32,
                      "steps": 30, "snapshot_every": 10, "workers": 0,
                      "recipe": [{"name": name, "noise": noise} for name, noise in DEMO_RECIPES]},
        # flip=off: a mirrored digit is another glyph (a face is not), so insightface's flip sum would blur them
        "score": {"bench": [f"{spec},flip=off" for spec in files.bench_specs], "fpr": [1e-4, 1e-3, 1e-2, 1e-1],
                  "select": "tpr@1e-3,bench=pairs",
                  "cache_dir": str(out.resolve() / "cache")},
    }
    return parse_config(data, base=Path.cwd())
