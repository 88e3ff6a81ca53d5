"""What `bnport report` draws, computed here so that bnport.report.write only formats and draws: the relative change of
each BN layer's running statistics per snapshot, BN output values on clean and noise inputs, TPR per snapshot, and
ROC curves of chosen models.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bnport.errors import BnportError
from bnport.runs import Run


@dataclass
class DriftSeries:
    """`||P1 - P0|| / ||P0||` per BN layer (columns, in module order) and snapshot (rows, baseline excluded), for
    running_mean and running_var, as the published technique plots them."""

    layers: list[str]
    snapshots: list[str]
    steps: list[int]
    mean: np.ndarray
    var: np.ndarray


def drift_series(run: Run) -> DriftSeries:
    """Read every snapshot's drift record (written by calibrate) into arrays."""
    snaps = [s for s in run.snapshots() if s.index > 0]
    if not snaps:
        raise BnportError(f"run {run.path} has no snapshot beyond the baseline", "let bnport calibrate run further")
    layers: list[str] | None = None
    ids, steps, means, variances = [], [], [], []
    for snap in snaps:
        meta = snap.meta()
        drift = meta.get("drift") or {}
        if layers is None:
            layers = list(drift)
        ids.append(snap.id)
        steps.append(int(meta.get("step", snap.index)))
        means.append([drift.get(layer, {}).get("running_mean", np.nan) for layer in layers])
        variances.append([drift.get(layer, {}).get("running_var", np.nan) for layer in layers])
    return DriftSeries(layers=layers or [], snapshots=ids, steps=steps, mean=np.array(means, dtype=float),
                       var=np.array(variances, dtype=float))


@dataclass
class BnOutputs:
    """Samples of BN output values (eval mode, the snapshot's statistics) on clean and noise inputs, per layer;
    `noise_kinds` says what the noise inputs were."""

    model: str
    layers: list[str]
    clean: dict[str, np.ndarray]
    noise: dict[str, np.ndarray]
    noise_kinds: list[str]
    n_clean: int
    n_noise: int


