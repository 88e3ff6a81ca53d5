"""The ONNX files `bnport score` runs: every snapshot of a run exported behind the parity gate and cached in the run,
ONNX files taken as they are, and other MODEL specs exported once into the output folder.

Snapshots of one run differ only in their BN statistics, so after one full export (`bnport.export.onnx_export.export_onnx`: fold,
trace, export, simplify, parity) the others reuse its graph: the snapshot is folded in PyTorch (a torch.fx pass, no
ONNX export), the file's initializers that hold folded tensors are replaced by the new values (matched by value to
the folded module of the exported snapshot: exact float32 bytes, reshapes allowed) and the result goes through the
same parity gate against the unfolded PyTorch module with the snapshot applied. If that gate fails (an initializer
the match missed, say) the snapshot gets a full export instead, so a reused graph is never trusted unchecked.

Exports are cached as `RUN/exports/NNNN-<key>.onnx` with the report beside it as `.json`; the key hashes the
snapshot's content, the run's model, the input spec, the export settings and the bnport version, so scoring twice
exports nothing. A snapshot that failed parity keeps its `.onnx.rejected(.json)` and is not retried.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bnport import __version__
from bnport.atomic import atomic_write_bytes, atomic_write_json, file_name_part
from bnport.data.transforms import InputSpec
from bnport.errors import BnportError
from bnport.runs import Run, SnapshotRef


@dataclass
class ExportSettings:
    """How snapshots and MODEL specs are exported for scoring (None = bnport.export.onnx_export's defaults)."""

    exporter: str = "auto"
    opset: int | None = None
    atol: float | None = None
    rtol: float | None = None
    min_cos: float | None = None
    parity_data: str | None = None
    device: str = "auto"

    def key_dict(self) -> dict:
        return {"exporter": self.exporter, "opset": self.opset, "atol": self.atol, "rtol": self.rtol,
                "min_cos": self.min_cos, "parity_data": self.parity_data}


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

    @property
    def is_baseline(self) -> bool:
        return self.snapshot is not None and self.snapshot.index == 0 and self.precision == "fp32"

    def to_dict(self) -> dict:
        return {"label": self.label, "kind": self.kind, "onnx": str(self.onnx) if self.onnx else None,
                "sha256": self.sha256, "input_spec": self.input_spec.to_dict(), "passed": self.passed,
                "how": self.how, "failure": self.failure, "seconds": round(self.seconds, 3),
                "snapshot": self.snapshot.id if self.snapshot else None,
                "run": str(self.run.path) if self.run else None, "parity": self.parity,
                "precision": self.precision, "base": self.base or self.label, "latency": self.latency}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _verdict(parity: dict | None) -> str:
    if not parity:
        return ""
    return "; ".join(parity.get("failures") or []) or "parity failed"


class _Template:
    """A verified export of one snapshot and, for each initializer holding a folded tensor, that tensor's name."""

    def __init__(self, model, mapping: dict[str, str], ambiguous: dict[str, list[str]], source: str, report: dict):
        self.model, self.mapping, self.ambiguous = model, mapping, ambiguous
        self.source, self.report = source, report

    def undecided(self, state: dict) -> str | None:
        """An initializer whose value matched several folded tensors that differ for `state` (the template snapshot
        held coinciding values, as an untouched initialisation does): then the graph cannot be reused."""
        for init, names in self.ambiguous.items():
            first = state[names[0]].reshape(-1)
            if any(not bool((state[n].reshape(-1) == first).all()) for n in names[1:]):
                return init
        return None


def _folded_state(module, spec: InputSpec) -> dict:
    import torch

    from bnport.export.fold_torch import fold_bn

    folded = fold_bn(module, example_input=torch.zeros(1, 3, spec.height, spec.width))
    return {k: v.detach() for k, v in folded.state_dict().items() if v.is_floating_point()}


def _value_key(array: np.ndarray) -> tuple[int, str]:
    data = np.ascontiguousarray(array, dtype=np.float32)
    return data.size, hashlib.sha1(data.tobytes()).hexdigest()


def _build_template(model, state: dict, source: str, report: dict) -> _Template:
    """Match the file's float initializers to the folded module's tensors by exact value (a name match wins a tie);
    an initializer equal to no folded tensor, or to several, is taken as independent of the BN statistics."""
    from onnx import TensorProto, numpy_helper

    by_value: dict[tuple[int, str], list[str]] = {}
    for name, tensor in state.items():
        by_value.setdefault(_value_key(tensor.float().cpu().numpy()), []).append(name)
    mapping, ambiguous = {}, {}
    for init in model.graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        names = by_value.get(_value_key(numpy_helper.to_array(init)), [])
        if init.name in names:
            mapping[init.name] = init.name
        elif len(names) == 1:
            mapping[init.name] = names[0]
        elif names:
            mapping[init.name] = names[0]
            ambiguous[init.name] = names
    return _Template(model, mapping, ambiguous, source, report)


def _substituted(template: _Template, state: dict):
    """A copy of the template file with every mapped initializer replaced by the new folded tensor."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(template.model)
    for init in model.graph.initializer:
        name = template.mapping.get(init.name)
        if name is None:
            continue
        value = state[name].float().cpu().numpy().reshape(tuple(init.dims))
        init.CopyFrom(numpy_helper.from_array(value, init.name))
    return model


class RunExporter:
    """Exports the snapshots of one run for scoring, reusing the first export's graph for the others."""

    def __init__(self, run: Run, settings: ExportSettings, *, weights: str | Path | None = None, log=None):
        self.run, self.settings, self.log = run, settings, log or (lambda m: None)
        self.weights = weights  # where the run's weights file is now, when it moved (sha256 checked)
        self.manifest = run.manifest()
        self._loaded = None
        self._inputs = None
        self._template: _Template | None = None

    def key(self, snapshot: SnapshotRef) -> str:
        model = self.manifest.get("model", {})
        return _hash({"bnport": __version__, "snapshot": snapshot.sha256(),
                      "input_spec": self.manifest.get("input_spec"),
                      "model": {k: model.get(k) for k in ("spec", "weights_sha256", "source_sha256")},
                      "settings": self.settings.key_dict()})

    def _module_for(self, snapshot: SnapshotRef, state: dict, meta: dict):
        """The run's model with `snapshot` (its BN `state` and `meta`, read by the caller) applied: loaded once per
        run, the BN state swapped in place after that."""
        from bnport.model.snapshot import apply_bn_state, load_snapshot_model

        if self._loaded is None:
            self._loaded = load_snapshot_model(snapshot.tensors, weights=self.weights)
        else:
            apply_bn_state(self._loaded.module, state)
            self._loaded.provenance = {**self._loaded.provenance, "snapshot": meta["id"], "step": meta.get("step"),
                                       "images_seen": meta.get("images_seen")}
        return self._loaded

    def _parity_inputs(self, spec: InputSpec):
        from bnport.export.parity import build_parity_inputs, load_parity_images

        if self._inputs is None:
            src = self.settings.parity_data or self.manifest.get("data", {}).get("src")
            if self.settings.parity_data is None and src and not Path(src).exists():
                raise BnportError(f"the run's calibration data {src} is gone, and parity needs real images",
                                  "pass --parity-data SRC (a folder, list, .rec or .bin of images like the model's)")
            real = load_parity_images(str(src), spec, limit=16) if src else None
            self._inputs = build_parity_inputs(spec, real=real)
        return self._inputs

    def export(self, snapshot: SnapshotRef) -> Candidate:
        """The snapshot's verified ONNX file: from the cache, by reusing a graph, or by a full export."""
        from bnport.model.snapshot import load_snapshot

        began = time.perf_counter()
        key = self.key(snapshot)
        out = self.run.export_path(snapshot, key)
        spec = InputSpec.from_dict(self.manifest["input_spec"])
        base = {"label": snapshot.label, "kind": "snapshot", "input_spec": spec, "snapshot": snapshot, "run": self.run}
        rejected_json = out.with_name(out.name + ".rejected.json")
        report_path = out.with_suffix(".json")
        if out.is_file() and report_path.is_file():
            report = json.loads(report_path.read_text())
            return Candidate(onnx=out, passed=True, how=f"cached {report.get('how', 'export')}",
                             parity=report.get("parity"),
                             seconds=time.perf_counter() - began, report=report, sha256=report.get("sha256"),
                             provenance=report.get("provenance", {}), **base)
        if rejected_json.is_file():
            report = json.loads(rejected_json.read_text())
            return Candidate(onnx=None, passed=False, how="cached full export", parity=report.get("parity"),
                             failure=_verdict(report.get("parity")) or "export failed", report=report,
                             seconds=time.perf_counter() - began, **base)
        try:
            state, meta = load_snapshot(snapshot.tensors)  # a damaged snapshot is one failed row, not the end
        except BnportError as err:
            return Candidate(onnx=None, passed=False, how="unreadable", failure=str(err),
                             seconds=time.perf_counter() - began, **base)
        loaded = self._module_for(snapshot, state, meta)
        provenance = dict(loaded.provenance)
        if self._template is None:
            self._template = self._template_from_cache(spec)
        if self._template is not None:
            candidate = self._export_reusing(snapshot, loaded, spec, out, provenance, began, base)
            if candidate is not None:
                return candidate
        return self._export_full(snapshot, loaded, spec, out, provenance, began, base)

    def _metadata(self, loaded, provenance: dict) -> dict:
        return {"source": loaded.spec, "source_sha256": loaded.source_sha256, "weights_sha256": loaded.weights_sha256,
                "snapshot_id": str(provenance.get("snapshot")),
                "calibration": json.dumps(provenance, default=str)}

    def _export_full(self, snapshot, loaded, spec, out: Path, provenance: dict, began: float, base: dict) -> Candidate:
        import onnx

        from bnport.export.onnx_export import export_onnx

        inputs, counts = self._parity_inputs(spec)
        real = inputs[:counts["real"]] if counts.get("real") else None
        s = self.settings
        report = export_onnx(loaded.module, out, input_spec=spec, fold_bn=True, exporter=s.exporter, opset=s.opset,
                             parity_images=real, atol=s.atol, rtol=s.rtol, min_cos=s.min_cos, device=s.device,
                             metadata=self._metadata(loaded, provenance),
                             source={"model": loaded.spec, "snapshot": str(snapshot.tensors)})
        data = report.to_dict()
        data.update(how="full export", provenance=provenance)
        parity = data.get("parity")
        if not report:
            return Candidate(onnx=None, passed=False, how="full export", parity=parity,
                             failure=_verdict(parity) or report.exporter_note, report=data,
                             seconds=time.perf_counter() - began, **base)
        atomic_write_json(out.with_suffix(".json"), data)
        model = onnx.load(str(out))
        self._template = _build_template(model, _folded_state(loaded.module, spec), snapshot.id, data)
        return Candidate(onnx=out, passed=True, how="full export", parity=parity, report=data, sha256=report.sha256,
                         seconds=time.perf_counter() - began, provenance=provenance, **base)

    def _template_from_cache(self, spec: InputSpec) -> _Template | None:
        """A template from an export of this run cached by an earlier call (same settings), if there is one. The
        run's model is loaded (`_module_for`) before this is asked."""
        import onnx

        from bnport.model.snapshot import apply_bn_state, bn_state, load_snapshot

        for snapshot in self.run.snapshots():
            out = self.run.export_path(snapshot, self.key(snapshot))
            if not (out.is_file() and out.with_suffix(".json").is_file()):
                continue
            cached_state, _ = load_snapshot(snapshot.tensors)
            loaded = self._loaded
            saved = bn_state(loaded.module)
            apply_bn_state(loaded.module, cached_state)
            state = _folded_state(loaded.module, spec)
            apply_bn_state(loaded.module, saved)
            report = json.loads(out.with_suffix(".json").read_text())
            return _build_template(onnx.load(str(out)), state, snapshot.id, report)
        return None

    def _export_reusing(self, snapshot, loaded, spec, out: Path, provenance: dict, began: float,
                        base: dict) -> Candidate | None:
        """Fold, substitute, check parity; None (so a full export follows) when the reused graph fails the gate."""
        from onnx import helper

        from bnport.export.parity import ParityReference
        from bnport.runtime.sessions import GATE, create_session

        template = self._template
        state = _folded_state(loaded.module, spec)
        undecided = template.undecided(state)
        if undecided is not None:
            self.log(f"snapshot {snapshot.id}: the graph of {template.source} cannot be reused ({undecided} held a "
                     "value several folded tensors shared there); exporting anew")
            return None
        model = _substituted(template, state)
        inputs, counts = self._parity_inputs(spec)
        reference = ParityReference(loaded.module, inputs, counts=counts, batch_sizes=(1, 2, 8))
        s = self.settings
        try:
            session = create_session(model.SerializeToString(), device=s.device, use=GATE)
            parity = reference.compare(session, atol=s.atol, rtol=s.rtol, min_cos=s.min_cos,
                                       label=f"graph of snapshot {template.source} reused")
        except BnportError:
            raise
        except Exception as err:  # noqa: BLE001 - a reused graph that will not even run means a full export
            self.log(f"snapshot {snapshot.id}: the reused graph did not run ({type(err).__name__}); exporting anew")
            return None
        if not parity:
            self.log(f"snapshot {snapshot.id}: the reused graph failed parity; exporting anew")
            return None
        props = {p.key: p.value for p in model.metadata_props}
        props.update({k: v for k, v in self._metadata(loaded, provenance).items() if v is not None})
        props["parity"] = json.dumps(parity.to_dict())
        props["parity_bound"] = parity.bound_text
        props["parity_inputs"] = "noise only" if parity.noise_only else "real images and noise"
        helper.set_model_props(model, props)
        data = model.SerializeToString()
        sha = hashlib.sha256(data).hexdigest()
        atomic_write_bytes(out, data)
        report = {key: template.report.get(key) for key in ("exporter", "opset", "dynamic_batch", "input_name",
                                                              "output_names", "simplified", "fold_bn", "bn_before",
                                                              "bn_torch_after", "bn_onnx", "remaining")}
        report.update(passed=True, output=str(out), sha256=sha, parity=parity.to_dict(), runtime=session.describe(),
                      how="graph reused", graph_of=template.source, provenance=provenance,
                      seconds=round(time.perf_counter() - began, 3))
        atomic_write_json(out.with_suffix(".json"), report)
        return Candidate(onnx=out, passed=True, how="graph reused", parity=report["parity"], report=report,
                         sha256=sha, seconds=time.perf_counter() - began, provenance=provenance, **base)


def onnx_candidate(model, *, label: str | None = None) -> Candidate:
    """An ONNX file scored as it is (bnport.model.resolve.OnnxModel)."""
    parity = model.parity
    passed = parity is None or bool(parity.get("passed", True))
    return Candidate(label=label or model.path.name, kind="onnx", onnx=model.path, input_spec=model.input_spec,
                     passed=passed, how="given", parity=parity, failure="" if passed else _verdict(parity),
                     provenance=model.provenance, sha256=model.sha256,
                     report={"metadata": {k: v for k, v in model.metadata.items() if k != "parity"},
                             "spec_source": model.spec_source})


def model_candidate(loaded, out_dir: Path, settings: ExportSettings, *, label: str | None = None,
                    log=None) -> Candidate:
    """A PyTorch MODEL spec exported behind the parity gate into `out_dir/exports/` (cached by content)."""
    from bnport.export.onnx_export import export_onnx
    from bnport.export.parity import load_parity_images

    began = time.perf_counter()
    spec = loaded.input_spec
    key = _hash({"bnport": __version__, "spec": loaded.spec, "weights": loaded.weights_sha256,
                 "source": loaded.source_sha256, "input_spec": spec.to_dict(), "settings": settings.key_dict(),
                 "provenance": loaded.provenance})
    name = file_name_part(Path(loaded.spec).name, 40)
    out = out_dir / "exports" / f"{name}-{key}.onnx"
    label = label or loaded.spec
    base = {"label": label, "kind": "model", "input_spec": spec, "provenance": dict(loaded.provenance)}
    if out.is_file() and out.with_suffix(".json").is_file():
        report = json.loads(out.with_suffix(".json").read_text())
        return Candidate(onnx=out, passed=True, how="cached export", parity=report.get("parity"), report=report,
                         sha256=report.get("sha256"), seconds=time.perf_counter() - began, **base)
    data_src = settings.parity_data or loaded.provenance.get("data")
    if data_src is None and log is not None:
        log(f"warning: {label}: parity checked on noise inputs only (give --parity-data SRC for real images)")
    real = load_parity_images(str(data_src), spec, limit=16) if data_src else None
    report = export_onnx(loaded.module, out, input_spec=spec, fold_bn=True, exporter=settings.exporter,
                         opset=settings.opset, parity_images=real, atol=settings.atol, rtol=settings.rtol,
                         min_cos=settings.min_cos, device=settings.device,
                         metadata={"source": loaded.spec, "source_sha256": loaded.source_sha256,
                                   "weights_sha256": loaded.weights_sha256},
                         source={"model": loaded.spec, "weights": loaded.weights})
    data = report.to_dict()
    data["how"] = "export"
    if not report:
        return Candidate(onnx=None, passed=False, how="export", parity=data.get("parity"),
                         failure=_verdict(data.get("parity")) or report.exporter_note, report=data,
                         seconds=time.perf_counter() - began, **base)
    atomic_write_json(out.with_suffix(".json"), data)
    return Candidate(onnx=out, passed=True, how="export", parity=data.get("parity"), report=data,
                     sha256=report.sha256, seconds=time.perf_counter() - began, **base)


class PrecisionMaker:
    """Lower-precision versions of verified float32 candidates (bnport.export.precision), cached beside their float32 file
    as NAME.PRECISION-KEY.onnx (+ .json); the key hashes the float32 file, the precision and the settings. INT8
    calibrates on `calib_data`, else the run's calibration data, else `parity_data` (the float32 gate's real
    images); the gate judges other images of the same source."""

    def __init__(self, *, calib_data: str | None = None, calib_images: int = 64, method: str = "minmax",
                 min_cos: float | None = None, parity_data: str | None = None, device: str = "auto", log=None):
        self.calib_data, self.calib_images, self.method = calib_data, calib_images, method
        self.parity_data = parity_data
        self.min_cos, self.device, self.log = min_cos, device, log or (lambda m: None)
        self._images: dict = {}

    def _source(self, base: Candidate) -> str | None:
        if self.calib_data:
            return self.calib_data
        if base.run is not None:
            return base.run.manifest().get("data", {}).get("src")
        return self.parity_data or (base.provenance.get("data") if isinstance(base.provenance, dict) else None)

    def _images_for(self, src: str, spec: InputSpec):
        from bnport.export.precision import load_precision_images

        key = (src, spec)
        if key not in self._images:
            self._images[key] = load_precision_images(src, spec, calibration=self.calib_images)
        return self._images[key]

    def make(self, base: Candidate, precision: str) -> Candidate:
        """The `precision` candidate of a passed float32 candidate (from the cache, or made and gated now)."""
        from bnport.export.precision import make_precision, stamp_precision_metadata

        began = time.perf_counter()
        src = self._source(base)
        if precision == "int8" and not src:
            raise BnportError(f"INT8 for {base.label} needs calibration images and none are known",
                              "pass --calib-data SRC (images like the model's)")
        if src and not Path(src).exists():
            raise BnportError(f"calibration data {src} for {base.label} is gone", "pass --calib-data SRC")
        key = _hash({"bnport": __version__, "fp32": base.sha256, "precision": precision, "method": self.method,
                     "calib": src, "n": self.calib_images, "min_cos": self.min_cos})[:12]
        out = base.onnx.with_name(f"{base.onnx.stem}.{precision}-{key}.onnx")
        common = {"label": f"{base.label} {precision}", "kind": base.kind, "input_spec": base.input_spec,
                  "snapshot": base.snapshot, "run": base.run, "provenance": base.provenance, "precision": precision,
                  "base": base.label}
        report_path = out.with_suffix(".json")
        if report_path.is_file():
            report = json.loads(report_path.read_text())
            passed = report["passed"] and out.is_file()
            return Candidate(onnx=out if passed else None, passed=passed, how=f"cached {precision}",
                             parity=report.get("parity"), failure=_verdict(report.get("parity")) if not passed else "",
                             report=report, sha256=report.get("sha256"), seconds=time.perf_counter() - began,
                             **common)
        calibration = parity = fingerprint = None
        if src:
            calibration, parity, fingerprint = self._images_for(src, base.input_spec)
        result = make_precision(base.onnx, precision, calibration_images=calibration if precision == "int8" else None,
                                parity_images=parity, method=self.method, input_spec=base.input_spec,
                                min_cos=self.min_cos, device="cpu" if precision == "int8" else self.device)
        model = stamp_precision_metadata(result, calibration_data=fingerprint)
        data = model.SerializeToString()
        sha = hashlib.sha256(data).hexdigest()
        report = {**result.to_dict(), "sha256": sha if result else None, "calibration_data": fingerprint,
                  "fp32_file": str(base.onnx)}
        if result:
            atomic_write_bytes(out, data)
        atomic_write_json(report_path, report)
        how = "INT8 static QDQ" if precision == "int8" else "float16"
        return Candidate(onnx=out if result else None, passed=result.passed, how=how, parity=report["parity"],
                         failure="" if result else _verdict(report["parity"]), report=report,
                         sha256=sha if result else None, seconds=time.perf_counter() - began, **common)
