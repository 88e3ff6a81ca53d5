"""`bnport inspect`: the BatchNorm inventory of a model — each BN, its neighbours, and whether and how it folds.

The fold decisions come from `bnport.fold.plan_folds` (the same plan `export --fold-bn` carries out), traced with an
example input of the model's input size so shape-dependent rules (Linear on 2-D input) are decided.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from bnport.load import LoadedModel
from bnport.snapshot import bn_modules


@dataclass
class BnRow:
    name: str
    kind: str
    channels: int
    eps: float
    momentum: float | None
    producer: str | None
    consumer: str | None
    pattern: str | None
    action: str
    reason: str


@dataclass
class Inventory:
    """Every BN layer of one model with its fold plan."""

    model: str
    input_size: tuple[int, int]
    traced: bool
    trace_error: str | None
    rows: list[BnRow]

    @property
    def folds(self) -> int:
        return sum(r.action == "fold" for r in self.rows)

    def to_dict(self) -> dict:
        return {"model": self.model, "input_size": list(self.input_size), "traced": self.traced,
                "trace_error": self.trace_error, "bn_count": len(self.rows), "foldable": self.folds,
                "kept": len(self.rows) - self.folds, "layers": [asdict(r) for r in self.rows]}

    def __str__(self) -> str:
        from bnport.report import format_table

        head = f"{self.model}: {len(self.rows)} BatchNorm layers, {self.folds} fold exactly, {len(self.rows) - self.folds} kept"
        if not self.traced:
            head += f"\n(torch.fx could not trace the model: {self.trace_error}; the ONNX pass of export still folds)"
        table = format_table(["#", "bn", "type", "ch", "producer", "consumer", "plan", "why"],
                             [[i, r.name, r.kind, r.channels, r.producer or "-", r.consumer or "-",
                               r.pattern if r.action == "fold" else "keep", r.reason]
                              for i, r in enumerate(self.rows)])
        return f"{head}\n{table}"


def inspect_model(loaded: LoadedModel) -> Inventory:
    """Inventory of `loaded.module`'s BN layers with the fold plan for its input size."""
    from bnport.fold import plan_folds

    spec = loaded.input_spec
    example = torch.zeros(1, 3, spec.height, spec.width)
    plan = plan_folds(loaded.module, example_input=example)
    decisions = {d.bn: d for d in plan.decisions}
    rows = []
    for name, bn in bn_modules(loaded.module):
        d = decisions.get(name)
        rows.append(BnRow(name=name, kind=type(bn).__name__, channels=bn.num_features, eps=bn.eps,
                          momentum=bn.momentum, producer=d.producer if d else None, consumer=d.consumer if d else None,
                          pattern=d.pattern if d else None, action=d.action if d else "keep",
                          reason=d.reason if d else "not in the traced graph"))
    return Inventory(model=loaded.spec, input_size=spec.size, traced=plan.traced, trace_error=plan.error, rows=rows)
