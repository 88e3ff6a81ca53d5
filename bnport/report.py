"""Formatting of results for people: text tables (Markdown and plots join as later commands need them).
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

