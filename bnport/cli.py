"""The `bnport` command line: a thin Click layer. Each command parses its options, makes one library call and prints
the result; a `BnportError` becomes one line on stderr and exit status 1, a usage error exit status 2."""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from bnport import __version__
from bnport.errors import BnportError


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


def load_from_options(model: str, *, weights, weights_key, non_strict, trust_pickle, input_size, mean, std, bgr):
    """Load MODEL as the shared model options describe it."""
    from bnport.data.transforms import parse_floats, parse_size
    from bnport.model.resolve import resolve_model

    return resolve_model(model, weights=weights, weights_key=weights_key, strict=not non_strict,
                         trust_pickle=trust_pickle, input_size=parse_size(input_size) if input_size else None,
                         mean=parse_floats(mean) if mean else None, std=parse_floats(std) if std else None, bgr=bgr)


def _model_kwargs(kwargs: dict) -> dict:
    names = ("weights", "weights_key", "non_strict", "trust_pickle", "input_size", "mean", "std", "bgr")
    return {k: kwargs.pop(k) for k in names}


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


def _parse_size(text):
    from bnport.data.transforms import parse_size

    return parse_size(text)


def _parse_floats(text):
    from bnport.data.transforms import _triple, parse_floats

    return _triple(parse_floats(text))


def _parse_rule(text):
    from bnport.score.select import parse_rule

    return parse_rule(text)


def _parse_fprs(text):
    from bnport.score.scoring import parse_fprs

    return parse_fprs(text)


def _parse_precisions(text):
    from bnport.score.scoring import parse_precisions

    return parse_precisions(text)


def setting_option(section: str, key: str, *names: str, **extra):
    """A Click option built from the shared definition of setting `key` (bnport.config): the same default, type,
    range and help as the TOML key of `bnport run`."""
    from bnport.config import setting

    s = setting(section, key)
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


model_options = option_group(  # MODEL plus the options that load it: weights, wrapper key, strictness, input spec
    click.argument("model"),
    click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
                 help="State dict (.pt/.pth/.safetensors); wrappers state_dict, state_dict_backbone, model... "
                      "and a module. prefix are recognised."),
    click.option("--weights-key", default=None, help="Key of the checkpoint dict that holds the state dict."),
    click.option("--non-strict", is_flag=True, help="Load weights even if some keys are missing or unexpected."),
    click.option("--trust-pickle", is_flag=True, help="Allow full unpickling of the weights file (runs its code)."),
    click.option("--input-size", default=None, callback=checked_by(_parse_size),
                 help="HxW; default: the architecture's (112x112 for face models)."),
    click.option("--mean", default=None, callback=checked_by(_parse_floats),
                 help="Per-channel mean, one or three numbers (default 127.5)."),
    click.option("--std", default=None, callback=checked_by(_parse_floats),
                 help="Per-channel std, one or three numbers (default 127.5)."),
    click.option("--bgr", is_flag=True, default=None, help="The model takes BGR input (default RGB)."),
)


device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                             help="auto = CUDA if it really works, else CPU.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


@cli.command()
@model_options
@setting_option("calibrate", "data", required=True)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@setting_option("calibrate", "noise", metavar="SPEC")
@setting_option("calibrate", "mode")
@setting_option("calibrate", "momentum")
@setting_option("calibrate", "batch_size")
@setting_option("calibrate", "steps")
@setting_option("calibrate", "epochs")
@setting_option("calibrate", "snapshot_every")
@setting_option("calibrate", "seed")
@device_option
@setting_option("calibrate", "workers")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last snapshot.")
@setting_option("calibrate", "strict_data")
@json_option
def calibrate(model: str, data: str, out: str, noise: tuple[str, ...], as_json: bool, **kwargs) -> None:
    """Re-estimate BatchNorm statistics of MODEL on --data mixed with noise, saving BN-only snapshots in --out.

    Every parameter stays frozen; only BN layers run in train mode. Snapshot 0000 is the untouched baseline.
    """
    from bnport.calibrate.engine import calibrate as run_calibration

    if kwargs["momentum"] is not None and kwargs["mode"] == "exact":
        raise click.BadOptionUsage("momentum", "--momentum applies to --mode ema only (exact mode pools every image "
                                   "and has no momentum): drop --momentum or use --mode ema")
    loaded = load_from_options(model, **_model_kwargs(kwargs))
    result = run_calibration(loaded, data, out, noise=list(noise), log=lambda m: click.echo(m, err=True), **kwargs)
    if as_json:
        click.echo(json.dumps({"run": str(result.run_dir), "snapshots": result.snapshots, "steps": result.steps,
                               "images_seen": result.images_seen, "skipped": result.skipped,
                               "seconds": round(result.seconds, 3), "resumed_from": result.resumed_from}, indent=1))
    elif result.snapshots:
        click.echo(result.summary())


