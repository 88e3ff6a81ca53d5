"""Formatting of results for people: text and Markdown tables (plots join as later commands need them).
Computes nothing."""
from __future__ import annotations


def format_table(header: list[str], rows: list[list], *, max_width: int = 60) -> str:
    """A plain aligned text table; cells longer than `max_width` are cut with an ellipsis, except in the last
    column, which nothing follows (a reason or a note is read whole there)."""
    last = len(header) - 1

    def cell(v, i: int) -> str:
        s = f"{v:.4g}" if isinstance(v, float) else str(v)
        return s if len(s) <= max_width or i == last else s[: max_width - 1] + "…"

    text = [[cell(h, i) for i, h in enumerate(header)]] + [[cell(v, i) for i, v in enumerate(row)] for row in rows]
    widths = [max(len(r[i]) for r in text) for i in range(len(header))]
    widths[last] = min(widths[last], max_width)  # the rule under the header stays short; long cells run on
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in text]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _pct(value: float) -> str:
    return "-" if value is None or value != value else f"{100 * value:.2f}"


def _score_rows(table, bench: dict, rule: str) -> tuple[list[str], list[list[str]], bool]:
    """Header and rows of one benchmark's table under one TPR rule; the flag says whether a cell is marked noisy."""
    from bnport.score.table import fpr_label

    labels = [fpr_label(f) for f in table.fprs]
    has_acc = bench["kind"] == "bin"
    has_precision = any(m.get("precision", "fp32") != "fp32" for m in table.models)
    has_latency = any(m.get("latency") for m in table.models)
    header = ["model", "parity", "made by"] + (["precision"] if has_precision else []) + \
        (["ms b1", "ms b8"] if has_latency else []) + (["acc (%)"] if has_acc else []) + \
        [f"@{label}" for label in labels]
    rows, marked = [], False
    for model in table.models:
        result = table.result(model["label"], bench["name"])
        row = [model["label"], "pass" if model["passed"] else "FAILED", model["how"]]
        if has_precision:
            row.append(model.get("precision", "fp32"))
        if has_latency:
            medians = (model.get("latency") or {}).get("median_ms", {})
            row += [f"{medians[b]:.2f}" if b in medians else "-" for b in ("1", "8")]
        if result is None:
            rows.append(row + ["-"] * (len(header) - len(row)))
            continue
        if has_acc:
            row.append(f"{result.accuracy[0]:.2f} ± {result.accuracy[1]:.2f}" if result.accuracy else "-")
        for label in labels:
            cell = _pct(result.tpr[rule][label])
            interval = (result.intervals or {}).get(rule, {}).get(label)
            if interval is not None:
                cell += f" [{_pct(interval[0])}, {_pct(interval[1])}]"
            if result.noisy.get(label):
                cell += "*"
                marked = True
            row.append(cell)
        rows.append(row)
    return header, rows, marked


_RULE_TEXT = {"strict": "strict rule: best TPR with FPR <= target",
              "insightface": "insightface rule: nearest ROC point, as eval_ijbc.py (compare with published tables)"}


def _bench_title(bench: dict, table) -> str:
    result = next((r for r in table.results if r.bench == bench["name"]), None)
    counts = f"{result.n_genuine} genuine / {result.n_impostor} impostor pairs" if result else \
        f"{bench['pairs']} pairs"
    switches = ", ".join(f"{k} {'on' if v else 'off'}" for k, v in bench["settings"].items())
    return f"{bench['name']} ({bench['kind']}, {bench['images']} images, {counts}; {switches})"


def _noise_note(table, bench: dict) -> str:
    result = next((r for r in table.results if r.bench == bench["name"]), None)
    n = result.n_impostor if result else 0
    return f"cells marked * : fewer than 10/FPR impostor pairs ({n}), so the figure is noise"


def _runtime_line(table) -> str:
    """The providers that scored, why CUDA was not used when it was not, and the CUDA settings when it was."""
    line = f"onnxruntime providers: {', '.join(table.providers) or '-'}" + \
        (f" ({table.device_note})" if table.device_note else "")
    settings = table.session_settings or {}
    if settings.get("use_tf32") is not None:
        line += (f"; scored as deployed: TF32 {'allowed' if settings['use_tf32'] else 'off'}, cuDNN "
                 f"{str(settings['cudnn_conv_algo_search']).lower()} algorithm search")
    return line


