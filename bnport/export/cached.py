"""The files `bnport score` runs, made once and cached: every snapshot of a run exported behind the parity gate into
`RUN/exports/` (`RunExporter`: the first snapshot in full, the others by reusing its graph, bnport.export.reuse),
other MODEL specs exported into the score folder (`export_model_cached`), and the lower-precision files of each
(`LowerPrecisionCache`, beside their float32 file). Each comes back as an `ExportedFile`.

Exports are cached as `RUN/exports/NNNN-<key>.onnx` with the report beside it as `.json`; the key hashes the
snapshot's content, the run's model, the input spec, the export settings and the bnport version, so scoring twice
exports nothing. A snapshot that failed parity keeps its `.onnx.rejected(.json)` and is not retried.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from bnport import __version__
from bnport.atomic import atomic_write_json, file_name_part
from bnport.data.transforms import InputSpec
from bnport.errors import BnportError
from bnport.export.export_report import ExportedFile, verdict
from bnport.export.reuse import GraphTemplate, build_template, export_reusing, folded_state
from bnport.export.settings import ExportSettings, PrecisionSettings
from bnport.runs import Run, SnapshotRef


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(out: Path, began: float, how: str | None = None) -> ExportedFile | None:
    """An export cached at `out` (its report beside it), or its rejected twin; None when neither is there."""
    report_path = out.with_suffix(".json")
    if out.is_file() and report_path.is_file():
        report = json.loads(report_path.read_text())
        return ExportedFile(onnx=out, passed=True, how=how or f"cached {report.get('how', 'export')}",
                            parity=report.get("parity"), report=report, sha256=report.get("sha256"),
                            provenance=report.get("provenance", {}), seconds=time.perf_counter() - began)
    rejected = out.with_name(out.name + ".rejected.json")
    if rejected.is_file():
        report = json.loads(rejected.read_text())
        return ExportedFile(onnx=None, passed=False, how="cached full export", parity=report.get("parity"),
                            failure=verdict(report.get("parity")) or "export failed", report=report,
                            seconds=time.perf_counter() - began)
    return None


def _from_report(report, out: Path, how: str, provenance: dict, began: float) -> ExportedFile:
    """An ExportedFile from an ExportReport just made; a verified one's report is cached beside it."""
    data = report.to_dict()
    data.update(how=how, provenance=provenance)
    parity = data.get("parity")
    if not report:
        return ExportedFile(onnx=None, passed=False, how=how, parity=parity,
                            failure=verdict(parity) or report.exporter_note, report=data,
                            seconds=time.perf_counter() - began)
    atomic_write_json(out.with_suffix(".json"), data)
    return ExportedFile(onnx=out, passed=True, how=how, parity=parity, report=data, sha256=report.sha256,
                        provenance=provenance, seconds=time.perf_counter() - began)


