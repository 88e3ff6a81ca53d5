"""report.md and its plots for one run: the selection, BN drift, BN outputs, TPR per snapshot and ROC per benchmark,
the score tables and each exported file's parity. Formats and draws what bnport.report.data computed."""
from __future__ import annotations

from bnport.report.plots import (paired_gains, plot_bn_outputs, plot_drift, plot_paired_gains, plot_roc,
                                 plot_tpr_vs_snapshot)
from bnport.score.format import bench_title, rule_tables_markdown
from bnport.text import format_markdown_table


def write_report(data, out_dir) -> list:
    """Draw every plot of `data` (bnport.report.data.ReportData) into `out_dir` and write report.md beside them;
    returns the files written."""
    from pathlib import Path

    from bnport.atomic import atomic_write_bytes, file_name_part
    from bnport.score.table import ScoreTable

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files, sections = [], []
    manifest = data.manifest
    calibration = manifest.get("calibration", {})
    noise = ", ".join(n.get("spec", n.get("name", "?")) for n in calibration.get("noise", [])) or "none"
    lines = ["# bnport report", "",
             f"Run `{data.run}`: model `{manifest.get('model', {}).get('spec')}`"
             f" (weights sha256 `{(manifest.get('model', {}).get('weights_sha256') or '-')[:16]}`), "
             f"calibrated in {calibration.get('mode')} mode on `{manifest.get('data', {}).get('src')}` with noise "
             f"{noise}; {calibration.get('total_steps')} steps of batch {calibration.get('batch_size')}, "
             f"{len(data.drift.snapshots)} snapshots after the baseline.", ""]
    table = ScoreTable.from_dict(data.table) if data.table else None
    selection = (data.table or {}).get("selection")
    if selection:
        lines += ["## Selection", ""] + [f"- {line.strip()}" for line in selection.get("text", [])] + [""]
    path = out / "drift.png"
    plot_drift(data.drift, path)
    files.append(path)
    sections += ["## BatchNorm statistics", "", "![relative change of running statistics](drift.png)", ""]
    if data.outputs:
        path = out / "bn_outputs.png"
        plot_bn_outputs(data.outputs, path)
        files.append(path)
        sections += ["![BN output distributions](bn_outputs.png)", ""]
    if data.consistency is not None:
        sections += consistency_section(data.consistency, out, files)
    if data.recipes:
        sections += recipes_section(data, table, out, files)
    if data.analysis is not None:
        sections += analysis_section(data.analysis, selection, out, files)
    if table is not None:
        for bench in table.benches:
            name = bench["name"]
            path = out / f"tpr_{file_name_part(name)}.png"
            plot_tpr_vs_snapshot(table, name, selection, path)
            files.append(path)
            sections += [f"## {bench_title(bench, table)}", "", f"![TPR per snapshot]({path.name})", ""]
            if paired_gains(table, name):
                path = out / f"gain_{file_name_part(name)}.png"
                plot_paired_gains(table, name, selection, path)
                files.append(path)
                sections += [f"![gain over the baseline, paired intervals]({path.name})", ""]
            if data.rocs.get(name):
                path = out / f"roc_{file_name_part(name)}.png"
                plot_roc(data.rocs[name], name, path)
                files.append(path)
                sections += [f"![ROC]({path.name})", ""]
            sections += rule_tables_markdown(table, bench)
        sections += ["## Parity of each exported file", "", _parity_markdown(table), ""]
    if data.notes:
        sections += ["## Notes", ""] + [f"- {n}" for n in data.notes] + [""]
    report = out / "report.md"
    atomic_write_bytes(report, "\n".join(lines + sections).encode())
    files.append(report)
    return files


def _parity_markdown(table) -> str:
    rows = []
    for model in table.models:
        parity = model.get("parity") or {}
        def num(key, fmt):
            value = parity.get(key)
            return format(value, fmt) if isinstance(value, (int, float)) else "-"
        rows.append([model["label"], "pass" if model["passed"] else "FAILED", model["how"], num("max_abs", ".2e"),
                     num("output_scale", ".3g"), num("max_rel", ".2e"), num("min_cos", ".9f"),
                     parity.get("bound", "-") if isinstance(parity.get("bound"), str) else "-"])
    return format_markdown_table(["model", "parity", "file made by", "max abs error", "output scale",
                                  "max rel error", "min row cosine", "bound that decided"], rows)


