"""The score table for people: text and Markdown, per benchmark, TPR (%) at each FPR under the strict and the
insightface rule, with the columns a table needs (precision, latency, 10-fold accuracy) and what a reader must know
to trust it (providers and their settings, noisy cells). Formats `bnport.score.table` results; computes nothing."""
from __future__ import annotations

from bnport.score.table import RULES, fpr_label
from bnport.text import format_markdown_table, format_table


def _pct(value: float) -> str:
    return "-" if value is None or value != value else f"{100 * value:.2f}"


def _score_rows(table, bench: dict, rule: str) -> tuple[list[str], list[list[str]], bool]:
    """Header and rows of one benchmark's table under one TPR rule; the flag says whether a cell is marked noisy."""
    labels = [fpr_label(f) for f in table.fprs]
    has_acc = bench["kind"] == "bin"
    has_precision = any(m.get("precision", "fp32") != "fp32" for m in table.models)
    has_latency = any(m.get("latency") for m in table.models)
    paired = [r.extra["paired"] for r in table.results if r.bench == bench["name"] and r.extra.get("paired")]
    paired_at = paired[0]["fpr"] if paired and rule == "strict" else None
    has_recipe = any(m.get("recipe") for m in table.models)
    has_consistency = _has_consistency(table)
    header = ["model"] + (["recipe"] if has_recipe else []) + ["parity", "made by"] + \
        (["BN consistency"] if has_consistency else []) + \
        (["precision"] if has_precision else []) + \
        (["ms b1", "ms b8"] if has_latency else []) + (["acc (%)"] if has_acc else []) + \
        [f"@{label}" for label in labels] + ([f"@{paired_at} vs {paired[0]['vs']} (95% paired)"] if paired_at else [])
    rows, marked = [], False
    for model in table.models:
        result = table.result(model["label"], bench["name"])
        row = [model["label"]] + ([model.get("recipe") or "-"] if has_recipe else []) + \
            ["pass" if model["passed"] else "FAILED", model["how"]]
        if has_consistency:
            figure = model.get("consistency") or {}
            row.append(f"{figure['worst']:.1e}" if isinstance(figure.get("worst"), (int, float)) else "-")
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
        if paired_at:
            p = result.extra.get("paired")
            row.append(f"{100 * p['delta']:+.2f} ({100 * p['low']:+.2f} .. {100 * p['high']:+.2f})" if p else "-")
        rows.append(row)
    return header, rows, marked


_RULE_TEXT = {"strict": "strict rule: best TPR with FPR <= target",
              "insightface": "insightface rule: nearest ROC point, as eval_ijbc.py (compare with published tables)"}


def bench_title(bench: dict, table) -> str:
    """One benchmark's heading: name, kind, images, genuine/impostor pairs and its switches."""
    result = next((r for r in table.results if r.bench == bench["name"]), None)
    counts = f"{result.n_genuine} genuine / {result.n_impostor} impostor pairs" if result else \
        f"{bench['pairs']} pairs"
    switches = ", ".join(f"{k} {'on' if v else 'off'}" for k, v in bench["settings"].items())
    return f"{bench['name']} ({bench['kind']}, {bench['images']} images, {counts}; {switches})"


def _noise_note(table, bench: dict) -> str:
    result = next((r for r in table.results if r.bench == bench["name"]), None)
    n = result.n_impostor if result else 0
    return f"cells marked * : fewer than 10/FPR impostor pairs ({n}), so the figure is noise"


CONSISTENCY_NOTE = ("BN consistency: the worst relative error, over BN layers and channels, between a "
                    "snapshot's stored statistics and what its layers see in the deployed (eval-mode) model on "
                    "held-out calibration images (mean in standard deviations, variance relative); lower is closer")


def _has_consistency(table) -> bool:
    return any(m.get("consistency") for m in table.models)


def _runtime_line(table) -> str:
    """The providers that scored, why CUDA was not used when it was not, and the CUDA settings when it was."""
    line = f"onnxruntime providers: {', '.join(table.providers) or '-'}" + \
        (f" ({table.device_note})" if table.device_note else "")
    settings = table.session_settings or {}
    if settings.get("use_tf32") is not None:
        line += (f"; scored as deployed: TF32 {'allowed' if settings['use_tf32'] else 'off'}, cuDNN "
                 f"{str(settings['cudnn_conv_algo_search']).lower()} algorithm search")
    if settings.get("sessions"):
        line += f"; {settings['sessions']} session(s) started in {settings['startup_seconds']:.2f}s"
    return line


def format_score_table(table) -> str:
    """The score table as text: per benchmark, TPR (%) at each FPR under the strict and the insightface rule."""
    lines = [_runtime_line(table)]
    for bench in table.benches:
        lines += ["", bench_title(bench, table)]
        for rule in RULES:
            header, rows, marked = _score_rows(table, bench, rule)
            lines += [f"TPR (%) at FPR, {_RULE_TEXT[rule]}", format_table(header, rows)]
            if marked:
                lines.append(_noise_note(table, bench))
        if _has_consistency(table):
            lines.append(CONSISTENCY_NOTE)
        identification = _identification_rows(table, bench)
        if identification is not None:
            lines += [identification[0], format_table(*identification[1:])]
    return "\n".join(lines)