@cli.command()
@model_options
@json_option
def inspect(model: str, as_json: bool, **kwargs) -> None:
    """List every BatchNorm of MODEL with its producer, consumer and fold plan."""
    from bnport.export.inventory import inspect_model

    report = inspect_model(load_from_options(model, **_model_kwargs(kwargs)))
    click.echo(json.dumps(report.to_dict(), indent=1) if as_json else str(report))


parity_options = option_group(  # the parity gate's options, shared by export and score
    setting_option("export", "exporter"),
    setting_option("export", "opset"),
    setting_option("export", "parity_data", metavar="SRC"),
    setting_option("export", "atol"),
    setting_option("export", "rtol"),
    setting_option("export", "min_cos", type=click.FloatRange(-1, 1)),
)


precision_options = option_group(  # lower-precision options, shared by export and score
    setting_option("export", "calib_data", metavar="SRC"),
    setting_option("export", "calib_images"),
    setting_option("export", "calib_method"),
    setting_option("export", "precision_min_cos", type=click.FloatRange(-1, 1)),
)


@cli.command(name="export")
@model_options
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="ONNX file to write.")
@click.option("--fold-bn", is_flag=True, help="Fold every BatchNorm that folds exactly (PyTorch graph, then ONNX).")
@click.option("--static-batch", is_flag=True, help="Fix the batch dimension at 1 (default: dynamic batch).")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@parity_options
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="fp16/int8: convert the verified float32 file (kept as OUT.fp32.onnx) and gate it against it.")
@precision_options
@device_option
@json_option
def export(model: str, out: str, no_simplify: bool, as_json: bool, **kwargs) -> None:
    """Export MODEL, or a snapshot RUN/snapshots/NNNN.safetensors, to OUT.onnx behind a parity gate.

    Dynamic batch, input `data`, onnxsim, onnx.checker; parity with PyTorch on onnxruntime over real images and
    noise, judged against the model run in float64: a value passes within the larger of --atol and 4x PyTorch
    float32's own error. Exit status 1 when parity fails: then no OUT.onnx is written, only OUT.onnx.rejected and its
    report OUT.onnx.rejected.json. With --precision int8 or fp16 the float32 file is converted (ONNX Runtime static
    QDQ quantization, or float16 weights and compute with float32 input and output) and judged against it by row
    cosine.
    """
    from bnport.data.transforms import parse_floats, parse_size
    from bnport.export.onnx_export import export_model

    report = export_model(
        model, out, weights=kwargs.pop("weights"), weights_key=kwargs.pop("weights_key"),
        strict=not kwargs.pop("non_strict"), trust_pickle=kwargs.pop("trust_pickle"),
        input_size=parse_size(size) if (size := kwargs.pop("input_size")) else None,
        mean=parse_floats(mean) if (mean := kwargs.pop("mean")) else None,
        std=parse_floats(std) if (std := kwargs.pop("std")) else None, simplify=not no_simplify,
        warn=lambda message: click.echo(f"bnport: warning: {message}", err=True), **kwargs)
    click.echo(json.dumps(report.to_dict(), indent=1, default=str) if as_json else str(report))
    if not report:
        click.get_current_context().exit(1)


@cli.command()
@click.argument("targets", nargs=-1, required=True, metavar="RUN|MODEL.onnx|SNAPSHOT|MODEL...")
@setting_option("score", "bench", "--bench", "benches", required=True, metavar="SPEC",
                help="Benchmark, repeatable: PATH.bin | ijbc:DIR | ijbb:DIR | pairs:FILE.csv | folder:DIR; options "
                     "after commas: flip=off, and for IJB norm=off, faceness=off.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Output folder (default: RUN/score for a run, ./bnport-score otherwise).")
@setting_option("score", "fpr", "--fpr", "fprs", metavar="LIST", type=str, callback=checked_by(_parse_fprs),
                help="FPR targets, comma-separated (default 1e-6,1e-5,1e-4,1e-3,1e-2,1e-1).")
@setting_option("score", "select", metavar="RULE", callback=checked_by(_parse_rule))
@setting_option("score", "guard", metavar="POINTS")
@setting_option("score", "bootstrap", metavar="N")
@setting_option("score", "batch_size")
@setting_option("score", "cache_dir", type=click.Path(file_okay=False))
@setting_option("score", "workers")
@setting_option("score", "precision", "--precision", "precisions", multiple=False, default="fp32", metavar="LIST",
                callback=checked_by(_parse_precisions),
                help="Precisions to score, comma-separated: fp32,fp16,int8 (float32 always). Each file's latency at "
                     "batch 1 and 8 joins the table.")