class RunExporter:
    """Exports the snapshots of one run for scoring, reusing the first export's graph for the others. `weights`:
    where the run's weights file is now, when it moved (its sha256 is checked)."""

    def __init__(self, run: Run, settings: ExportSettings, *, device: str = "auto", weights: str | Path | None = None,
                 log=None):
        self.run, self.settings, self.device, self.log = run, settings, device, log or (lambda m: None)
        self.weights = weights
        self.manifest = run.manifest()
        self._loaded = None
        self._inputs = None
        self._template: GraphTemplate | None = None

    def key(self, snapshot: SnapshotRef) -> str:
        model = self.manifest.get("model", {})
        return _hash({"bnport": __version__, "snapshot": snapshot.sha256(),
                      "input_spec": self.manifest.get("input_spec"),
                      "model": {k: model.get(k) for k in ("spec", "weights_sha256", "source_sha256")},
                      "settings": self.settings.key_dict()})

    def export(self, snapshot: SnapshotRef) -> ExportedFile:
        """The snapshot's verified ONNX file: from the cache, by reusing a graph, or by a full export."""
        from bnport.export.onnx_export import provenance_metadata
        from bnport.model.snapshot import load_snapshot

        began = time.perf_counter()
        out = self.run.export_path(snapshot, self.key(snapshot))
        cached = _cached(out, began)
        if cached is not None:
            return cached
        try:
            state, meta = load_snapshot(snapshot.tensors)  # a damaged snapshot is one failed row, not the end
        except BnportError as err:
            return ExportedFile(onnx=None, passed=False, how="unreadable", failure=str(err),
                                seconds=time.perf_counter() - began)
        loaded = self._module_for(snapshot, state, meta)
        spec = InputSpec.from_dict(self.manifest["input_spec"])
        provenance = dict(loaded.provenance)
        if self._template is None:
            self._template = self._template_from_cache(spec)
        if self._template is not None:
            report = export_reusing(self._template, loaded, spec, out, self.settings, inputs=self._parity_inputs(spec),
                                    device=self.device, metadata=provenance_metadata(loaded), log=self.log)
            if report is not None:
                report["provenance"] = provenance
                atomic_write_json(out.with_suffix(".json"), report)
                return ExportedFile(onnx=out, passed=True, how="graph reused", parity=report["parity"],
                                    report=report, sha256=report["sha256"], provenance=provenance,
                                    seconds=time.perf_counter() - began)
        return self._export_full(snapshot, loaded, spec, out, began)

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
            real = load_parity_images(str(src), spec, limit=self.settings.parity_limit) if src else None
            self._inputs = build_parity_inputs(spec, real=real)
        return self._inputs

    def _export_full(self, snapshot: SnapshotRef, loaded, spec: InputSpec, out: Path, began: float) -> ExportedFile:
        import onnx

        from bnport.export.onnx_export import export_onnx, provenance_metadata

        inputs, counts = self._parity_inputs(spec)
        real = inputs[:counts["real"]] if counts.get("real") else None
        report = export_onnx(loaded.module, out, self.settings, input_spec=spec, parity_images=real,
                             device=self.device, metadata=provenance_metadata(loaded),
                             source={"model": loaded.spec, "snapshot": str(snapshot.tensors)})
        exported = _from_report(report, out, "full export", dict(loaded.provenance), began)
        if exported.passed:
            self._template = build_template(onnx.load(str(out)), folded_state(loaded.module, spec), snapshot.id,
                                            exported.report)
        return exported

    def _template_from_cache(self, spec: InputSpec) -> GraphTemplate | None:
        """A template from an export of this run cached by an earlier call (same settings), if there is one. The
        run's model is loaded (`_module_for`) before this is asked."""
        import onnx

        from bnport.model.snapshot import apply_bn_state, bn_state, load_snapshot

        for snapshot in self.run.snapshots():
            out = self.run.export_path(snapshot, self.key(snapshot))
            if not (out.is_file() and out.with_suffix(".json").is_file()):
                continue
            cached_state, _ = load_snapshot(snapshot.tensors)
            module = self._loaded.module
            saved = bn_state(module)
            apply_bn_state(module, cached_state)
            state = folded_state(module, spec)
            apply_bn_state(module, saved)
            report = json.loads(out.with_suffix(".json").read_text())
            return build_template(onnx.load(str(out)), state, snapshot.id, report)
        return None


