"""Formatting of results for people: text and Markdown tables (plots join as later commands need them).
Computes nothing."""
from __future__ import annotations


def format_table(header: list[str], rows: list[list], *, max_width: int = 60) -> str:
    """A plain aligned text table; cells longer than `max_width` are cut with an ellipsis."""
    def cell(v) -> str:
        s = f"{v:.4g}" if isinstance(v, float) else str(v)
        return s if len(s) <= max_width else s[: max_width - 1] + "…"

    text = [[cell(h) for h in header]] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in text) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in text]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)



def _pct(value: float) -> str:
    return "-" if value is None or value != value else f"{100 * value:.2f}"


def _score_rows(table, bench: dict, rule: str, *, markdown: bool) -> tuple[list[str], list[list[str]], bool]:
    """Header and rows of one benchmark's table under one TPR rule; the flag says whether a cell is marked noisy."""
    from bnport.score.table import fpr_label

    labels = [fpr_label(f) for f in table.fprs]
    has_acc = bench["kind"] == "bin"
    header = ["model", "parity", "made by"] + (["acc (%)"] if has_acc else []) + [f"@{label}" for label in labels]
    rows, marked = [], False
    for model in table.models:
        result = table.result(model["label"], bench["name"])
        row = [model["label"], "pass" if model["passed"] else "FAILED", model["how"]]
        if result is None:
            rows.append(row + ["-"] * (len(header) - 3))
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


def format_score_table(table) -> str:
    """The score table as text: per benchmark, TPR (%) at each FPR under the strict and the insightface rule."""
    lines = [f"onnxruntime providers: {', '.join(table.providers) or '-'}" +
             (f" ({table.device_note})" if table.device_note else "")]
    for bench in table.benches:
        lines += ["", _bench_title(bench, table)]
        for rule in ("strict", "insightface"):
            header, rows, marked = _score_rows(table, bench, rule, markdown=False)
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


def format_score_markdown(result, *, command: str | None = None) -> str:
    """report.md of a score: selection, tables under both rules, how each file was made, how to reproduce."""
    table = result.table
    lines = ["# bnport score", ""]
    if result.selection is not None:
        lines += ["## Selection", ""] + [f"- {line.strip()}" for line in result.selection.lines()] + [""]
    lines += [f"onnxruntime providers: {', '.join(table.providers) or '-'}"
              + (f" ({table.device_note})" if table.device_note else ""), ""]
    for bench in table.benches:
        lines += [f"## {_bench_title(bench, table)}", ""]
        for rule in ("strict", "insightface"):
            header, rows, marked = _score_rows(table, bench, rule, markdown=True)
            lines += [f"TPR (%) at FPR, {_RULE_TEXT[rule]}", "", format_markdown_table(header, rows), ""]
            if marked:
                lines += [_noise_note(table, bench), ""]
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