def noise_inputs(run_manifest: dict, spec, count: int, *, seed: int = 0):
    """Inputs like the run's appended noise (fractal, Gaussian, out-of-domain); Gaussian N(0, 1) images and fractals
    when the run appended none. Returns (tensor, kinds)."""
    import torch

    from bnport.calibrate.noise import generate_fractal

    kinds = [n.get("name") for n in run_manifest.get("calibration", {}).get("noise", [])]
    kinds = [k for k in kinds if k in ("fractal", "gauss-append")] or ["gauss-append", "fractal"]
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    per = max(1, count // len(kinds))
    parts = []
    for kind in kinds:
        if kind == "fractal":
            parts += [spec.to_tensor(generate_fractal(rng, spec.height, spec.width))[None] for _ in range(per)]
        else:
            parts.append(torch.randn(per, 3, spec.height, spec.width, generator=generator))
    return torch.cat(parts), kinds


def bn_outputs(run: Run, snapshot_index: int, *, layers_each_end: int = 2, n_images: int = 32,
               samples: int = 20000, seed: int = 0) -> BnOutputs:
    """BN outputs of the first and last `layers_each_end` BN layers of the run's model with snapshot
    `snapshot_index` applied, on up to `n_images` calibration images and as many noise inputs; at most `samples`
    values per layer and kind (an evenly spaced subsample)."""
    import torch

    from bnport.export.parity import load_parity_images
    from bnport.model.snapshot import bn_modules, load_snapshot_model

    loaded = load_snapshot_model(run.snapshot(snapshot_index).tensors)
    manifest = run.manifest()
    spec = loaded.input_spec
    src = manifest.get("data", {}).get("src")
    if not src or not Path(src).exists():
        raise BnportError(f"the run's calibration data {src} is gone", "restore it to draw BN output distributions")
    clean = load_parity_images(src, spec, limit=n_images)
    noise, kinds = noise_inputs(manifest, spec, len(clean), seed=seed)
    bns = bn_modules(loaded.module)
    chosen = bns[:layers_each_end] + bns[-layers_each_end:] if len(bns) > 2 * layers_each_end else bns
    captured: dict[str, list] = {}
    hooks = [bn.register_forward_hook(lambda m, i, o, name=name: captured.setdefault(name, []).append(o.detach()))
             for name, bn in chosen]
    out = {}
    try:
        for key, x in (("clean", clean), ("noise", noise)):
            captured.clear()
            with torch.inference_mode():
                loaded.module.eval()(x)
            out[key] = {name: _subsample(torch.cat(captured[name]).flatten().numpy(), samples) for name, _ in chosen}
    finally:
        for h in hooks:
            h.remove()
    return BnOutputs(model=run.snapshot(snapshot_index).label, layers=[n for n, _ in chosen], clean=out["clean"],
                     noise=out["noise"], noise_kinds=kinds, n_clean=len(clean), n_noise=len(noise))


def _subsample(values: np.ndarray, n: int) -> np.ndarray:
    if len(values) <= n:
        return values.astype(np.float32)
    return values[np.linspace(0, len(values) - 1, n).astype(int)].astype(np.float32)


@dataclass
class RocCurve:
    """A ROC (thinned for drawing) of one model on one benchmark, with the bootstrap intervals at the FPR targets
    when they were computed."""

    model: str
    bench: str
    fpr: np.ndarray
    tpr: np.ndarray
    targets: list[float] = field(default_factory=list)
    intervals: list[tuple[float, float]] | None = None


def roc_curves(table: dict, bench: str, models: list[str], *, points: int = 600) -> list[RocCurve]:
    """ROC curves of `models` on `bench` from the per-pair scores the score step saved (labels from its record)."""
    from bnport.score.metrics import compute_roc

    curves = []
    for model in models:
        result = next((r for r in table["results"] if r["model"] == model and r["bench"] == bench), None)
        if result is None or not result.get("scores_file"):
            continue
        scores_file, labels_file = Path(result["scores_file"]), Path(result.get("labels_file") or "")
        if not scores_file.is_file() or not labels_file.is_file():
            continue
        roc = compute_roc(np.load(labels_file), np.load(scores_file), max_points=points)
        intervals = None
        if result.get("intervals"):
            strict = result["intervals"]["strict"]
            intervals = [tuple(strict[label]) for label in table["fpr_labels"]]
        curves.append(RocCurve(model=model, bench=bench, fpr=roc.fpr, tpr=roc.tpr, targets=list(table["fprs"]),
                               intervals=intervals))
    return curves


def read_score_table(path: str | Path) -> dict:
    """table.json of a score (what `bnport score` wrote)."""
    path = Path(path)
    if not path.is_file():
        raise BnportError(f"no score table at {path}", "run bnport score RUN first (or bnport run CONFIG)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise BnportError(f"cannot read {path}: {e}", "re-run bnport score") from None


@dataclass
class ReportData:
    """Everything `bnport report` shows for one run, computed: drift, BN outputs (baseline and selected),
    the score table and selection, ROC curves of the baseline and the selected model per benchmark."""

    run: Path
    manifest: dict
    drift: DriftSeries
    outputs: list[BnOutputs]
    table: dict | None
    rocs: dict[str, list[RocCurve]]
    notes: list[str] = field(default_factory=list)
    analysis: object = None  # bnport.report.analysis.Analysis, None when it could not be computed
    consistency: "ConsistencySeries | None" = None
    recipes: dict[str, DriftSeries] = field(default_factory=dict)  # a recipe comparison's drift, per recipe


def report_data(run: Run, *, score_dir: str | Path | None = None, ood: str | Path | None = None,
                analysis_images: int = 32, recipes: list[Run] | None = None) -> ReportData:
    """Gather what the report draws. The score table is RUN/score/table.json (or `score_dir`); without one the report
    shows the calibration alone and says so. `ood`: an out-of-domain image source added to the analysis views'
    input groups; `analysis_images`: clean images per group there. `recipes`: the runs of a recipe comparison
    (`run` is one of them, the one holding the selected model), whose drift and consistency are shown side by side."""
    from bnport.report.analysis import analyse_run

    manifest = run.manifest()
    drift = drift_series(run)
    notes: list[str] = []
    table_path = Path(score_dir or run.score_dir) / "table.json"
    table = read_score_table(table_path) if table_path.is_file() else None
    if table is None:
        notes.append(f"no score table at {table_path}: run bnport score {run.path} for TPR plots and ROC curves")
    selected = (table or {}).get("selection", {}) or {}
    picks = [0]
    chosen = selected.get("selected")
    if chosen:
        model = next((m for m in table["models"] if m["label"] == chosen), None)
        if model and model.get("snapshot") and int(model["snapshot"]) != 0:
            picks.append(int(model["snapshot"]))
    outputs = []
    try:
        outputs = [bn_outputs(run, index) for index in picks]
    except BnportError as e:
        notes.append(f"BN output distributions not drawn: {e}")
    analysis = None
    try:
        analysis = analyse_run(run, picks, n_images=analysis_images, ood=ood)
        notes += analysis.notes
    except BnportError as e:
        if ood is not None and not Path(ood).exists():
            raise
        notes.append(f"BN likelihood and distance views not drawn: {e}")
    rocs: dict[str, list[RocCurve]] = {}
    if table is not None:
        baseline = selected.get("baseline") or (table["models"][0]["label"] if table["models"] else None)
        models = [m for m in dict.fromkeys([baseline, chosen]) if m]
        for bench in table["benches"]:
            rocs[bench["name"]] = roc_curves(table, bench["name"], models)
    lasts = [(r.path.name, r.last_snapshot()) for r in recipes or []]
    consistency = consistency_series([("0000 (baseline)", run.snapshot(0))]
                                     + [(f"{name}/{last.id} (last)", last) for name, last in lasts
                                        if last is not None and last.index > 0]
                                     + ([(chosen, run.snapshot(picks[-1]))] if picks[-1] > 0 else []))
    if consistency is None:
        notes.append("BN consistency not drawn: the snapshots hold no consistency figure (calibrated with "
                     "--consistency off, or by an older bnport)")
    return ReportData(run=run.path, manifest=manifest, drift=drift, outputs=outputs, table=table, rocs=rocs,
                      notes=notes, analysis=analysis, consistency=consistency,
                      recipes={r.path.name: drift_series(r) for r in recipes or []})


@dataclass
class ConsistencySeries:
    """Each BN layer's held-out consistency figure (the larger of its worst mean and worst variance error,
    bnport.calibrate.consistency) for some snapshots: `values[i, j]` for snapshot `labels[i]` and layer `layers[j]`
    (NaN where the layer has no figure)."""

    layers: list[str]
    labels: list[str]
    values: np.ndarray
    images: list[int]


def consistency_series(snapshots: list[tuple[str, object]]) -> ConsistencySeries | None:
    """The held-out consistency figures of (label, SnapshotRef) pairs, one row each (duplicate labels once); None when
    none of them has one."""
    rows, labels, images, layers = [], [], [], []
    for label, snap in snapshots:
        figure = (snap.meta().get("consistency") or {}).get("held_out") or {}
        if label in labels or not figure.get("layers"):
            continue
        layers += [name for name in figure["layers"] if name not in layers]
        labels.append(label)
        images.append(int(figure.get("images") or 0))
        rows.append({name: max(f["mean_worst"], f["var_worst"]) for name, f in figure["layers"].items()})
    if not rows:
        return None
    values = np.array([[row.get(name, np.nan) for name in layers] for row in rows], dtype=float)
    return ConsistencySeries(layers=layers, labels=labels, values=values, images=images)