def export_model_cached(loaded, out_dir: Path, settings: ExportSettings, *, device: str = "auto",
                        log=None) -> ExportedFile:
    """A PyTorch MODEL exported behind the parity gate into `out_dir/exports/` (cached by content)."""
    from bnport.export.onnx_export import export_onnx, provenance_metadata
    from bnport.export.parity import load_parity_images

    began = time.perf_counter()
    spec = loaded.input_spec
    key = _hash({"bnport": __version__, "spec": loaded.spec, "weights": loaded.weights_sha256,
                 "source": loaded.source_sha256, "input_spec": spec.to_dict(), "settings": settings.key_dict(),
                 "provenance": loaded.provenance})
    out = out_dir / "exports" / f"{file_name_part(Path(loaded.spec).name, 40)}-{key}.onnx"
    cached = _cached(out, began, how="cached export")
    if cached is not None and cached.passed:
        return cached
    data_src = settings.parity_data or loaded.provenance.get("data")
    if data_src is None and log is not None:
        log(f"warning: {loaded.spec}: parity checked on noise inputs only (give --parity-data SRC for real images)")
    real = load_parity_images(str(data_src), spec, limit=settings.parity_limit) if data_src else None
    report = export_onnx(loaded.module, out, settings, input_spec=spec, parity_images=real, device=device,
                         metadata=provenance_metadata(loaded), source={"model": loaded.spec, "weights": loaded.weights})
    exported = _from_report(report, out, "export", dict(loaded.provenance), began)
    exported.provenance = dict(loaded.provenance)
    return exported


class LowerPrecisionCache:
    """Lower-precision versions of verified float32 files (bnport.export.precision.lower_precision_file), cached
    beside their float32 file as NAME.PRECISION-KEY.onnx (+ .json); the key hashes the float32 file, the precision
    and the settings. INT8 calibrates on `settings.calib_data`, else the source the caller names (a run's
    calibration data, else the parity data); the gate judges other images of the same source."""

    def __init__(self, settings: PrecisionSettings, *, device: str = "auto"):
        self.settings, self.device = settings, device
        self._images: dict = {}

    def _images_for(self, src: str, spec: InputSpec):
        from bnport.export.precision import load_precision_images

        if (src, spec) not in self._images:
            self._images[src, spec] = load_precision_images(src, spec, calibration=self.settings.calib_images)
        return self._images[src, spec]

    def make(self, fp32: ExportedFile, precision: str, *, spec: InputSpec, source: str | None,
             label: str) -> ExportedFile:
        """The `precision` file of the verified float32 file `fp32` (from the cache, or made and gated now)."""
        from bnport.export.precision import lower_precision_file

        began = time.perf_counter()
        src = self.settings.calib_data or source
        if precision == "int8" and not src:
            raise BnportError(f"INT8 for {label} needs calibration images and none are known",
                              "pass --calib-data SRC (images like the model's)")
        if src and not Path(src).exists():
            raise BnportError(f"calibration data {src} for {label} is gone", "pass --calib-data SRC")
        s = self.settings
        key = _hash({"bnport": __version__, "fp32": fp32.sha256, "precision": precision, "method": s.calib_method,
                     "calib": src, "n": s.calib_images, "min_cos": s.min_cos})[:12]
        out = fp32.onnx.with_name(f"{fp32.onnx.stem}.{precision}-{key}.onnx")
        report_path = out.with_suffix(".json")
        if report_path.is_file():
            report = json.loads(report_path.read_text())
            passed = report["passed"] and out.is_file()
            return ExportedFile(onnx=out if passed else None, passed=passed, how=f"cached {precision}",
                                parity=report.get("parity"), failure="" if passed else verdict(report.get("parity")),
                                report=report, sha256=report.get("sha256"), provenance=fp32.provenance,
                                seconds=time.perf_counter() - began)
        made = lower_precision_file(fp32.onnx, out, precision, s, spec=spec,
                                    images=self._images_for(src, spec) if src else None, device=self.device)
        report = {**made.result.to_dict(), "sha256": made.sha256 if made.passed else None,
                  "calibration_data": made.calibration_data, "fp32_file": str(fp32.onnx)}
        atomic_write_json(report_path, report)
        how = "INT8 static QDQ" if precision == "int8" else "float16"
        return ExportedFile(onnx=out if made.passed else None, passed=made.passed, how=how, parity=report["parity"],
                            failure="" if made.passed else verdict(report["parity"]), report=report,
                            sha256=report["sha256"], provenance=fp32.provenance, seconds=time.perf_counter() - began)
