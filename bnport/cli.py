"""The `bnport` command line: a thin Click layer. Each command parses its options, builds the settings objects of the
stages it calls (each option group is a settings class's declared `SETTINGS`: bnport.options), makes one library call
and prints the result. A `BnportError` becomes one line on stderr and exit status 1; a bad option value, or options
that contradict each other, a usage error and exit status 2."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import click

from bnport import __version__
from bnport.calibrate.settings import DATA, CalibrationSettings
from bnport.errors import BnportError
from bnport.export.settings import PRECISIONS, ExportSettings, PrecisionSettings
from bnport.model.options import ModelOptions
from bnport.options import Setting
from bnport.runtime.sessions import DEVICE_CHOICES
from bnport.score.settings import ScoreSettings


class BnportGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BnportError as e:
            if os.environ.get("RANK", "0") == "0":  # under torchrun every rank raises it; one line is enough
                click.echo(f"bnport: error: {e}", err=True)
            ctx.exit(1)


@click.group(cls=BnportGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="bnport")
def cli() -> None:
    """bnport: recalibrate BatchNorm, fold it exactly, export verified ONNX, score it, hand it off."""


def main() -> None:
    cli(prog_name="bnport")


def option_group(*decorators):
    """One decorator for options several commands share: applies Click decorators as if stacked in this order."""
    def apply(func):
        for decorator in reversed(decorators):
            func = decorator(func)
        return func
    return apply


def checked_by(parse):
    """A Click callback that checks an option's text with a library parser, so a bad value is a usage error (exit
    2) naming the option, before anything runs; the text itself is passed on unchanged."""
    def callback(ctx, param, value):
        if value is not None:
            try:
                parse(value)
            except BnportError as e:
                raise click.BadParameter(str(e)) from None
        return value
    return callback


def _fprs(text):
    """--fpr's text as the list of numbers the setting holds (a bad list is a usage error)."""
    from bnport.score.settings import parse_fprs

    try:
        return None if text is None else parse_fprs(text)
    except BnportError as e:
        raise click.BadParameter(str(e)) from None


def setting_option(s: Setting, *names: str, **extra):
    """A Click option built from the declared setting `s`: the same default, type, range and help as the TOML key of
    `bnport run`."""
    kw: dict = {"default": s.default, "help": s.help[0].upper() + s.help[1:] + ".",
                "show_default": s.default not in (None, [], False)}
    if s.choices:
        kw["type"] = click.Choice(s.choices)
    elif s.kind == "int":
        kw["type"] = click.IntRange(min=s.minimum, max=s.maximum) if s.minimum is not None else int
    elif s.kind == "float":
        kw["type"] = click.FloatRange(min=s.minimum, max=s.maximum, min_open=s.open_minimum) \
            if s.minimum is not None else float
    elif s.kind == "bool":
        kw["is_flag"] = True
    elif s.kind == "list[str]":
        kw.update(multiple=True, default=(), show_default=False)
    kw.update(extra)
    return click.option(*(names or (s.option,)), **kw)


def options_of(cls, **extra: dict):
    """The options of a settings class, in declared order; `extra` maps a key to more Click arguments for it."""
    return option_group(*(setting_option(s, **extra.get(s.key, {})) for s in cls.SETTINGS))


def build(cls, values: dict):
    """`cls` from the options it declares, taken out of `values`; a value it refuses is a usage error (exit 2)."""
    mine = {s.key: values.pop(s.key) for s in cls.SETTINGS if s.key in values}
    try:
        return cls.from_values(mine)
    except BnportError as e:
        raise click.UsageError(str(e)) from None


def _size(text):
    from bnport.data.transforms import parse_size

    return parse_size(text)


def _floats(text):
    from bnport.data.transforms import _triple, parse_floats

    return _triple(parse_floats(text))


MODEL_EXTRA = {"weights": {"type": click.Path(exists=True, dir_okay=False),
                           "help": "State dict (.pt/.pth/.safetensors); wrappers state_dict, state_dict_backbone, "
                                   "model... and a module. prefix are recognised."},
               "input_size": {"callback": checked_by(_size)}, "mean": {"callback": checked_by(_floats)},
               "std": {"callback": checked_by(_floats)}, "bgr": {"default": None}}
model_options = option_group(click.argument("model"), options_of(ModelOptions, **MODEL_EXTRA))
device_option = click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto", show_default=True,
                             help="auto = CUDA if it really works, else CPU.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
export_options = options_of(ExportSettings, parity_data={"metavar": "SRC"})  # the parity gate's, for export and score
precision_options = options_of(PrecisionSettings, calib_data={"metavar": "SRC"})


def _log(message: str) -> None:
    click.echo(message, err=True)


