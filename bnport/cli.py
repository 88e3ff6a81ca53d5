"""The `bnport` command line: a thin Click layer. Each command parses its options, makes one library call and prints
the result; a `BnportError` becomes one line on stderr and exit status 1, a usage error exit status 2."""
from __future__ import annotations

import functools
import json

import click

from bnport import __version__
from bnport.errors import BnportError


class BnportGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BnportError as e:
            click.echo(f"bnport: error: {e}", err=True)
            ctx.exit(1)


@click.group(cls=BnportGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="bnport")
def cli() -> None:
    """bnport: recalibrate BatchNorm, fold it exactly, export verified ONNX, score it, hand it off."""


def main() -> None:
    cli(prog_name="bnport")


def model_options(func):
    """MODEL argument plus the options that load it: weights, wrapper key, strictness, input spec."""
    @click.argument("model")
    @click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
                  help="State dict (.pt/.pth/.safetensors); wrappers state_dict, state_dict_backbone, model... "
                       "and a module. prefix are recognised.")
    @click.option("--weights-key", default=None, help="Key of the checkpoint dict that holds the state dict.")
    @click.option("--non-strict", is_flag=True, help="Load weights even if some keys are missing or unexpected.")
    @click.option("--trust-pickle", is_flag=True, help="Allow full unpickling of the weights file (runs its code).")
    @click.option("--input-size", default=None, help="HxW; default: the architecture's (112x112 for face models).")
    @click.option("--mean", default=None, help="Per-channel mean, one or three numbers (default 127.5).")
    @click.option("--std", default=None, help="Per-channel std, one or three numbers (default 127.5).")
    @click.option("--bgr", is_flag=True, default=None, help="The model takes BGR input (default RGB).")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)
    return wrapper


def load_from_options(model: str, *, weights, weights_key, non_strict, trust_pickle, input_size, mean, std, bgr):
    """Load MODEL as the shared model options describe it."""
    from bnport.data.transforms import parse_floats, parse_size
    from bnport.load import load_model, with_input_spec

    loaded = load_model(model, weights=weights, weights_key=weights_key, strict=not non_strict,
                        trust_pickle=trust_pickle)
    return with_input_spec(loaded, size=parse_size(input_size) if input_size else None,
                           mean=parse_floats(mean) if mean else None, std=parse_floats(std) if std else None, bgr=bgr)


def _model_kwargs(kwargs: dict) -> dict:
    names = ("weights", "weights_key", "non_strict", "trust_pickle", "input_size", "mean", "std", "bgr")
    return {k: kwargs.pop(k) for k in names}


device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                             help="auto = CUDA if it really works, else CPU.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


@cli.command()
@model_options
@click.option("--data", "data", required=True, help="Image folder, list file, train.rec (+.idx) or .bin pack.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--noise", multiple=True, metavar="SPEC",
              help="Noise source, repeatable: blur:p=0.05,sigma=3-5 | gauss-append:ratio=0.05,std=1 | "
                   "gauss-add:std=0.1 | ood:DIR,ratio=0.05 | fractal:ratio=0.05")
@click.option("--mode", type=click.Choice(["ema", "exact"]), default="ema", show_default=True,
              help="ema: BN momentum updates; exact: pooled float64 statistics over all images.")
@click.option("--momentum", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="BN momentum for ema, in (0, 1] (default: the model's own).")
@click.option("--batch-size", type=click.IntRange(min=2), default=32, show_default=True,
              help="Images per batch and process (at least 2: BatchNorm needs two values per channel).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Number of steps (batches per process).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Passes over the data (default 1).")
@click.option("--snapshot-every", type=click.IntRange(min=1), default=None,
              help="Steps between snapshots (default: a tenth of the run).")
@click.option("--seed", type=int, default=0, show_default=True)
@device_option
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="DataLoader workers.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last snapshot.")
@click.option("--strict-data", is_flag=True, help="Stop at the first unreadable image instead of skipping it.")
@json_option
def calibrate(model: str, data: str, out: str, noise: tuple[str, ...], as_json: bool, **kwargs) -> None:
    """Re-estimate BatchNorm statistics of MODEL on --data mixed with noise, saving BN-only snapshots in --out.

    Every parameter stays frozen; only BN layers run in train mode. Snapshot 0000 is the untouched baseline.
    """
    from bnport.calibrate import calibrate as run_calibration

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
    from bnport.inventory import inspect_model

    report = inspect_model(load_from_options(model, **_model_kwargs(kwargs)))
    click.echo(json.dumps(report.to_dict(), indent=1) if as_json else str(report))


@cli.command(name="export")
@model_options
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="ONNX file to write.")
@click.option("--fold-bn", is_flag=True, help="Fold every BatchNorm that folds exactly (PyTorch graph, then ONNX).")
@click.option("--opset", type=click.IntRange(min=7), default=None,
              help="ONNX opset (default: the exporter's own; 17 for TorchScript).")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True,
              help="auto: dynamo, then TorchScript if dynamo fails or fails parity.")
@click.option("--static-batch", is_flag=True, help="Fix the batch dimension at 1 (default: dynamic batch).")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option("--parity-data", default=None, metavar="SRC",
              help="Real images for the parity check (default: a snapshot's calibration data); noise inputs are "
                   "always added.")
@click.option("--atol", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Absolute tolerance as a fraction of each output's scale, max |output| (default 1e-4); 4x "
                   "PyTorch float32's own error against float64 is allowed when that is larger.")
@click.option("--rtol", type=click.FloatRange(min=0), default=None,
              help="Relative tolerance per output value (default 1e-4).")
@click.option("--min-cos", type=click.FloatRange(-1, 1), default=None,
              help="Lowest cosine similarity allowed between an output row and PyTorch's (default 0.99999).")
@device_option
@json_option
def export(model: str, out: str, no_simplify: bool, as_json: bool, **kwargs) -> None:
    """Export MODEL, or a snapshot RUN/snapshots/NNNN.safetensors, to OUT.onnx behind a parity gate.

    Dynamic batch, input `data`, onnxsim, onnx.checker; parity with PyTorch on onnxruntime over real images and
    noise, judged against the model run in float64: a value passes within the larger of --atol and 4x PyTorch
    float32's own error. Exit status 1 when parity fails: then no OUT.onnx is written, only OUT.onnx.rejected and its
    report OUT.onnx.rejected.json.
    """
    from bnport.data.transforms import parse_floats, parse_size
    from bnport.export import export_model

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


if __name__ == "__main__":
    main()
