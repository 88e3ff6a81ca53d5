"""Drawing of the analysis views (bnport.report.analysis computes every number): BN log-likelihood and distance to
the clean centre as box plots per layer and input group (baseline beside the selected snapshot), and the median
log-likelihood at the last two BN layers per snapshot."""
from __future__ import annotations

import numpy as np

from bnport.report.plots import _pyplot

_MODEL_COLOURS = ("tab:blue", "tab:orange", "tab:green")
VIEWS = {
    "nll": ("likelihood.png", "-log N(x | running stats), mean over channels",
            "BN log-likelihood of each layer's inputs (lower: likelier under the layer's running statistics)"),
    "cosine": ("centre_cosine.png", "cosine to the clean centre",
               "Cosine of each image's BN output to the clean images' mean output"),
    "distance": ("centre_distance.png", "Euclidean distance to the clean centre",
                 "Euclidean distance of each image's BN output to the clean images' mean output"),
}


def _scale(ax, values: list[np.ndarray]) -> None:
    """Log axis for positive figures, symmetric log where some are negative (a log-likelihood can be)."""
    from matplotlib.ticker import FuncFormatter

    flat = np.concatenate([v for v in values if len(v)]) if values else np.zeros(1)
    if np.all(flat > 0):
        ax.set_yscale("log")
    else:
        ax.set_yscale("symlog", linthresh=1.0)
    narrow = np.all(flat > 0) and np.log10(flat.max() / flat.min()) < 1  # within a decade: label every minor tick
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.3g}" if narrow or f"{v:.3g}"[0] in "2357" else ""))


def plot_layer_boxes(analysis, metric: str, path) -> None:
    """One panel per layer: for each input group, a box per model (baseline, selected), whiskers at the 5th and 95th
    percentiles, no outliers drawn."""
    plt = _pyplot()
    _, ylabel, title = VIEWS[metric]
    layers, groups, models = analysis.layers, analysis.groups, analysis.models
    cols = min(5, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols + 1, 3.2 * rows + 0.8), squeeze=False)
    width = 0.8 / max(1, len(models))
    for index, layer in enumerate(layers):
        ax = axes[index // cols][index % cols]
        drawn = []
        for k, model in enumerate(models):
            values = [getattr(model.figures[layer][g], metric) for g in groups]
            positions = np.arange(len(groups)) + (k - (len(models) - 1) / 2) * width
            parts = ax.boxplot(values, positions=positions, widths=width * 0.9, whis=(5, 95), showfliers=False,
                               patch_artist=True, manage_ticks=False)
            for box in parts["boxes"]:
                box.set_facecolor(_MODEL_COLOURS[k % len(_MODEL_COLOURS)])
                box.set_alpha(0.6)
            drawn += values
        if metric != "cosine":
            _scale(ax, drawn)
        ax.set_xticks(np.arange(len(groups)))
        ax.set_xticklabels(groups, rotation=35, ha="right", fontsize=7)
        ax.set_title(layer, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        if index % cols == 0:
            ax.set_ylabel(ylabel, fontsize=8)
    for index in range(len(layers), rows * cols):
        axes[index // cols][index % cols].set_visible(False)
    handles = [plt.Rectangle((0, 0), 1, 1, color=_MODEL_COLOURS[k % len(_MODEL_COLOURS)], alpha=0.6)
               for k in range(len(models))]
    fig.legend(handles, [m.model for m in models], loc="upper right", fontsize=8, title="BN statistics of")
    fig.suptitle(f"{title}\n{analysis.n_images} clean images per group; first and last BN layers in module order",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.93, 0.97))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_likelihood_per_snapshot(analysis, selected: str | None, path) -> None:
    """Median log-likelihood per input group against the snapshot, at the second-to-last and the last BN layer:
    the snapshot whose curves sit furthest apart separates clean inputs from noise best."""
    plt = _pyplot()
    labels = list(analysis.per_snapshot)
    fig, axes = plt.subplots(1, len(analysis.last_layers), figsize=(6.2 * len(analysis.last_layers), 4.6),
                             squeeze=False)
    colours = plt.get_cmap("tab10")
    x = np.arange(len(labels))
    for ax, layer in zip(axes[0], analysis.last_layers):
        drawn = []
        for k, group in enumerate(analysis.groups):
            values = np.array([analysis.per_snapshot[label][layer][group] for label in labels])
            ax.plot(x, values, marker="o", color=colours(k % 10), label=group, lw=2.2 if group == "clean" else 1.2)
            drawn.append(values)
        _scale(ax, drawn)
        if selected in labels:
            ax.axvline(labels.index(selected), color="black", ls=":", lw=1.5, label=f"selected: {selected}")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{layer}", fontsize=9)
        ax.set_ylabel("median -log N(x | running stats)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8, title="inputs", loc="best")
    fig.suptitle("Log-likelihood per input group at the last two BN layers, for every snapshot", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
