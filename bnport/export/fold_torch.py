"""Exact BatchNorm folding on the PyTorch graph: trace the model with torch.fx (`bnport.export.fx_view`), decide for
every BatchNorm whether and how it folds into a neighbouring Conv / ConvTranspose / Linear and say why not when it
cannot (`bnport.export.fold_patterns`), then rewrite the graph here with the formulas of `bnport.export.bn_math`.
Folding uses eval semantics: a BN is the per-channel affine map s*x + b built from its running statistics, merged
into the neighbour's weights in float64 and cast back to the parameter dtype. A BN that cannot be folded exactly is
kept, with a reason; the ONNX pass (`bnport.export.fold_onnx`) is the second line. timm's norm+act layers
(`BatchNormAct2d`: a BatchNorm subclass whose forward is the BN, then its dropout, then its activation) are traced as
their three parts, so their BN part folds like any BN and their activation stays. A BN on an identity branch
(x -> BN -> Add with conv branches reading the same x) joins a sibling conv as a centred identity kernel plus bias,
RepVGG's own re-parameterisation.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvTransposeNd

from bnport.export import bn_math
from bnport.export.fold_patterns import BnDecision, Step, analyse, bn_arrays
from bnport.export.fx_view import NORM_ACT_KEY, norm_act_parts, settle_norm_acts, trace

__all__ = ["BnDecision", "ChannelShift", "FoldPlan", "bn_scale_shift", "count_bn", "fold_bn", "norm_act_parts",
           "plan_folds"]


def count_bn(model: nn.Module) -> int:
    """Number of BatchNorm modules (BatchNorm1d/2d/3d, SyncBatchNorm, and their subclasses) in `model`."""
    from bnport.model.snapshot import is_script_bn

    return sum(isinstance(m, _BatchNorm) or is_script_bn(m) for m in model.modules())


def bn_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as y = scale*x + shift per channel, float64 tensors on the CPU (bnport.export.bn_math)."""
    scale, shift = bn_arrays(bn)
    return torch.from_numpy(scale), torch.from_numpy(shift)