@setting_option("score", "max_drop", metavar="POINTS")
@precision_options
@click.option("--latency/--no-latency", default=None, help="Measure each file's latency (default: with --precision).")
@click.option("--no-handoff", is_flag=True, help="Do not write the handoff bundle.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="State dict for a MODEL spec target, or the new location of a run's weights file if it moved "
                   "(its sha256 must match the run's).")
@click.option("--weights-key", default=None, help="Key of the checkpoint dict that holds the state dict.")
@click.option("--non-strict", is_flag=True, help="Load weights even if some keys are missing or unexpected.")
@click.option("--trust-pickle", is_flag=True, help="Allow full unpickling of the weights file (runs its code).")
@click.option("--input-size", default=None, callback=checked_by(_parse_size),
              help="HxW for a foreign .onnx or a MODEL spec (default: its own).")
@click.option("--mean", default=None, callback=checked_by(_parse_floats),
              help="Per-channel mean for a foreign .onnx or MODEL (default 127.5).")
@click.option("--std", default=None, callback=checked_by(_parse_floats),
              help="Per-channel std for a foreign .onnx or MODEL (default 127.5).")
@click.option("--bgr", is_flag=True, default=None, help="A foreign .onnx or MODEL takes BGR input.")
@parity_options
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap.")
@device_option
@json_option
def score(targets: tuple[str, ...], benches: tuple[str, ...], as_json: bool, **kw) -> None:
    """Score the baseline and every snapshot of RUN (or ONNX files, snapshots, MODEL specs) on onnxruntime over
    face-verification benchmarks: TPR at each FPR under the strict and the insightface rule, a selection by a stated
    rule, and a handoff bundle of the selected model.

    Snapshots are exported behind the parity gate and cached in RUN/exports; a snapshot that fails parity is shown
    and never selected. Decoded benchmark images are cached, so K models cost one decode.
    """
    from bnport.data.transforms import parse_floats, parse_size
    from bnport.score import ExportSettings, command_line, score as run_score

    model_options = {"weights": kw.pop("weights"), "weights_key": kw.pop("weights_key"),
                     "strict": not kw.pop("non_strict"), "trust_pickle": kw.pop("trust_pickle"),
                     "input_size": parse_size(size) if (size := kw.pop("input_size")) else None,
                     "mean": parse_floats(mean) if (mean := kw.pop("mean")) else None,
                     "std": parse_floats(std) if (std := kw.pop("std")) else None, "bgr": kw.pop("bgr")}
    lower = {"calib_data": kw.pop("calib_data"), "calib_images": kw.pop("calib_images"),
             "method": kw.pop("calib_method"), "min_cos": kw.pop("precision_min_cos")}
    settings = ExportSettings(exporter=kw.pop("exporter"), opset=kw.pop("opset"), atol=kw.pop("atol"),
                              rtol=kw.pop("rtol"), min_cos=kw.pop("min_cos"), parity_data=kw.pop("parity_data"),
                              device=kw["device"])
    result = run_score(list(targets), list(benches), export=settings, model_options=model_options,
                       precision_options=lower,
                       handoff=not kw.pop("no_handoff"), command=command_line(),
                       log=lambda m: click.echo(m, err=True), progress=not as_json, **kw)
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
    from bnport.score import command_line

    if print_config:
        click.echo(example_config(), nl=False)
        return
    if config is None:
        raise click.UsageError("give CONFIG.toml (bnport run --print-config prints an example)")
    result = run_pipeline(load_config(config), command=command_line(), log=lambda m: click.echo(m, err=True))
    click.echo(str(result))


@cli.command()
@click.option("--out", default="bnport-demo", show_default=True, type=click.Path(file_okay=False),
              help="Output folder (the run, its scores, report and handoff bundle).")
@device_option
def demo(out: str, device: str) -> None:
    """Run the whole pipeline on the embedded demo model (an IResNet trained on MNIST digits as identities):
    calibration with blur and fractal noise, every snapshot exported and scored on the committed benchmarks,
    selection, handoff bundle and report. Nothing is downloaded."""
    from bnport.pipeline import demo_config, run_pipeline
    from bnport.score import command_line

    result = run_pipeline(demo_config(out, device=device), command=command_line(),
                          log=lambda m: click.echo(m, err=True))
    click.echo(str(result))


@cli.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(file_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Report folder (default RUN/report).")
def report(run_dir: str, out: str | None) -> None:
    """Plots (BN drift per layer, BN output distributions, TPR per snapshot, ROC) and report.md for RUN; copied into
    RUN/score/handoff when the run has been scored."""
    from bnport.pipeline import make_report
    from bnport.runs import Run

    run = Run.open(run_dir)
    files = make_report(run, Path(out) if out else run.path / "report", log=lambda m: click.echo(m, err=True))
    click.echo("\n".join(str(f) for f in files))


if __name__ == "__main__":
    main()