def _identification_rows(table, bench: dict) -> tuple[str, list[str], list[list[str]]] | None:
    """The 1:N table of an IJB benchmark that has its protocol: (title, header, rows), per model its galleries and
    their mean; None for other benchmarks."""
    results = [(m["label"], table.result(m["label"], bench["name"])) for m in table.models]
    results = [(label, r.identification) for label, r in results if r is not None and r.identification]
    if not results:
        return None
    first = results[0][1]
    fpirs = list(first["mean"]["tpir"])
    ranks = list(first["mean"]["top"])
    header = ["model", "gallery", *[f"TPIR@{f}" for f in fpirs], *[f"top-{k}" for k in ranks]]
    rows = []
    for label, metrics in results:
        for gallery, figures in [*metrics["galleries"].items(), ("mean", metrics["mean"])]:
            rows.append([label, gallery, *[_pct(figures["tpir"][f]) for f in fpirs],
                         *[_pct(figures["top"][k]) for k in ranks]])
    counts = ", ".join(f"{g}: {m['mated']} mated / {m['nonmated']} non-mated probes"
                       for g, m in first["galleries"].items())
    return f"1:N identification (%), {first['protocol']}; {counts}", header, rows


def rule_tables_markdown(table, bench: dict) -> list[str]:
    """One benchmark's Markdown tables, under the strict and the insightface rule."""
    lines = []
    for rule in RULES:
        header, rows, marked = _score_rows(table, bench, rule)
        lines += [f"TPR (%) at FPR, {_RULE_TEXT[rule]}", "", format_markdown_table(header, rows), ""]
        if marked:
            lines += [_noise_note(table, bench), ""]
    if _has_consistency(table):
        lines += [CONSISTENCY_NOTE, ""]
    identification = _identification_rows(table, bench)
    if identification is not None:
        lines += [identification[0], "", format_markdown_table(*identification[1:]), ""]
    return lines


def format_score_markdown(result, *, command: str | None = None) -> str:
    """report.md of a score: selection, tables under both rules, how each file was made, how to reproduce."""
    table = result.table
    lines = ["# bnport score", ""]
    if result.selection is not None:
        lines += ["## Selection", ""] + [f"- {line.strip()}" for line in result.selection.lines()] + [""]
        outcome = recipe_outcome(table, result.selection.to_dict())
        if outcome:
            lines += ["## Recipes", ""] + [f"- {line}" for line in outcome] + [""]
    lines += [_runtime_line(table), ""]
    for bench in table.benches:
        lines += [f"## {bench_title(bench, table)}", ""]
        lines += rule_tables_markdown(table, bench)
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


def recipe_points(models: list[dict], values: dict) -> dict[str, list[tuple[int, str, float]]]:
    """Per recipe, in table order, (snapshot index, label, selection value) of its float32 models that the selection
    scored; a recipe none of whose models was scored has an empty list."""
    points: dict[str, list[tuple[int, str, float]]] = {}
    for m in models:
        if m.get("recipe"):
            mine = points.setdefault(m["recipe"], [])
            if m.get("precision", "fp32") == "fp32" and m["label"] in values:
                mine.append((int(m.get("snapshot") or 0), m["label"], values[m["label"]]))
    return points


def recipe_outcome(table, selection: dict | None) -> list[str]:
    """In words, what a recipe comparison found under the selection rule: each recipe's best snapshot against the
    shared baseline, which recipe the selection took (or that none beat the baseline) and, with paired intervals,
    whether the runner-up recipe is separated from the winner beyond noise; [] without recipes."""
    models = table.models
    if not selection or not any(m.get("recipe") for m in models):
        return []
    values, baseline = selection.get("values") or {}, selection.get("baseline")
    scale = 1.0 if str(selection.get("rule", "")).startswith("acc") else 100.0
    base = values.get(baseline)
    lines = [f"recipes compared by {selection.get('rule_text', selection.get('rule'))} on {selection.get('bench')}"
             + (f"; the shared baseline {baseline}: {scale * base:.2f}" if base is not None else "")]
    best = {}
    for recipe, points in recipe_points(models, values).items():
        if not points:
            lines.append(f"recipe {recipe}: no snapshot scored (parity or guard)")
            continue
        _, label, value = best[recipe] = max(points, key=lambda p: p[2])
        gain = f" ({scale * (value - base):+.2f} points over the baseline)" if base is not None else ""
        lines.append(f"recipe {recipe}: best {label} {scale * value:.2f}{gain}")
    chosen = next((m for m in models if m["label"] == selection.get("selected")), None)
    if chosen is None or not chosen.get("recipe"):
        return lines + ["outcome: no recipe's snapshot won under the rule, so the baseline is kept"]
    lines.append(f"outcome: recipe {chosen['recipe']} is selected ({chosen['label']})")
    others = sorted(((v, label) for r, (_, label, v) in best.items() if r != chosen["recipe"]), reverse=True)
    winner = table.result(chosen["label"], selection.get("bench"))
    second = table.result(others[0][1], selection.get("bench")) if others else None
    paired = [r.extra.get("paired") if r is not None else None for r in (winner, second)]
    if all(paired):
        (w, s) = paired
        apart = s["high"] < w["low"]  # intervals that do not overlap: a conservative test of the difference
        lines.append(f"runner-up {others[0][1]}: {scale * (w['delta'] - s['delta']):.2f} points behind; paired "
                     f"intervals against the baseline: winner {scale * w['low']:+.2f} .. {scale * w['high']:+.2f}, "
                     f"runner-up {scale * s['low']:+.2f} .. {scale * s['high']:+.2f}: "
                     + ("apart, so the winning recipe is ahead beyond noise" if apart else
                        "they overlap, so this benchmark does not separate the recipes beyond noise"))
    return lines