ANALYSIS_TEXT = {
    "nll": ("How likely each BN layer finds its inputs under its running statistics (-log N, mean over channels, per "
            "image position; lower is likelier), for clean images and each noise group: a good recalibration makes "
            "clean inputs likelier and keeps the noise apart."),
    "cosine": ("Cosine of each image's BN output to the mean output of the clean images: clean images cluster near "
               "their centre; noise that stays far from it is kept separate, noise that moves towards it is absorbed "
               "by the statistics."),
    "distance": ("The same as a Euclidean distance to the clean centre: it also shows how much each group's outputs "
                 "grow or shrink under the new statistics, which the cosine cannot."),
}


def analysis_section(analysis, selection: dict | None, out, files: list) -> list[str]:
    """Draw the analysis views into `out` (appending to `files`) and return their report.md section."""
    from bnport.report.analysis_plots import VIEWS, plot_layer_boxes, plot_likelihood_per_snapshot

    models = " against ".join(m.model for m in analysis.models)
    sections = ["## How the BN layers see clean and noise inputs", "",
                f"Input groups: {', '.join(analysis.groups)} ({analysis.n_images} images each); models: {models}.", ""]
    for metric, (name, _, _) in VIEWS.items():
        path = out / name
        plot_layer_boxes(analysis, metric, path)
        files.append(path)
        sections += [f"![{metric}]({name})", "", ANALYSIS_TEXT[metric], ""]
    path = out / "likelihood_per_snapshot.png"
    plot_likelihood_per_snapshot(analysis, (selection or {}).get("selected"), path)
    files.append(path)
    sections += ["![log-likelihood per snapshot](likelihood_per_snapshot.png)", "",
                 "The median log-likelihood of each input group at the last two BN layers "
                 f"({', '.join(analysis.last_layers)}) for every snapshot: the snapshot whose curves lie furthest "
                 "apart separates clean inputs from noise best.", ""]
    return sections


def consistency_section(series, out, files: list) -> list[str]:
    """Draw consistency.png into `out` (appending to `files`) and return its report.md lines."""
    from bnport.report.recipe_plots import plot_consistency

    path = out / "consistency.png"
    plot_consistency(series, path)
    files.append(path)
    worst = ", ".join(f"{label} {row.max():.1e}" for label, row in zip(series.labels, series.values))
    return ["![BN consistency per layer](consistency.png)", "",
            "How far each BN layer's stored statistics are from what that layer sees in the deployed (eval-mode) "
            "model on held-out calibration images (worst channel per layer; lower is closer). Worst layer: "
            f"{worst}. ema and exact modes drift with depth; sequential mode measures each layer as deployed.", ""]


def recipes_section(data, table, out, files: list) -> list[str]:
    """Draw the recipe comparison (metric per snapshot, drift per recipe) and return its report.md section; `table`:
    the score table (bnport.score.table.ScoreTable) of `data.table`, None without one."""
    from bnport.report.recipe_plots import plot_recipe_drift, plot_recipe_metric, recipe_lines
    from bnport.score.format import recipe_outcome

    lines = ["## Recipes", "", f"Recipes compared: {', '.join(data.recipes)}; every one starts from the same "
             "baseline (the model's own statistics) and is scored on the same benchmarks in one table.", ""]
    if data.table and recipe_lines(data.table):
        path = out / "recipes_metric.png"
        plot_recipe_metric(data.table, path)
        files.append(path)
        lines += ["![selection metric per snapshot and recipe](recipes_metric.png)", ""]
        lines += [f"- {line}" for line in recipe_outcome(table, data.table.get("selection"))] + [""]
    path = out / "recipes_drift.png"
    plot_recipe_drift(data.recipes, path)
    files.append(path)
    lines += ["![BN drift per recipe](recipes_drift.png)", ""]
    return lines
