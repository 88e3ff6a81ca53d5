"""Plain text and Markdown tables: how every command shows a list of rows (core: imports nothing of bnport)."""
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


def format_markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured Markdown table."""
    def esc(v) -> str:
        return str(v).replace("|", "\\|")

    out = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(esc(v) for v in row) + " |" for row in rows]
    return "\n".join(out)