@cli.command()
@model_options
@setting_option(DATA, required=True)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@options_of(CalibrationSettings, noise={"metavar": "SPEC"})
@device_option
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last snapshot.")
@json_option
def calibrate(model: str, data: str, out: str, device: str, resume: bool, as_json: bool, **kw) -> None:
    """Re-estimate BatchNorm statistics of MODEL on --data mixed with noise, saving BN-only snapshots in --out.

    Every parameter stays frozen; only BN layers run in train mode. Snapshot 0000 is the untouched baseline.
    """
    from bnport.calibrate.engine import calibrate as run_calibration

    from bnport.model.resolve import resolve_model

    settings = build(CalibrationSettings, kw)
    loaded = resolve_model(model, build(ModelOptions, kw))
    result = run_calibration(loaded, data, out, settings, device=device, resume=resume, log=_log)
    if as_json:
        click.echo(json.dumps({"run": str(result.run_dir), "snapshots": result.snapshots, "steps": result.steps,
                               "images_seen": result.images_seen, "skipped": result.skipped,
                               "seconds": round(result.seconds, 3), "resumed_from": result.resumed_from}, indent=1))
    elif result.snapshots:
        click.echo(result.summary())


@cli.command()
@model_options
@json_option
def inspect(model: str, as_json: bool, **kw) -> None:
    """List every BatchNorm of MODEL with its producer, consumer and fold plan."""
    from bnport.export.inventory import inspect_model
    from bnport.model.resolve import resolve_model

    report = inspect_model(resolve_model(model, build(ModelOptions, kw)))
    click.echo(json.dumps(report.to_dict(), indent=1) if as_json else str(report))


@cli.command(name="export")
@model_options
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="ONNX file to write.")
@click.option("--fold-bn", is_flag=True, help="Fold every BatchNorm that folds exactly (PyTorch graph, then ONNX).")
@click.option("--static-batch", is_flag=True, help="Fix the batch dimension at 1 (default: dynamic batch).")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@export_options
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="fp16/int8: convert the verified float32 file (kept as OUT.fp32.onnx) and gate it against it.")
@precision_options
@device_option
@json_option
def export(model: str, out: str, fold_bn: bool, static_batch: bool, no_simplify: bool, precision: str, device: str,
           as_json: bool, **kw) -> None:
    """Export MODEL, or a snapshot RUN/snapshots/NNNN.safetensors, to OUT.onnx behind a parity gate.

    Dynamic batch, input `data`, onnxsim, onnx.checker; parity with PyTorch on onnxruntime over real images and
    noise, judged against the model run in float64: a value passes within the larger of --atol and 4x PyTorch
    float32's own error. Exit status 1 when parity fails: then no OUT.onnx is written, only OUT.onnx.rejected and its
    report OUT.onnx.rejected.json. With --precision int8 or fp16 the float32 file is converted (ONNX Runtime static
    QDQ quantization, or float16 weights and compute with float32 input and output) and judged against it by row
    cosine.
    """
    from bnport.export.onnx_export import export_model

    settings = dataclasses.replace(build(ExportSettings, kw), fold_bn=fold_bn, static_batch=static_batch,
                                   simplify=not no_simplify)
    report = export_model(model, out, options=build(ModelOptions, kw), settings=settings, precision=precision,
                          precision_settings=build(PrecisionSettings, kw), device=device,
                          warn=lambda message: click.echo(f"bnport: warning: {message}", err=True))
    click.echo(json.dumps(report.to_dict(), indent=1, default=str) if as_json else str(report))
    if not report:
        click.get_current_context().exit(1)


def _rule(text):
    from bnport.score.select import parse_rule

    return parse_rule(text)


def _precisions(text):
    from bnport.export.settings import parse_precisions

    return parse_precisions(text)


SCORE_EXTRA = {
    "bench": {"metavar": "SPEC", "required": True,
              "help": "Benchmark, repeatable: PATH.bin | ijbc:DIR | ijbb:DIR | pairs:FILE.csv | folder:DIR; options "
                      "after commas: flip=off, and for IJB norm=off, faceness=off."},
    "fpr": {"metavar": "LIST", "type": str, "callback": lambda ctx, param, value: _fprs(value),
            "help": "FPR targets, comma-separated (default 1e-6,1e-5,1e-4,1e-3,1e-2,1e-1)."},
    "select": {"metavar": "RULE", "callback": checked_by(_rule)}, "guard": {"metavar": "POINTS"},
    "bootstrap": {"metavar": "N"}, "cache_dir": {"type": click.Path(file_okay=False)},
    "precision": {"multiple": False, "default": "fp32", "metavar": "LIST", "callback": checked_by(_precisions),
                  "help": "Precisions to score, comma-separated: fp32,fp16,int8 (float32 always). Each file's latency "
                          "at batch 1 and 8 joins the table."},
    "max_drop": {"metavar": "POINTS"},
}
SCORE_MODEL_EXTRA = {
    "weights": {"type": click.Path(exists=True, dir_okay=False),
                "help": "State dict for a MODEL spec target, or the new location of a run's weights file if it moved "
                        "(its sha256 must match the run's)."},
    "input_size": {"callback": checked_by(_size),
                   "help": "HxW for a foreign .onnx or a MODEL spec (default: its own)."},
    "mean": {"callback": checked_by(_floats), "help": "Per-channel mean for a foreign .onnx or MODEL (default 127.5)."},
    "std": {"callback": checked_by(_floats), "help": "Per-channel std for a foreign .onnx or MODEL (default 127.5)."},
    "bgr": {"default": None, "help": "A foreign .onnx or MODEL takes BGR input."},
}


