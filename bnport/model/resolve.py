"""The one model resolver every command uses: a MODEL argument (registry name, `torchvision:NAME`,
`file.py:factory`, `package.module:factory`, a TorchScript file, a snapshot `RUN/snapshots/NNNN.safetensors`, or,
where the command can use one, an `.onnx` file) plus the shared load and input-spec options -> a ready model.

PyTorch models come back as `bnport.model.load.LoadedModel`; an ONNX file as `OnnxModel`, with its input spec read from
bnport's metadata_props (or given with --input-size/--mean/--std/--bgr for a foreign file) and checked against the
file's own input shape.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bnport.data.transforms import InputSpec
from bnport.errors import BnportError
from bnport.atomic import sha256_file
from bnport.model.load import LoadedModel, load_model, with_input_spec
from bnport.model.options import ModelOptions
from bnport.runs import Run, looks_like_snapshot


@dataclass
class OnnxModel:
    """An ONNX file to run as it is. `metadata` is its metadata_props; `spec_source` says where `input_spec` came
    from ("bnport metadata", "command line" or "default"); `parity` is bnport's parity record when it has one."""

    path: Path
    input_spec: InputSpec
    metadata: dict[str, str]
    sha256: str
    spec_source: str
    input_name: str
    input_shape: list
    output_names: list[str]
    parity: dict | None = None
    provenance: dict = field(default_factory=dict)

    @property
    def spec(self) -> str:
        return str(self.path)


def open_onnx(path: str | Path, *, input_size: tuple[int, int] | None = None, mean=None, std=None,
              bgr: bool | None = None) -> OnnxModel:
    """Read an ONNX file's interface and bnport metadata; the input spec is the metadata's, overridden by any option
    given (a foreign file without metadata gets the insightface default, 112x112 and 127.5/127.5, unless told)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise BnportError(f"ONNX model not found: {path}", "check the path")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError and friends for a file that is not ONNX
        raise BnportError(f"{path} is not a readable ONNX file ({type(e).__name__}: {str(e)[:200]})",
                          "give a .onnx model file, e.g. one written by bnport export") from None
    metadata = {p.key: p.value for p in model.metadata_props}
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise BnportError(f"{path} has {len(inputs)} inputs; bnport feeds one NCHW image batch",
                          "export the model with a single image input")
    dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
            for d in inputs[0].type.tensor_type.shape.dim]
    spec, source = InputSpec(), "default"
    if "input_spec" in metadata:
        try:
            spec, source = InputSpec.from_dict(json.loads(metadata["input_spec"])), "bnport metadata"
        except (ValueError, KeyError, TypeError):
            pass
    elif len(dims) == 4 and isinstance(dims[2], int) and isinstance(dims[3], int) and dims[2] > 0 and dims[3] > 0:
        spec = InputSpec(dims[2], dims[3])
        source = "the file's input shape; default normalisation"
    if any(v is not None for v in (input_size, mean, std, bgr)):
        spec = InputSpec(height=input_size[0] if input_size else spec.height,
                         width=input_size[1] if input_size else spec.width,
                         mean=mean if mean is not None else spec.mean, std=std if std is not None else spec.std,
                         bgr=spec.bgr if bgr is None else bgr)
        source = "command line" if source == "default" else f"{source}, overridden on the command line"
    if len(dims) != 4:
        raise BnportError(f"{path} takes a {len(dims)}-D input {dims}; bnport feeds N x 3 x H x W images",
                          "export the model with an NCHW image input")
    fixed = [(axis, dims[i], want) for axis, i, want in (("channels", 1, 3), ("height", 2, spec.height),
                                                         ("width", 3, spec.width))
             if isinstance(dims[i], int) and dims[i] > 0 and dims[i] != want]
    if fixed:
        what = ", ".join(f"{axis} {got} (expected {want})" for axis, got, want in fixed)
        raise BnportError(f"{path} takes input {dims}, which does not fit the benchmark images "
                          f"{spec.height}x{spec.width}: {what}",
                          "give the model's input size with --input-size HxW (and --mean/--std/--bgr)")
    parity = None
    if "parity" in metadata:
        try:
            parity = json.loads(metadata["parity"])
        except ValueError:
            parity = None
    provenance = {}
    if "calibration" in metadata:
        try:
            provenance = json.loads(metadata["calibration"]) or {}
        except ValueError:
            provenance = {}
    return OnnxModel(path=path, input_spec=spec, metadata=metadata, sha256=sha256_file(path), spec_source=source,
                     input_name=inputs[0].name, input_shape=dims, output_names=[o.name for o in model.graph.output],
                     parity=parity, provenance=provenance)


def resolve_model(spec: str, options: ModelOptions | None = None, *, allow_onnx: bool = False
                  ) -> LoadedModel | OnnxModel:
    """MODEL spec -> a model, loaded as `options` say (None: ModelOptions(), no weights). A snapshot path loads its
    run's model with the snapshot's BN state (its run.json must exist; `options.weights` then says where the run's
    weights file is now, if it moved: its sha256 must match the run's); an `.onnx` file is accepted only with
    `allow_onnx`. Input-spec options override the model's own (None keeps it)."""
    options = options or ModelOptions()
    weights = options.weights
    input_size, mean, std, bgr = options.input_size, options.mean, options.std, options.bgr
    path = Path(spec)
    if path.suffix == ".onnx":
        if not allow_onnx:
            raise BnportError(f"{spec} is an ONNX file; this command needs the PyTorch model",
                              "give the architecture (e.g. iresnet50 or file.py:factory) with --weights, or a "
                              "snapshot RUN/snapshots/NNNN.safetensors")
        if weights is not None:
            raise BnportError("--weights cannot be combined with an ONNX file", "drop --weights")
        return open_onnx(path, input_size=input_size, mean=mean, std=std, bgr=bgr)
    if looks_like_snapshot(path) and (path.parent.is_dir() or path.exists()):
        from bnport.model.snapshot import load_snapshot_model

        run, index = Run.of_snapshot(path)  # a missing run.json is named as such
        if not run.snapshot(index).complete:
            have = [s.id for s in run.snapshots()]
            raise BnportError(f"snapshot not found or incomplete: {path}",
                              f"the run in {run.path} has snapshots {have[0]}..{have[-1]}" if have else
                              f"the run in {run.path} has no complete snapshot")
        loaded = load_snapshot_model(path, weights=weights)  # --weights: where the run's weights are now
    else:
        loaded = load_model(spec, weights=weights, weights_key=options.weights_key, strict=options.strict,
                            trust_pickle=options.trust_pickle)
    return with_input_spec(loaded, size=input_size, mean=mean, std=std, bgr=bgr)
