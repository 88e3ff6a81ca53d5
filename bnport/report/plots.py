"""The report's plots, drawn with matplotlib (Agg, imported when the first plot is drawn): BN drift per layer, BN
output distributions, TPR per snapshot, ROC curves. Drawing only: every number comes from bnport.report.data and
bnport.score."""
from __future__ import annotations


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


def paired_gains(table, bench: str) -> list[tuple[str, dict]]:
    """(model, its paired interval against the baseline) for each float32 model of `bench` that has one."""
    out = []
    for m in table.models:
        result = table.result(m["label"], bench) if m.get("precision", "fp32") == "fp32" else None
        paired = (result.extra.get("paired") if result is not None else None) or None
        if paired is not None:
            out.append((m["label"], paired))
    return out


def plot_paired_gains(table, bench: str, selection: dict | None, path) -> None:
    """Each snapshot's gain over the baseline at the paired FPR, with its paired 95% bootstrap interval: a bar that
    crosses 0 is a win within noise. The selected model is marked."""
    plt = _pyplot()
    gains = paired_gains(table, bench)
    labels = [label for label, _ in gains]
    delta = [100 * p["delta"] for _, p in gains]
    low = [100 * (p["delta"] - p["low"]) for _, p in gains]
    high = [100 * (p["high"] - p["delta"]) for _, p in gains]
    clear = [p["low"] > 0 for _, p in gains]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.55 * len(labels) + 4), 4.5))
    ax.axhline(0.0, color="black", lw=0.8)
    for i, (d, lo, hi, ok) in enumerate(zip(delta, low, high, clear)):
        ax.errorbar([i], [d], yerr=[[lo], [hi]], fmt="o", capsize=5, color="tab:green" if ok else "tab:gray",
                    label=("interval clears 0" if ok else "interval reaches 0 (noise)"))
    chosen = (selection or {}).get("selected")
    if chosen in labels:
        ax.axvline(labels.index(chosen), color="black", ls=":", lw=1.5, label=f"selected: {chosen}")
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="best")
    first = gains[0][1] if gains else {}
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"TPR@{first.get('fpr', '?')} minus the baseline's (points)")
    ax.set_xlabel(f"model (95% paired bootstrap interval, {first.get('replicates', '?')} replicates of "
                  f"{first.get('units', '?')})")
    ax.set_title(f"{bench}: gain over {first.get('vs', 'the baseline')}, paired intervals")
    ax.grid(True, alpha=0.3)
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