def format_score_table(table) -> str:
    """The score table as text: per benchmark, TPR (%) at each FPR under the strict and the insightface rule."""
    lines = [_runtime_line(table)]
    for bench in table.benches:
        lines += ["", _bench_title(bench, table)]
        for rule in ("strict", "insightface"):
            header, rows, marked = _score_rows(table, bench, rule)
            lines += [f"TPR (%) at FPR, {_RULE_TEXT[rule]}", format_table(header, rows)]
            if marked:
                lines.append(_noise_note(table, bench))
    return "\n".join(lines)


def format_markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured Markdown table."""
    def esc(v) -> str:
        return str(v).replace("|", "\\|")

    out = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(esc(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def _rule_tables_markdown(table, bench: dict) -> list[str]:
    """One benchmark's Markdown tables, under the strict and the insightface rule."""
    lines = []
    for rule in ("strict", "insightface"):
        header, rows, marked = _score_rows(table, bench, rule)
        lines += [f"TPR (%) at FPR, {_RULE_TEXT[rule]}", "", format_markdown_table(header, rows), ""]
        if marked:
            lines += [_noise_note(table, bench), ""]
    return lines


def format_score_markdown(result, *, command: str | None = None) -> str:
    """report.md of a score: selection, tables under both rules, how each file was made, how to reproduce."""
    table = result.table
    lines = ["# bnport score", ""]
    if result.selection is not None:
        lines += ["## Selection", ""] + [f"- {line.strip()}" for line in result.selection.lines()] + [""]
    lines += [_runtime_line(table), ""]
    for bench in table.benches:
        lines += [f"## {_bench_title(bench, table)}", ""]
        lines += _rule_tables_markdown(table, bench)
    lines += ["## Models", ""]
    rows = []
    for model in table.models:
        parity = model.get("parity") or {}
        figures = "-"
        if isinstance(parity.get("max_abs"), float):
            figures = f"max abs {parity['max_abs']:.2e} (scale {parity.get('output_scale', 0):.3g}), " \
                      f"min cos {parity['min_cos']:.7f}"
        rows.append([model["label"], "pass" if model["passed"] else f"FAILED: {model['failure']}", model["how"],
                     figures, model.get("onnx") or "-"])
    lines += [format_markdown_table(["model", "parity", "file made by", "parity figures", "file"], rows), ""]
    if result.notes:
        lines += ["## Notes", ""] + [f"- {n.removeprefix('note: ')}" for n in result.notes] + [""]
    if command:
        lines += ["## Reproduce", "", "```bash", command, "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- plots
# Drawing only: every number comes from bnport.report.data / bnport.score.


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _layer_ticks(ax, layers: list[str], most: int = 14) -> None:
    step = max(1, -(-len(layers) // most))
    positions = list(range(0, len(layers), step))
    ax.set_xticks(positions)
    ax.set_xticklabels([layers[i] for i in positions], rotation=40, ha="right", fontsize=7)


def plot_drift(drift, path) -> None:
    """Relative change of running_mean and running_var per BN layer, one line per snapshot (coloured by step)."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
    cmap = plt.get_cmap("viridis")
    steps = np.asarray(drift.steps, dtype=float)
    span = (steps.max() - steps.min()) or 1.0
    x = np.arange(len(drift.layers))
    for ax, values, what in ((axes[0], drift.mean, "running_mean"), (axes[1], drift.var, "running_var")):
        for row, (snap, step) in enumerate(zip(drift.snapshots, steps)):
            ax.plot(x, np.maximum(values[row], 1e-12), color=cmap((step - steps.min()) / span), lw=1.2,
                    marker="o", ms=2.5, label=f"{snap} (step {int(step)})")
        ax.set_yscale("log")
        ax.set_ylabel(f"{what}\n||P1 - P0|| / ||P0||")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_title("Relative change of each BatchNorm layer's running statistics against the baseline (0000)")
    axes[1].set_xlabel(f"BatchNorm layer, in module order ({len(drift.layers)} layers)")
    _layer_ticks(axes[1], drift.layers)
    handles, labels = axes[0].get_legend_handles_labels()
    if len(handles) > 8:  # a legend of every snapshot would hide the curves: a colour bar says the step instead
        mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(steps.min(), steps.max()))
        fig.colorbar(mappable, ax=axes, label="calibration step of the snapshot")
    else:
        axes[0].legend(fontsize=8, title="snapshot", loc="best")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_bn_outputs(outputs: list, path) -> None:
    """Histograms of BN output values on clean vs noise inputs: a row per model, a column per layer."""
    import numpy as np

    plt = _pyplot()
    layers = outputs[0].layers
    fig, axes = plt.subplots(len(outputs), len(layers), figsize=(3.4 * len(layers), 2.9 * len(outputs)),
                             squeeze=False)
    for row, out in enumerate(outputs):
        for col, layer in enumerate(layers):
            ax = axes[row][col]
            clean, noise = out.clean[layer], out.noise[layer]
            lo, hi = np.percentile(np.concatenate([clean, noise]), [0.5, 99.5])
            bins = np.linspace(lo, hi, 60)
            ax.hist(clean, bins=bins, density=True, alpha=0.55, color="tab:blue", label=f"clean ({out.n_clean} images)")
            ax.hist(noise, bins=bins, density=True, alpha=0.55, color="tab:orange",
                    label=f"noise: {', '.join(out.noise_kinds)} ({out.n_noise})")
            ax.set_title(f"{out.model}: {layer}", fontsize=9)
            ax.set_xlabel("BN output value", fontsize=8)
            if col == 0:
                ax.set_ylabel("density", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.suptitle("Distribution of BatchNorm outputs (eval mode) on clean and noise inputs, first and last layers",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_tpr_vs_snapshot(table, bench: str, selection: dict | None, path, *, rule: str = "strict") -> None:
    """TPR at each FPR target against the snapshot, the baseline as dashed reference lines, the selected model
    marked; models that failed parity are marked at the bottom."""
    import numpy as np

    from bnport.score.table import fpr_label

    plt = _pyplot()
    models = [m for m in table.models if m.get("precision", "fp32") == "fp32"]  # snapshots compete in float32
    labels = [m["label"] for m in models]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.55 * len(labels) + 4), 5))
    colors = plt.get_cmap("tab10")
    baseline = (selection or {}).get("baseline") or (labels[0] if labels else None)
    for k, fpr in enumerate(table.fprs):
        key = fpr_label(fpr)
        values = [100 * r.tpr[rule][key] if (r := table.result(m, bench)) else np.nan for m in labels]
        ax.plot(x, values, marker="o", color=colors(k % 10), label=f"FPR {key}")
        base = table.result(baseline, bench) if baseline else None
        if base is not None:
            ax.axhline(100 * base.tpr[rule][key], color=colors(k % 10), ls="--", lw=0.8, alpha=0.7)
    failed = [i for i, m in enumerate(models) if not m["passed"]]
    if failed:
        ax.scatter(failed, [ax.get_ylim()[0]] * len(failed), marker="x", color="red", s=60, zorder=5,
                   label="failed parity (not scored)")
    chosen = (selection or {}).get("selected")
    if chosen in labels:
        shipped = (selection or {}).get("final") or chosen
        ships = f", ships as {shipped}" if shipped != chosen else ""
        ax.axvline(labels.index(chosen), color="black", ls=":", lw=1.5, label=f"selected: {chosen}{ships}")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("model (snapshot; dashed lines: the baseline's TPR at the same FPR)")
    ax.set_ylabel("TPR (%)")
    ax.set_title(f"{bench}: TPR at each FPR per snapshot ({rule} rule)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_roc(curves: list, bench: str, path) -> None:
    """ROC curves on a log FPR axis; bootstrap intervals at the FPR targets as error bars where computed."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    styles = ["-", "--"]
    for k, curve in enumerate(curves):
        positive = curve.fpr > 0
        line, = ax.plot(curve.fpr[positive], 100 * curve.tpr[positive], ls=styles[k % 2], lw=1.6, label=curve.model)
        if curve.intervals:
            lo = np.array([100 * a for a, _ in curve.intervals])
            hi = np.array([100 * b for _, b in curve.intervals])
            mid = (lo + hi) / 2
            ax.errorbar(curve.targets, mid, yerr=[mid - lo, hi - mid], fmt="none", ecolor=line.get_color(),
                        capsize=3, label=f"{curve.model}: bootstrap 95% interval")
    ax.set_xscale("log")
    ax.set_xlabel("false positive rate (log scale)")
    ax.set_ylabel("true positive rate (%)")
    ax.set_title(f"{bench}: ROC of the baseline and the selected model")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


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
    if table is not None:
        for bench in table.benches:
            name = bench["name"]
            path = out / f"tpr_{file_name_part(name)}.png"
            plot_tpr_vs_snapshot(table, name, selection, path)
            files.append(path)
            sections += [f"## {_bench_title(bench, table)}", "", f"![TPR per snapshot]({path.name})", ""]
            if data.rocs.get(name):
                path = out / f"roc_{file_name_part(name)}.png"
                plot_roc(data.rocs[name], name, path)
                files.append(path)
                sections += [f"![ROC]({path.name})", ""]
            sections += _rule_tables_markdown(table, bench)
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
