"""`bnport inspect`: the BatchNorm inventory of a model — each BN, its neighbours, and whether and how it folds.

The fold decisions come from `bnport.export.fold_torch.plan_folds` (the same plan `export --fold-bn` carries out),
traced with an example input of the model's input size so shape-dependent rules (Linear on 2-D input) are decided.
BNs on identity branches that join a sibling conv (RepVGG's re-parameterisation) are listed with the conv that takes
each.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from bnport.errors import BnportError
from bnport.export.fold_torch import BnDecision, plan_folds
from bnport.model.load import LoadedModel
from bnport.model.snapshot import bn_modules


@dataclass
class BnRow:
    """One BN layer: what kind of module it is, and the fold plan's decision for it."""

    kind: str
    channels: int
    eps: float
    momentum: float | None
    decision: BnDecision

    def to_dict(self) -> dict:
        d = asdict(self.decision)
        return {"name": d.pop("bn"), "kind": self.kind, "channels": self.channels, "eps": self.eps,
                "momentum": self.momentum, **d}


@dataclass
class Inventory:
    """Every BN layer of one model with its fold plan."""

    model: str
    input_size: tuple[int, int]
    traced: bool
    trace_error: str | None
    rows: list[BnRow]
    identity_merges: dict[str, str] = field(default_factory=dict)

    @property
    def folds(self) -> int:
        return sum(r.decision.action == "fold" for r in self.rows)

    def to_dict(self) -> dict:
        return {"model": self.model, "input_size": list(self.input_size), "traced": self.traced,
                "trace_error": self.trace_error, "bn_count": len(self.rows), "foldable": self.folds,
                "kept": len(self.rows) - self.folds, "layers": [r.to_dict() for r in self.rows],
                "identity_merges": dict(self.identity_merges)}

    def __str__(self) -> str:
        from bnport.text import format_table

        kept = len(self.rows) - self.folds
        head = f"{self.model}: {len(self.rows)} BatchNorm layers, {self.folds} fold exactly, {kept} kept"
        if not self.traced:
            head += f"\n(torch.fx could not trace the model: {self.trace_error}; the ONNX pass of export still folds)"
        table = format_table(["#", "bn", "type", "ch", "producer", "consumer", "plan", "why"],
                             [[i, d.bn, r.kind, r.channels, d.producer or "-", d.consumer or "-",
                               d.pattern if d.action == "fold" else "keep", d.reason]
                              for i, (r, d) in enumerate((r, r.decision) for r in self.rows)])
        merges = ""
        if self.identity_merges:
            pairs = ", ".join(f"{bn} -> {conv}" for bn, conv in self.identity_merges.items())
            merges = f"\nidentity-branch BNs merged into a sibling conv (RepVGG re-parameterisation): {pairs}"
        return f"{head}\n{table}{merges}"


def inspect_model(loaded: LoadedModel) -> Inventory:
    """Inventory of `loaded.module`'s BN layers with the fold plan for its input size."""
    if isinstance(loaded.module, torch.jit.ScriptModule):
        raise BnportError(f"{loaded.spec} is a TorchScript model: its BatchNorm layers are compiled, so there is no "
                          "PyTorch fold plan (export still folds them on the ONNX graph)",
                          "inspect the architecture instead (e.g. iresnet50 or file.py:factory) with --weights")
    spec = loaded.input_spec
    example = torch.zeros(1, 3, spec.height, spec.width)
    plan = plan_folds(loaded.module, example_input=example)
    decisions = {d.bn: d for d in plan.decisions}
    unused = "not in the traced graph (the forward never calls it)"
    rows = [BnRow(kind=type(bn).__name__, channels=bn.num_features, eps=bn.eps, momentum=bn.momentum,
                  decision=decisions.get(name) or BnDecision(name, None, None, None, "keep", unused))
            for name, bn in bn_modules(loaded.module)]
    return Inventory(model=loaded.spec, input_size=spec.size, traced=plan.traced, trace_error=plan.error, rows=rows,
                     identity_merges=plan.identity_merges)
