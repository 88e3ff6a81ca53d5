"""The report's comparison plots: each BN layer's consistency figure for some snapshots, and, for a run that compared
calibration recipes, the selection metric per snapshot and the BN drift with one line per recipe. Drawing only: the
numbers come from bnport.report.data and the score table."""
from __future__ import annotations

from bnport.report.plots import _layer_ticks, _pyplot


def plot_consistency(series, path) -> None:
    """Each BN layer's held-out consistency figure (log axis), one line per snapshot."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 4.8))
    x = np.arange(len(series.layers))
    for label, row, images in zip(series.labels, series.values, series.images):
        ax.plot(x, np.maximum(row, 1e-9), marker="o", ms=2.5, lw=1.2,
                label=f"{label} (worst {np.nanmax(row):.1e}, {images} images)")
    ax.set_yscale("log")
    ax.set_ylabel("worst channel's relative error\n(mean in std units, or variance)")
    ax.set_xlabel(f"BatchNorm layer, in module order ({len(series.layers)} layers)")
    ax.set_title("BN consistency: stored statistics against each layer's input in the deployed (eval-mode) model, "
                 "held-out calibration images", fontsize=10)
    _layer_ticks(ax, series.layers)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="snapshot")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def recipe_lines(table: dict) -> dict[str, list[tuple[int, str, float]]]:
    """Per recipe, (snapshot index, label, selection metric) of its float32 models that the selection scored
    (bnport.score.format.recipe_points), the shared baseline first at index 0; {} when the table compares no
    recipes."""
    from bnport.score.format import recipe_points

    selection = table.get("selection") or {}
    values = selection.get("values") or {}
    baseline = selection.get("baseline")
    lines = {name: points for name, points in recipe_points(table.get("models", []), values).items() if points}
    if baseline in values:
        for points in lines.values():
            points.insert(0, (0, baseline, values[baseline]))
    return {name: sorted(points) for name, points in lines.items()}


def plot_recipe_metric(table: dict, path) -> None:
    """The selection's metric against the snapshot, one line per recipe from the shared baseline; the selected
    model starred."""
    plt = _pyplot()
    selection = table.get("selection") or {}
    lines = recipe_lines(table)
    percent = all(v <= 1.0 for points in lines.values() for _, _, v in points)
    fig, ax = plt.subplots(figsize=(8.5, 5))
    for name, points in lines.items():
        ax.plot([i for i, _, _ in points], [100 * v if percent else v for _, _, v in points], marker="o", label=name)
        for i, label, v in points:
            if label == selection.get("selected") and i > 0:
                ax.scatter([i], [100 * v if percent else v], marker="*", s=260, color="black", zorder=5,
                           label=f"selected: {label}")
    ax.set_xlabel("snapshot (0 = the shared baseline)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("selection metric" + (" (%)" if percent else ""))
    ax.set_title(f"{selection.get('bench', '?')}: {selection.get('rule_text', 'the selection metric')}, per recipe",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best", title="recipe")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_recipe_drift(recipes: dict, path) -> None:
    """Relative change of running_mean and running_var per BN layer at each recipe's last snapshot, one line per
    recipe."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
    layers = next(iter(recipes.values())).layers
    for ax, what in ((axes[0], "mean"), (axes[1], "var")):
        for name, drift in recipes.items():
            values = getattr(drift, what)[-1]
            ax.plot(np.arange(len(values)), np.maximum(values, 1e-12), marker="o", ms=2.5, lw=1.2,
                    label=f"{name} ({drift.snapshots[-1]}, step {drift.steps[-1]})")
        ax.set_yscale("log")
        ax.set_ylabel(f"running_{what}\n||P1 - P0|| / ||P0||")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_title("Relative change of each BatchNorm layer's running statistics at each recipe's last snapshot")
    axes[0].legend(fontsize=8, title="recipe", loc="best")
    axes[1].set_xlabel(f"BatchNorm layer, in module order ({len(layers)} layers)")
    _layer_ticks(axes[1], layers)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