class ChannelShift(nn.Module):
    """x + shift per channel (dim 1): what stays of a BatchNorm whose scale folded into a zero-padded conv.

    Exact at the border because pad0(s*x + b) = s * pad0(x + b/s); exported, it is a single Add.
    """

    def __init__(self, shift: torch.Tensor, spatial_dims: int):
        super().__init__()
        self.register_buffer("shift", shift.reshape(-1, *([1] * spatial_dims)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift


@dataclass
class FoldPlan:
    """Every BatchNorm the traced model calls, with its decision; `traced` is False when torch.fx failed.
    `identity_merges` maps each identity-branch BN that joins a sibling conv to that conv."""
    decisions: list[BnDecision] = field(default_factory=list)
    traced: bool = True
    error: str | None = None
    identity_merges: dict[str, str] = field(default_factory=dict)

    @property
    def n_fold(self) -> int:
        return sum(d.action == "fold" for d in self.decisions)

    @property
    def n_keep(self) -> int:
        return sum(d.action == "keep" for d in self.decisions)

    def to_dict(self) -> dict:
        return {"traced": self.traced, "error": self.error, "n_fold": self.n_fold, "n_keep": self.n_keep,
                "decisions": [asdict(d) for d in self.decisions], "identity_merges": dict(self.identity_merges)}

    def __str__(self) -> str:
        head = f"{len(self.decisions)} BatchNorm: {self.n_fold} fold, {self.n_keep} keep"
        if not self.traced:
            head += f" (model does not trace with torch.fx: {self.error})"
        rows = [("bn", "action", "pattern", "producer", "consumer", "reason")]
        rows += [(d.bn, d.action, d.pattern or "-", d.producer or "-", d.consumer or "-", d.reason)
                 for d in self.decisions]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[5] for row in rows]
        return "\n".join([head, *lines])


def plan_folds(model: nn.Module, *, example_input: torch.Tensor | None = None) -> FoldPlan:
    """Decide, for every BatchNorm `model` calls, whether and how it folds; nothing is changed.

    `example_input` (one batch, the model's dtype) lets the plan see tensor ranks, which Linear -> BatchNorm1d
    needs when the graph alone does not show the Linear input is 2-D; None means graph-only analysis. A model that
    torch.fx cannot trace gives a plan with every BN kept and `traced=False`.
    """
    from bnport.runtime.device import modes_kept

    with modes_kept(model):
        model.eval()
        traced = trace(model)
        if isinstance(traced, str):
            return _untraced_plan(model, traced)
        results = analyse(traced, example_input)
        merges = {d.bn: step.targets[0] for d, step in results
                  if step is not None and step.pattern == bn_math.IDENTITY_MERGE}
        return FoldPlan([decision for decision, _ in results], identity_merges=merges)


def fold_bn(model: nn.Module, *, inplace: bool = False, example_input: torch.Tensor | None = None) -> nn.Module:
    """Fold every BatchNorm that `plan_folds` marks "fold" and return the folded model, in eval mode.

    The result is a torch.fx.GraphModule whose other modules and parameters keep their names. With inplace=False
    (the default) `model` is untouched; with inplace=True its modules are reused and changed, so only the returned
    module computes the right thing. A model that does not trace comes back unchanged (a copy unless inplace).
    `example_input`: as for `plan_folds`.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    traced = trace(model)
    if isinstance(traced, str):
        return model
    steps = [step for _, step in analyse(traced, example_input) if step is not None]
    # an identity branch joins its sibling conv as that conv finally computes, after the conv's own BN folded into it
    for step in sorted(steps, key=lambda st: st.pattern == bn_math.IDENTITY_MERGE):
        _apply(traced, step)
    settle_norm_acts(traced)
    traced.meta.pop(NORM_ACT_KEY, None)
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced.eval()



def _untraced_plan(model: nn.Module, error: str) -> FoldPlan:
    reason = f"model does not trace with torch.fx: {error}"
    decisions = [BnDecision(name, None, None, None, "keep", reason)
                 for name, module in model.named_modules() if isinstance(module, _BatchNorm)]
    return FoldPlan(decisions, traced=False, error=error)



_OUTPUT_SIDE = (bn_math.CONV_BN, bn_math.CONV_TRANSPOSE_BN, bn_math.LINEAR_BN, bn_math.LINEAR_FLATTEN_BN,
                bn_math.CONCAT_BN)


def _apply(gm: fx.GraphModule, step: Step) -> None:
    """Rewrite `gm` for one planned fold, using the neighbours' current weights so folds compose."""
    node = step.bn_node
    scale, shift = bn_arrays(gm.get_submodule(node.target))
    layers = [gm.get_submodule(t) for t in step.targets]
    if step.pattern == bn_math.IDENTITY_MERGE:
        _merge_identity(gm, step, scale, shift)
        return
    if step.pattern in _OUTPUT_SIDE:
        start = 0
        for layer in layers:
            width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            part = slice(start, start + width)
            start += width
            _assign(layer, *bn_math.fold_output_channels(_array(layer.weight), _array(layer.bias), scale[part],
                                                         shift[part], groups=getattr(layer, "groups", 1),
                                                         transposed=isinstance(layer, _ConvTransposeNd)))
    elif step.pattern == bn_math.BN_PADDED_CONV:
        (conv,) = layers
        _assign(conv, *bn_math.fold_input_channels(_array(conv.weight), _array(conv.bias), scale, None,
                                                   groups=conv.groups))
        shift_in = torch.from_numpy(bn_math.padded_conv_shift(scale, shift))
        gm.add_submodule(node.target, ChannelShift(shift_in.to(conv.weight.device, conv.weight.dtype),
                                                   conv.weight.dim() - 2))
        return
    else:
        (layer,) = layers
        if step.repeat > 1:
            scale, shift = np.repeat(scale, step.repeat), np.repeat(shift, step.repeat)
        _assign(layer, *bn_math.fold_input_channels(_array(layer.weight), _array(layer.bias), scale, shift,
                                                    groups=getattr(layer, "groups", 1)))
    node.replace_all_uses_with(node.args[0])
    gm.graph.erase_node(node)


def _merge_identity(gm: fx.GraphModule, step: Step, scale: np.ndarray, shift: np.ndarray) -> None:
    """conv' = conv + (centred identity kernel * scale, bias + shift); the branch and its Add leave the graph."""
    conv = gm.get_submodule(step.targets[0])
    _assign(conv, *bn_math.merge_identity(_array(conv.weight), _array(conv.bias), scale, shift, groups=conv.groups))
    add, end = step.joins, step.branch_end
    # read now, not when planned: an earlier merge may have replaced this Add's other operand
    (other,) = [a for a in add.args if a is not end]
    add.replace_all_uses_with(other)
    gm.graph.erase_node(add)
    node = end
    while node is not step.bn_node:
        previous = node.args[0]
        gm.graph.erase_node(node)
        node = previous
    gm.graph.erase_node(step.bn_node)


def _array(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.detach().to("cpu", torch.float64).numpy()


def _assign(layer: nn.Module, weight: np.ndarray, bias: np.ndarray | None) -> None:
    """New Parameter objects, not in-place writes: a weight tied to another module keeps serving that module."""
    ref = layer.weight
    layer.weight = nn.Parameter(torch.from_numpy(weight).to(ref.device, ref.dtype), requires_grad=ref.requires_grad)
    if bias is not None:
        bias_ref = layer.bias if layer.bias is not None else ref
        layer.bias = nn.Parameter(torch.from_numpy(np.ascontiguousarray(bias)).to(bias_ref.device, bias_ref.dtype),
                                  requires_grad=bias_ref.requires_grad)
