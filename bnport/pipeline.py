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


def run_pipeline(config: PipelineConfig, *, progress: bool = True, log=None, command: str | None = None
                 ) -> PipelineResult:
    """Run calibrate -> score -> select -> handoff -> report as `config` says; see the module docstring."""
    from bnport.calibrate.engine import calibrate
    from bnport.calibrate.run_record import run_differences
    from bnport.model.resolve import resolve_model
    from bnport.runs import Run
    from bnport.score.scoring import score

    began = time.perf_counter()
    log = log or (lambda message: print(message, file=sys.stderr))
    out = config.out
    run = Run(out)
    # everything the score step takes is checked now: a typo must not wait for the end of a calibration
    score_settings = config.score.with_benchmarks()
    loaded = resolve_model(config.spec, config.model)
    if run.exists():
        differ = run_differences(run, loaded, config.data, config.calibrate)
        if differ:
            raise BnportError(f"{out} holds a run made with other settings than this config ({', '.join(differ)} "
                              "differ)", "set another out folder, or delete that run to calibrate anew")
    calibrated = True
    if run.exists() and run.status == "complete":
        calibrated = False
        log(f"calibration: {out} is complete ({len(run.snapshots())} snapshots, same settings); going on to scoring")
    else:
        resume = run.exists()
        if resume:
            log(f"calibration: resuming the run in {out} from its last complete snapshot")
        calibrate(loaded, config.data, out, config.calibrate, device=config.device, resume=resume, progress=progress,
                  log=log)
    result = score([str(out)], score_settings, export=config.export, precision=config.precision,
                   device=config.device, out=run.score_dir, command=command, progress=progress, log=log)
    files = make_report(run, out / "report", log=log)
    return PipelineResult(out=out, calibrated=calibrated, score=result, report_files=files, handoff=result.handoff,
                          seconds=time.perf_counter() - began)


def make_report(run, out_dir: Path, *, log=None, ood: str | Path | None = None, analysis_images: int = 32
                ) -> list[Path]:
    """Draw the report of `run` into `out_dir` and copy it into the run's handoff bundle when there is one; `ood`
    and `analysis_images` as bnport.report.data.report_data takes them."""
    from bnport.report.data import report_data
    from bnport.report.write import write_report

    data = report_data(run, ood=ood, analysis_images=analysis_images)
    files = write_report(data, out_dir)
    bundle = run.score_dir / "handoff"
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


def demo_config(out: str | Path | None = None, *, device: str = "auto") -> PipelineConfig:
    """The pipeline on the embedded demo model: 30 ema steps with blur and fractal noise, a snapshot every 6 steps
    (the baseline plus 5), both committed benchmarks, selection by strict TPR@1e-3 on pairs.csv (its 10,000
    impostor pairs make 1e-3 the lowest FPR that is not noise)."""
    from bnport.demo import demo_files

    files = demo_files()
    out = Path(out) if out is not None else Path("bnport-demo")
    data = {
        "out": str(out.resolve()),
        "device": device,
        "model": {"spec": files.model, "weights": str(files.weights)},
        "calibrate": {"data": str(files.calibration), "noise": ["blur:p=0.2,sigma=1-2", "fractal:ratio=0.1"],
                      "mode": "ema", "momentum": 0.1, "batch_size": 32, "steps": 30, "snapshot_every": 6,
                      "workers": 0},
        # flip=off: a mirrored digit is another glyph (a face is not), so insightface's flip sum would blur them
        "score": {"bench": [f"{spec},flip=off" for spec in files.bench_specs], "fpr": [1e-4, 1e-3, 1e-2, 1e-1],
                  "select": "tpr@1e-3,bench=pairs",
                  "cache_dir": str(out.resolve() / "cache")},
    }
    return parse_config(data, base=Path.cwd())