@cli.command()
@click.argument("targets", nargs=-1, required=True, metavar="RUN|MODEL.onnx|SNAPSHOT|MODEL...")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Output folder (default: RUN/score for a run, ./bnport-score otherwise).")
@options_of(ScoreSettings, **SCORE_EXTRA)
@precision_options
@click.option("--latency/--no-latency", default=None, help="Measure each file's latency (default: with --precision).")
@click.option("--no-handoff", is_flag=True, help="Do not write the handoff bundle.")
@options_of(ModelOptions, **SCORE_MODEL_EXTRA)
@export_options
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap.")
@device_option
@json_option
def score(targets: tuple[str, ...], out: str | None, latency: bool | None, no_handoff: bool, seed: int, device: str,
          as_json: bool, **kw) -> None:
    """Score the baseline and every snapshot of RUN (or ONNX files, snapshots, MODEL specs) on onnxruntime over
    face-verification benchmarks: TPR at each FPR under the strict and the insightface rule, a selection by a stated
    rule, and a handoff bundle of the selected model.

    Snapshots are exported behind the parity gate and cached in RUN/exports; a snapshot that fails parity is shown
    and never selected. Decoded benchmark images are cached, so K models cost one decode.
    """
    from bnport.score.scoring import command_line, score as run_score

    settings = dataclasses.replace(build(ScoreSettings, kw), latency=latency, handoff=not no_handoff, seed=seed)
    result = run_score(list(targets), settings, export=build(ExportSettings, kw),
                       precision=build(PrecisionSettings, kw), model_options=build(ModelOptions, kw), device=device,
                       out=out, command=command_line(), progress=not as_json, log=_log)
    if result.table.benches:  # rank 0 under torchrun; other ranks print nothing
        click.echo(json.dumps(result.to_dict(), indent=1, default=str) if as_json else str(result))
        if result.selection is None or result.selection.selected is None:
            click.echo("bnport: error: no model passed its parity gate, so nothing was selected and no handoff "
                       "bundle was written (see the parity figures above)", err=True)
            click.get_current_context().exit(1)


@cli.command(name="run")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--print-config", is_flag=True, help="Print a commented example config and exit.")
def run_command(config: str | None, print_config: bool) -> None:
    """The whole pipeline from one TOML file: calibrate -> export every snapshot behind the parity gate -> score ->
    select -> handoff bundle -> report. Run it again to resume where it stopped."""
    from bnport.config import example_config, load_config
    from bnport.pipeline import run_pipeline
    from bnport.score.scoring import command_line

    if print_config:
        click.echo(example_config(), nl=False)
        return
    if config is None:
        raise click.UsageError("give CONFIG.toml (bnport run --print-config prints an example)")
    click.echo(str(run_pipeline(load_config(config), command=command_line(), log=_log)))


@cli.command()
@click.option("--out", default="bnport-demo", show_default=True, type=click.Path(file_okay=False),
              help="Output folder (the run, its scores, report and handoff bundle).")
@device_option
def demo(out: str, device: str) -> None:
    """Run the whole pipeline on the embedded demo model (an IResNet trained on MNIST digits as identities):
    calibration with blur and fractal noise, every snapshot exported and scored on the committed benchmarks,
    selection, handoff bundle and report. Nothing is downloaded."""
    from bnport.pipeline import demo_config, run_pipeline
    from bnport.score.scoring import command_line

    click.echo(str(run_pipeline(demo_config(out, device=device), command=command_line(), log=_log)))


@cli.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(file_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Report folder (default RUN/report).")
@click.option("--ood", default=None, type=click.Path(), metavar="SRC",
              help="Out-of-domain images (folder, list, .rec, .bin) added as an input group of the BN analysis views.")
@click.option("--analysis-images", default=32, show_default=True, type=click.IntRange(min=2),
              help="Images per input group in the BN analysis views.")
def report(run_dir: str, out: str | None, ood: str | None, analysis_images: int) -> None:
    """Plots (BN drift per layer, BN output distributions, BN log-likelihood and distance to the clean centre per
    input group, TPR per snapshot, ROC, BN consistency) and report.md for RUN (a run, or the out folder of a
    `bnport run` that compared recipes: then also TPR per snapshot and BN drift per recipe); copied into
    RUN/score/handoff when the run has been scored."""
    from bnport.pipeline import make_report, report_runs

    run, recipes = report_runs(run_dir)
    if ood is not None and not Path(ood).exists():
        raise BnportError(f"out-of-domain images {ood} not found", "point --ood at a folder, list, .rec or .bin")
    files = make_report(run, Path(out) if out else Path(run_dir) / "report", log=_log, ood=ood,
                        analysis_images=analysis_images, score_dir=Path(run_dir) / "score", recipes=recipes)
    click.echo("\n".join(str(f) for f in files))


if __name__ == "__main__":
    main()
