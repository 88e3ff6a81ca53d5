"""Exact BatchNorm folding on the PyTorch graph: trace the model with torch.fx, decide for every BatchNorm whether
and how it folds into a neighbouring Conv / ConvTranspose / Linear (and say why not when it cannot), then rewrite
the graph. Folding uses eval semantics: a BN is the per-channel affine map s*x + b built from its running
statistics, merged into the neighbour's weights in float64 and cast back to the parameter dtype. The tensor math
(`bn_scale_shift`, `fold_output_channels`, `fold_input_channels`) is kept apart from the graph plumbing
(`plan_folds`, `fold_bn`), as in torch.nn.utils.fusion. A BN that cannot be folded exactly is kept, with a reason;
the ONNX pass (`bnport.export.fold_onnx`) is the second line. timm's norm+act layers (`BatchNormAct2d`: a BatchNorm subclass
whose forward is the BN, then its dropout, then its activation) are traced as their three parts, so their BN part
folds like any BN and their activation stays. A BN on an identity branch (x -> BN -> Add with conv branches reading
the same x) joins a sibling conv as a centred identity kernel plus bias, RepVGG's own re-parameterisation.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from bnport.errors import BnportError

PATTERNS = ("conv->bn", "convtranspose->bn", "linear->bn1d", "linear->flatten->bn1d", "bn->conv", "bn->padded-conv",
            "bn->flatten->linear", "bn1d->linear", "concat(convs)->bn", "bn-identity->conv")

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_EVAL_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                          nn.FeatureAlphaDropout)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
_CAT_FUNCTIONS = (torch.cat, torch.concat, torch.concatenate)
_RESHAPES = ("view", "reshape")
_ADDS = (operator.add, operator.iadd, torch.add)
# activations by module class or function name, lower case: a BN followed by one of these cannot fold forward
_ACTIVATIONS = frozenset({"relu", "relu6", "prelu", "leakyrelu", "leaky_relu", "elu", "selu", "celu", "gelu", "silu",
                          "swish", "mish", "hardswish", "hardsigmoid", "sigmoid", "tanh", "softplus"})
# methods whose second argument is read for its shape only: y.reshape_as(x) does not care what a fold does to x
_SHAPE_OF_ARG = ("reshape_as", "view_as", "expand_as")
# The one policy, for this pass and the ONNX pass: a BN channel whose scale is below this fraction of the layer's
# largest (or whose shift / scale is not finite) cannot have its shift moved in front of a zero-padded conv as
# shift / scale: that value would dwarf the input it is added to, and float32 would keep little of the input.
MIN_RELATIVE_SCALE = 1e-6
# timm's norm + act layers, by defining module and class name: a BatchNorm subclass whose forward is exactly the BN,
# then its `drop` module (when it has one), then its `act` module (when it has one). A user's own class of the same
# name may compute anything, so the module path is part of the key.
NORM_ACT_LAYERS = frozenset({(module, name) for module in ("timm.layers.norm_act", "timm.models.layers.norm_act")
                             for name in ("BatchNormAct2d", "SyncBatchNormAct")})
IDENTITY_MERGE = "bn-identity->conv"  # the pattern name of an identity-branch BN joining a sibling conv
_SHAPE_KEY = "bnport_shape"
_NORM_ACT_KEY = "bnport_norm_acts"


def count_bn(model: nn.Module) -> int:
    """Number of BatchNorm modules (BatchNorm1d/2d/3d, SyncBatchNorm, and their subclasses) in `model`."""
    from bnport.model.snapshot import is_script_bn

    return sum(isinstance(m, _BatchNorm) or is_script_bn(m) for m in model.modules())


def bn_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as y = scale*x + shift per channel, in float64 on the CPU.

    scale = gamma / sqrt(running_var + eps), shift = beta - running_mean * scale; affine=False means gamma 1, beta 0.
    """
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        raise BnportError(f"BatchNorm with {bn.num_features} channels has no running statistics",
                          "only BNs built with track_running_stats=True can be folded")
    mean = bn.running_mean.detach().to("cpu", torch.float64)
    var = bn.running_var.detach().to("cpu", torch.float64)
    scale = 1.0 / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight.detach().to("cpu", torch.float64) * scale
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().to("cpu", torch.float64)
    return scale, shift


def fold_output_channels(weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor,
                         *, groups: int = 1, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of layer' = scale * layer(x) + shift per output channel (conv, grouped conv, Linear, ConvTranspose).

    Conv / Linear weights are [out, ...]; ConvTranspose weights are [in, out/groups, ...], so output channel
    g*out/groups + j lives at column j of group g's rows.
    """
    ones = [1] * (weight.dim() - 2)
    if transposed:
        rows, cols = weight.shape[:2]
        grouped = weight.reshape(groups, rows // groups, cols, *weight.shape[2:])
        new_weight = (grouped * scale.reshape(groups, 1, cols, *ones)).reshape(weight.shape)
    else:
        new_weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    new_bias = shift if bias is None else bias * scale + shift
    return new_weight, new_bias


def fold_input_channels(weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
                        shift: torch.Tensor | None, *, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weights of layer' = layer(scale * x + shift) per input channel, for a Linear or a conv that never sees padded
    zeros (weights [out, in/groups, ...]). `shift=None` folds the scale alone and leaves the bias as it is.

    Exact only where every input value the layer reads is a real (or copied) input value: bias' = b + sum(W * shift).
    """
    out_channels, per_group = weight.shape[:2]
    ones = [1] * (weight.dim() - 2)
    grouped = weight.reshape(groups, out_channels // groups, per_group, *weight.shape[2:])
    new_weight = (grouped * scale.reshape(groups, 1, per_group, *ones)).reshape(weight.shape)
    if shift is None:
        return new_weight, bias
    moved = (grouped * shift.reshape(groups, 1, per_group, *ones)).sum(dim=tuple(range(2, grouped.dim())))
    moved = moved.reshape(out_channels)
    return new_weight, moved if bias is None else bias + moved


class ChannelShift(nn.Module):
    """x + shift per channel (dim 1): what stays of a BatchNorm whose scale folded into a zero-padded conv.

    Exact at the border because pad0(s*x + b) = s * pad0(x + b/s); exported, it is a single Add.
    """

    def __init__(self, shift: torch.Tensor, spatial_dims: int):
        super().__init__()
        self.register_buffer("shift", shift.reshape(-1, *([1] * spatial_dims)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift


@dataclass(frozen=True)
class BnDecision:
    """What happens to one BatchNorm: `action` is "fold" or "keep", `reason` always says why in one sentence."""
    bn: str
    producer: str | None
    consumer: str | None
    pattern: str | None
    action: str
    reason: str


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
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        traced = _trace(model)
        if isinstance(traced, str):
            return _untraced_plan(model, traced)
        results = _analyse(traced, example_input)
        merges = {d.bn: step.targets[0] for d, step in results
                  if step is not None and step.pattern == IDENTITY_MERGE}
        return FoldPlan([decision for decision, _ in results], identity_merges=merges)
    finally:
        for module, mode in modes.items():
            module.training = mode


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
    traced = _trace(model)
    if isinstance(traced, str):
        return model
    steps = [step for _, step in _analyse(traced, example_input) if step is not None]
    # an identity branch joins its sibling conv as that conv finally computes, after the conv's own BN folded into it
    for step in sorted(steps, key=lambda st: st.pattern == IDENTITY_MERGE):
        _apply(traced, step)
    _settle_norm_acts(traced)
    traced.meta.pop(_NORM_ACT_KEY, None)
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced.eval()


def norm_act_parts(module: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The (name, module) parts that follow the BN in a known norm+act layer (see NORM_ACT_LAYERS), in call order;
    None when `module` is not one. timm >= 0.6 has `drop` then `act`; older timm only `act`, which may be None."""
    kind = type(module)
    if (kind.__module__, kind.__name__) not in NORM_ACT_LAYERS or not isinstance(module, _BatchNorm):
        return None
    return [(name, part) for name in ("drop", "act") if isinstance(part := getattr(module, name, None), nn.Module)]


def _plain_twin(layer: nn.Module) -> nn.Module:
    """A plain BatchNorm of the norm+act `layer`'s base type that shares its parameters and buffers, with the
    layer's tail parts as children (so their call sites keep their names)."""
    base = next(t for t in _BN_TYPES if isinstance(layer, t))
    twin = base(layer.num_features, eps=layer.eps, momentum=layer.momentum, affine=layer.affine,
                track_running_stats=layer.track_running_stats, device="meta")
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        if getattr(twin, name, None) is not None:
            setattr(twin, name, getattr(layer, name))
    for name, part in norm_act_parts(layer):
        twin.add_module(name, part)
    return twin.train(layer.training)


class _LeafTracer(fx.Tracer):
    """Keeps every BatchNorm, conv and Linear (subclasses included) one call_module node, so each can be judged;
    a known norm+act layer becomes three nodes (its BN part, then its drop and act parts), noted in `norm_acts`."""

    def __init__(self):
        super().__init__()
        self.norm_acts: dict[str, nn.Module] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # a leaf hiding a BN inside would leave that BN out of the plan: trace through those instead
        hides_bn = any(isinstance(child, _BatchNorm) for child in m.modules() if child is not m)
        judged = isinstance(m, (_BatchNorm, _ConvNd, nn.Linear)) and not hides_bn
        return judged or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        parts = norm_act_parts(m)
        hooked = m._forward_hooks or m._forward_pre_hooks
        if parts is None or hooked or kwargs or len(args) != 1:
            return super().call_module(m, forward, args, kwargs)
        name = self.path_of_module(m)
        self.norm_acts[name] = m
        out = self.create_proxy("call_module", name, args, {})
        for _, part in parts:
            out = self.call_module(part, part.forward, (out,), {})
        return out


def _trace(model: nn.Module) -> fx.GraphModule | str:
    """The traced module, or the one-line error when torch.fx cannot trace `model`.

    Each known norm+act layer's node calls a plain BatchNorm twin in the traced module (the layer's own forward
    would also apply the activation, which now has its own node); `meta[_NORM_ACT_KEY]` names those layers."""
    try:
        tracer = _LeafTracer()
        graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:  # any failure means "not traceable": the plan reports it, the ONNX pass takes over
        message = " ".join(str(exc).split())
        return f"{type(exc).__name__}: {message[:200]}"
    for name, layer in tracer.norm_acts.items():
        _set_submodule(gm, name, _plain_twin(layer))
    gm.meta[_NORM_ACT_KEY] = {name: layer for name, layer in tracer.norm_acts.items()}
    return gm


def _set_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Put `module` at `target` of `gm`. The containers on the way are the GraphModule's own (fx builds fresh ones
    for the dotted paths it copies), so the traced model's modules are not changed."""
    parent, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


def _settle_norm_acts(gm: fx.GraphModule) -> None:
    """After the folds: each norm+act layer's tail parts stay reachable under its name. A folded BN part leaves an
    empty container there (not a BatchNorm that nothing calls), a shift module (padded-conv fold) takes the parts."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for name, layer in gm.meta.get(_NORM_ACT_KEY, {}).items():
        parts = norm_act_parts(layer)
        if not any(f"{name}.{part}" in called for part, _ in parts):
            continue
        holder = gm.get_submodule(name) if name in called else nn.Module()
        for part_name, part in parts:
            if getattr(holder, part_name, None) is not part:
                holder.add_module(part_name, part)
        _set_submodule(gm, name, holder)


def _untraced_plan(model: nn.Module, error: str) -> FoldPlan:
    reason = f"model does not trace with torch.fx: {error}"
    decisions = [BnDecision(name, None, None, None, "keep", reason)
                 for name, module in model.named_modules() if isinstance(module, _BatchNorm)]
    return FoldPlan(decisions, traced=False, error=error)


@dataclass
class _Step:
    """How to apply one fold: the BN node, the pattern and the modules whose weights change."""
    pattern: str
    bn_node: fx.Node
    targets: tuple[str, ...]
    repeat: int = 1
    joins: fx.Node | None = None  # bn-identity->conv: the Add that the branch ends in, which goes
    branch_end: fx.Node | None = None  # bn-identity->conv: the last node of the branch (the BN, or an identity after)


@dataclass
class _Outcome:
    """One direction's verdict: `pattern` is set when the neighbourhood matches one, `step` when it also folds."""
    pattern: str | None
    reason: str
    step: _Step | None = None


def _analyse(gm: fx.GraphModule, example_input: torch.Tensor | None) -> list[tuple[BnDecision, _Step | None]]:
    if example_input is not None:
        try:
            with torch.no_grad():
                _ShapeRecorder(gm).run(example_input)
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [""])[0]
            raise BnportError(f"an input of shape {tuple(example_input.shape)} does not run through the model: "
                              f"{type(exc).__name__}: {first_line[:200]}",
                              "give the input size the model was built for with --input-size HxW "
                              "(in Python: an example_input of that shape)") from exc
    return _Graph(gm).decide_all()


class _ShapeRecorder(fx.Interpreter):
    """Runs the traced graph once and notes each tensor's shape on its node."""

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta[_SHAPE_KEY] = tuple(result.shape)
        return result


class _Graph:
    """Read-only view of a traced module: call sites, data users, ranks; decides each BN's fold."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.norm_acts: dict[str, nn.Module] = gm.meta.get(_NORM_ACT_KEY, {})
        self.sites: dict[str, list[fx.Node]] = {}
        self.attr_users: set[str] = set()
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.sites.setdefault(node.target, []).append(node)
            elif node.op == "get_attr":
                self.attr_users.add(node.target.rsplit(".", 1)[0])

    def decide_all(self) -> list[tuple[BnDecision, _Step | None]]:
        decided = {name: self.decide(name, nodes) for name, nodes in self.sites.items()
                   if isinstance(self.modules[name], _BatchNorm)}
        # identity branches last: whether a sibling conv can take one depends on that conv's own BN decision
        claimed: set[str] = set()
        for name, (decision, step) in decided.items():
            bn, nodes = self.modules[name], self.sites[name]
            if step is not None or self.bn_blocker(name, bn, nodes):
                continue
            merge = self.identity_branch(nodes[0], bn, decided, claimed)
            if merge.step is not None:
                claimed.add(merge.step.targets[0])
                decided[name] = (replace(decision, pattern=merge.pattern, action="fold", reason=merge.reason),
                                 merge.step)
            elif merge.pattern is not None:
                decided[name] = (replace(decision, pattern=merge.pattern,
                                         reason=f"{decision.reason}; identity branch: {merge.reason}"), None)
        return [self.with_norm_act_note(name, *result) for name, result in decided.items()]

    def with_norm_act_note(self, name: str, decision: BnDecision, step: _Step | None):
        layer = self.norm_acts.get(name)
        if layer is None or step is None:
            return decision, step
        kept = [type(part).__name__ for _, part in norm_act_parts(layer)
                if type(part) not in _EVAL_IDENTITY_MODULES]
        tail = f"its {' and '.join(kept)} stays after it" if kept else "it has no activation"
        note = f" ({type(layer).__name__}: the BN part folds, {tail})"
        return replace(decision, reason=decision.reason + note), step

    def decide(self, name: str, nodes: list[fx.Node]) -> tuple[BnDecision, _Step | None]:
        bn = self.modules[name]
        node = nodes[0]
        producer = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        users = self.data_users(node)
        base = dict(bn=name, producer=self.name(producer) if producer is not None else None,
                    consumer=", ".join(self.name(u) for u in users) or None)
        blocker = self.bn_blocker(name, bn, nodes)
        if blocker:
            return BnDecision(**base, pattern=None, action="keep", reason=blocker), None
        back = self.backward(node, bn, producer)
        if back.step is not None:
            return BnDecision(**base, pattern=back.pattern, action="fold", reason=back.reason), back.step
        forward = self.forward(node, bn, users)
        if forward.step is not None:
            return BnDecision(**base, pattern=forward.pattern, action="fold", reason=forward.reason), forward.step
        reasons = [back.reason] if back.pattern else []
        reasons.append(forward.reason)
        pattern = back.pattern or forward.pattern
        return BnDecision(**base, pattern=pattern, action="keep", reason="; ".join(reasons)), None

    def bn_blocker(self, name: str, bn: nn.Module, nodes: list[fx.Node]) -> str | None:
        if len(nodes) > 1:
            return f"module {name} is called at {len(nodes)} sites"
        if not _is_plain(bn, _BN_TYPES):
            return f"{name} is a {type(bn).__name__}, a BatchNorm subclass with its own forward: folding could drop " \
                   "what it adds"
        if bn.running_mean is None or bn.running_var is None:
            return f"{name} has no running statistics (track_running_stats=False): it always normalises with batch " \
                   "statistics"
        if bn._forward_hooks or bn._forward_pre_hooks:
            return f"{name} has forward hooks, which a fold would skip"
        if name in self.attr_users:
            return f"{name}'s parameters or buffers are also read directly by the model"
        if len(nodes[0].args) != 1 or nodes[0].kwargs or not isinstance(nodes[0].args[0], fx.Node):
            return f"{name} is called with extra arguments"
        return None

    def module_blocker(self, role: str, node: fx.Node, exact: tuple[type, ...]) -> str | None:
        """Why the layer at `node` cannot take a fold, or None: it must be plain, used once and read nowhere else."""
        name, module = node.target, self.modules[node.target]
        if parametrize.is_parametrized(module):
            return f"{role} {name} has parametrized weights, which a fold cannot change exactly"
        if not _is_plain(module, exact):
            return f"{role} {name} is a {type(module).__name__}, a subclass with its own forward: folding could be " \
                   "inexact"
        if module._forward_hooks or module._forward_pre_hooks:
            return f"{role} {name} has forward hooks"
        if len(self.sites[name]) > 1:
            return f"{role} {name} is called at {len(self.sites[name])} sites"
        if name in self.attr_users:
            return f"{role} {name}'s weights are also read directly by the model"
        return None

    def backward(self, node: fx.Node, bn: nn.Module, producer: fx.Node) -> _Outcome:
        channels = bn.num_features
        module = self.modules.get(producer.target) if producer.op == "call_module" else None
        if isinstance(module, (_ConvNd, nn.Linear)):
            if isinstance(module, nn.Linear):
                pattern, exact, width = "linear->bn1d", (nn.Linear,), module.out_features
            elif isinstance(module, _ConvTransposeNd):
                pattern, exact, width = "convtranspose->bn", _CONV_TRANSPOSE_TYPES, module.out_channels
            else:
                pattern, exact, width = "conv->bn", _CONV_TYPES, module.out_channels
            blocker = self.module_blocker("producer", producer, exact) or self.sole_consumer(producer, node)
            if blocker is None and pattern == "linear->bn1d":
                blocker = self.linear_rank_blocker(producer, bn)
            if blocker is None and width != channels:
                blocker = f"producer {producer.target} has {width} outputs but the BN has {channels} channels"
            if blocker:
                return _Outcome(pattern, blocker)
            reason = f"folded into {producer.target}'s weight and bias"
            return _Outcome(pattern, reason, _Step(pattern, node, (producer.target,)))
        if producer.op == "call_function" and producer.target in _CAT_FUNCTIONS:
            return self.backward_concat(node, producer, channels)
        if self.is_reshape(producer):
            return self.backward_flat_linear(node, bn, producer)
        return _Outcome(None, f"producer {self.name(producer)} is not a conv or Linear")

    def backward_flat_linear(self, node: fx.Node, bn: nn.Module, flat: fx.Node) -> _Outcome:
        """Linear on (..., C) -> reshape to (-1, C) -> BatchNorm1d (timm LeViT's LinearNorm): the reshape only merges
        leading dims, so the BN's channels are the Linear's output features and the fold is exact."""
        pattern = "linear->flatten->bn1d"
        source = flat.args[0] if flat.args and isinstance(flat.args[0], fx.Node) else None
        linear = self.modules.get(source.target) if source is not None and source.op == "call_module" else None
        if not isinstance(linear, nn.Linear):
            return _Outcome(None, f"producer {self.name(flat)} reshapes something other than a Linear output")
        before, after = self.shape(source), self.shape(flat)
        if before is None or after is None:
            return _Outcome(pattern, f"the shapes around {flat.name} are unknown: pass example_input to show them")
        if type(bn) is not nn.BatchNorm1d or len(after) != 2 or len(before) < 2 or after[1] != before[-1]:
            return _Outcome(pattern, f"{flat.name} turns {source.target}'s output {list(before)} into "
                                     f"{list(after)}: its features are not the BN's channels")
        blocker = self.module_blocker("producer", source, (nn.Linear,)) or self.sole_consumer(source, flat) or \
            self.sole_consumer(flat, node)
        if blocker is None and linear.out_features != bn.num_features:
            blocker = f"producer {source.target} has {linear.out_features} outputs but the BN has " \
                      f"{bn.num_features} channels"
        if blocker:
            return _Outcome(pattern, blocker)
        reason = f"folded into {source.target}'s weight and bias ({flat.name} only merges leading dims)"
        return _Outcome(pattern, reason, _Step(pattern, node, (source.target,)))

    def is_reshape(self, node: fx.Node) -> bool:
        return (node.op == "call_method" and node.target in (*_RESHAPES, "flatten")) or \
            (node.op == "call_function" and node.target in (torch.flatten, torch.reshape))

    def linear_rank_blocker(self, linear: fx.Node, bn: nn.Module) -> str | None:
        if type(bn) is not nn.BatchNorm1d:
            return f"a Linear feeds {type(bn).__name__}: only BatchNorm1d on a 2-D Linear output folds exactly"
        rank = self.rank(linear)
        if rank is None:
            return "Linear input rank is unknown: pass example_input to show it is 2-D"
        if rank != 2:
            return f"Linear input is {rank}-D: folding would be inexact"
        return None

    def backward_concat(self, node: fx.Node, cat: fx.Node, channels: int) -> _Outcome:
        pattern = "concat(convs)->bn"
        parts = cat.args[0] if cat.args else cat.kwargs.get("tensors")
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        rank = self.rank(cat) or {nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}.get(type(self.modules[node.target]))
        if isinstance(dim, int) and dim < 0 and rank is not None:
            dim += rank
        is_conv = [isinstance(p, fx.Node) and p.op == "call_module" and isinstance(self.modules[p.target], _ConvNd)
                   for p in parts or ()]
        if not parts or not all(is_conv):
            return _Outcome(None, f"producer {cat.name} joins inputs that are not all convs")
        if dim != 1:
            return _Outcome(pattern, f"producer {cat.name} joins along dim {dim}, not the channel dim")
        if len(set(parts)) != len(parts):
            return _Outcome(pattern, f"producer {cat.name} joins the same conv output twice")
        blocker = self.sole_consumer(cat, node)
        for part in parts:
            exact = _CONV_TRANSPOSE_TYPES if isinstance(self.modules[part.target], _ConvTransposeNd) else _CONV_TYPES
            blocker = blocker or self.module_blocker("producer", part, exact) or self.sole_consumer(part, cat)
        width = sum(self.modules[p.target].out_channels for p in parts)
        if blocker is None and width != channels:
            blocker = f"producer {cat.name} has {width} channels but the BN has {channels}"
        if blocker:
            return _Outcome(pattern, blocker)
        targets = tuple(p.target for p in parts)
        return _Outcome(pattern, f"split by channel into {', '.join(targets)}", _Step(pattern, node, targets))

    def forward(self, node: fx.Node, bn: nn.Module, users: list[fx.Node]) -> _Outcome:
        if len(users) != 1:
            names = ", ".join(self.name(u) for u in users)
            return _Outcome(None, f"its output feeds {len(users)} consumers ({names}): no exact fold exists")
        chain = [node]
        nxt = users[0]
        while self.is_eval_identity(nxt) and len(self.data_users(nxt)) == 1:
            chain.append(nxt)
            nxt = self.data_users(nxt)[0]
        if self.is_flatten(nxt, chain):
            return self.forward_flatten(node, bn, nxt)
        if nxt.op == "output":
            return _Outcome(None, "its output is a model output: there is nothing after it to fold into")
        module = self.modules.get(nxt.target) if nxt.op == "call_module" else None
        if isinstance(module, _ConvNd) and not isinstance(module, _ConvTransposeNd):
            return self.forward_conv(node, bn, nxt, module)
        if isinstance(module, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
            return self.forward_linear(node, bn, nxt, module)
        kind = self.kind(nxt)
        why = f" ({kind} is not affine: the BN's scale and shift cannot move past it)" \
            if kind.lower().rstrip("_") in _ACTIVATIONS else ""
        return _Outcome(None, f"followed by {self.describe(nxt)}: no exact fold exists{why}")

    def forward_linear(self, node: fx.Node, bn: nn.Module, linear_node: fx.Node, linear: nn.Linear) -> _Outcome:
        """BatchNorm1d on a 2-D input -> Linear (timm LeViT's NormLinear head): exact, the BN's channels are the
        Linear's input features. On a 3-D input BN normalises dim 1 and the Linear reads the last: refused."""
        pattern = "bn1d->linear"
        rank = self.rank(node)
        blocker = self.module_blocker("consumer", linear_node, (nn.Linear,))
        if blocker is None and rank is None:
            blocker = "BatchNorm1d input rank is unknown: pass example_input to show it is 2-D"
        elif blocker is None and rank != 2:
            blocker = f"BatchNorm1d input is {rank}-D: it normalises dim 1, the Linear reads the last dim"
        if blocker is None and linear.in_features != bn.num_features:
            blocker = f"consumer {linear_node.target} has {linear.in_features} inputs but the BN has " \
                      f"{bn.num_features} channels"
        if blocker:
            return _Outcome(pattern, blocker)
        return _Outcome(pattern, f"folded forward into {linear_node.target}",
                        _Step(pattern, node, (linear_node.target,)))

    def identity_branch(self, node: fx.Node, bn: nn.Module, decided: dict, claimed: set[str]) -> _Outcome:
        """x -> BN -> Add, where the Add's other side sums conv branches that read the same x (RepVGG): the BN is
        the per-channel map s*x + t, which a sibling conv computes exactly as a centred identity kernel scaled by s
        plus bias t, when it has stride 1, in = out channels and its centre tap reads x at the output's position.
        The sibling is a conv whose output (after its own BN, when that folds into it) reaches the Add through Adds
        alone, every tensor on the way read by nothing else."""
        pattern = IDENTITY_MERGE
        end = node
        users = self.data_users(end)
        while len(users) == 1 and self.is_eval_identity(users[0]):
            end = users[0]
            users = self.data_users(end)
        if len(users) != 1 or not _is_add(users[0]):
            return _Outcome(None, "")
        add = users[0]
        others = [a for a in add.args[:2] if a is not end]
        if len(others) != 1 or not isinstance(others[0], fx.Node):
            return _Outcome(None, "")
        siblings: list[tuple[fx.Node, str | None]] = []
        self.collect_branches(others[0], add, decided, siblings)
        why = []
        for conv_node, via in sorted(siblings, key=lambda item: _prod(self.modules[item[0].target].kernel_size)):
            blocker = self.sibling_blocker(conv_node, node, bn, claimed)
            if blocker is None:
                conv = conv_node.target
                own = f" after {via} folds into it" if via else ""
                reason = f"merged into sibling conv {conv}{own} as a centred identity kernel plus bias (RepVGG " \
                         f"re-parameterisation); {add.name} goes"
                return _Outcome(pattern, reason, _Step(pattern, node, (conv,), joins=add, branch_end=end))
            why.append(blocker)
        if not siblings:
            return _Outcome(None, "")
        return _Outcome(pattern, "; ".join(why))

    def collect_branches(self, value: fx.Node, parent: fx.Node, decided: dict, out: list) -> None:
        """Conv nodes (with the BN that folds into each, or None) whose outputs reach `parent` by Adds alone."""
        if self.data_users(value) != [parent]:
            return
        if self.is_eval_identity(value) and isinstance(value.args[0], fx.Node):
            self.collect_branches(value.args[0], value, decided, out)
        elif _is_add(value):
            for operand in value.args[:2]:
                if isinstance(operand, fx.Node):
                    self.collect_branches(operand, value, decided, out)
        elif value.op == "call_module" and value.target in decided:
            decision, step = decided[value.target]
            if step is not None and decision.pattern == "conv->bn":
                out.append((value.args[0], value.target))
        elif value.op == "call_module" and isinstance(self.modules[value.target], _CONV_TYPES):
            out.append((value, None))

    def sibling_blocker(self, conv_node: fx.Node, node: fx.Node, bn: nn.Module, claimed: set[str]) -> str | None:
        conv = self.modules[conv_node.target]
        name = conv_node.target
        blocker = self.module_blocker("sibling conv", conv_node, _CONV_TYPES)
        if blocker:
            return blocker
        if conv_node.args[0] is not node.args[0]:
            return f"sibling conv {name} reads another tensor than the BN"
        if not conv.in_channels == conv.out_channels == bn.num_features:
            return f"sibling conv {name} maps {conv.in_channels} to {conv.out_channels} channels, the BN has " \
                   f"{bn.num_features}"
        if any(st != 1 for st in conv.stride):
            return f"sibling conv {name} has stride {tuple(conv.stride)}"
        if not _centre_reads_same_position(conv):
            return f"sibling conv {name}'s kernel {tuple(conv.kernel_size)} with padding {conv.padding} has no " \
                   "centre tap at the output's own position"
        if name in claimed:
            return f"sibling conv {name} already takes another identity branch"
        return None

    def forward_conv(self, node: fx.Node, bn: nn.Module, conv_node: fx.Node, conv: nn.Module) -> _Outcome:
        name = conv_node.target
        zero_padded = _pads_with_zeros(conv)
        pattern = "bn->padded-conv" if zero_padded else "bn->conv"
        blocker = self.module_blocker("consumer", conv_node, _CONV_TYPES)
        if blocker is None and conv.in_channels != bn.num_features:
            blocker = f"consumer {name} has {conv.in_channels} input channels but the BN has {bn.num_features}"
        if blocker is None and zero_padded:
            blocker = _tiny_scale_blocker(bn)
        if blocker:
            return _Outcome(pattern, blocker)
        if zero_padded:
            reason = f"scale folded into {name}; the shift stays as one per-channel Add before it (exact at the " \
                     "zero padding)"
        elif conv.padding_mode != "zeros":
            reason = f"folded forward into {name} ({conv.padding_mode} padding copies values, so the affine commutes)"
        else:
            reason = f"folded forward into {name} (no padding)"
        return _Outcome(pattern, reason, _Step(pattern, node, (name,)))

    def forward_flatten(self, node: fx.Node, bn: nn.Module, flatten: fx.Node) -> _Outcome:
        pattern = "bn->flatten->linear"
        users = self.data_users(flatten)
        nxt = users[0] if len(users) == 1 else None
        while nxt is not None and self.is_eval_identity(nxt):
            following = self.data_users(nxt)
            nxt = following[0] if len(following) == 1 else None
        module = self.modules.get(nxt.target) if nxt is not None and nxt.op == "call_module" else None
        if not isinstance(module, nn.Linear):
            what = self.describe(nxt) if nxt is not None else "several consumers"
            return _Outcome(None, f"followed by flatten then {what}: no exact fold exists")
        blocker = self.module_blocker("consumer", nxt, (nn.Linear,))
        channels = bn.num_features
        if blocker is None and module.in_features % channels:
            blocker = f"consumer {nxt.target} has {module.in_features} inputs, not a multiple of {channels} channels"
        shape = self.shape(node)
        if blocker is None and shape is not None and _prod(shape[1:]) != module.in_features:
            blocker = f"consumer {nxt.target} has {module.in_features} inputs but the flattened BN output has " \
                      f"{_prod(shape[1:])}"
        if blocker:
            return _Outcome(pattern, blocker)
        step = _Step(pattern, node, (nxt.target,), repeat=module.in_features // channels)
        return _Outcome(pattern, f"folded forward through the flatten into {nxt.target}", step)

    def sole_consumer(self, producer: fx.Node, consumer: fx.Node) -> str | None:
        others = [u for u in self.data_users(producer) if u is not consumer]
        if others:
            noun = "consumer" if len(others) == 1 else "consumers"
            return f"producer {self.name(producer)} has another {noun} ({', '.join(self.name(u) for u in others)})"
        return None

    def data_users(self, node: fx.Node) -> list[fx.Node]:
        """Users that read values, not just the shape (x.size(0), y.reshape_as(x) do not care what a fold changes)."""
        return [u for u in node.users if not _is_shape_query(u) and not _reads_shape_of(u, node)]

    def is_eval_identity(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return type(self.modules[node.target]) in _EVAL_IDENTITY_MODULES
        if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
            training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
            return training is False
        return node.op == "call_method" and node.target == "contiguous"

    def is_flatten(self, node: fx.Node, chain: list[fx.Node]) -> bool:
        """Whether `node` flattens its input from dim 1 to the end, i.e. to [N, C*H*W] in channel-major order."""
        if not node.args or node.args[0] is not chain[-1]:
            return False
        if node.op == "call_module" and type(self.modules[node.target]) is nn.Flatten:
            module = self.modules[node.target]
            return module.start_dim == 1 and module.end_dim == -1
        if (node.op == "call_function" and node.target is torch.flatten) or \
                (node.op == "call_method" and node.target == "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return start == 1 and end == -1
        if (node.op == "call_method" and node.target in _RESHAPES) or \
                (node.op == "call_function" and node.target is torch.reshape):
            sizes = list(node.args[1:])
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = list(sizes[0])
            return len(sizes) == 2 and sizes[1] == -1 and _is_batch_size_of(sizes[0], chain)
        return False

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        return node.meta.get(_SHAPE_KEY)

    def rank(self, node: fx.Node) -> int | None:
        """Tensor rank from the example input's run, else from what the graph itself shows (flatten gives 2-D)."""
        shape = self.shape(node)
        if shape is not None:
            return len(shape)
        if node.op == "call_module":
            module = self.modules[node.target]
            if type(module) is nn.Flatten and module.start_dim == 1 and module.end_dim == -1:
                return 2
            rank_keeping = (nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.PReLU) + _EVAL_IDENTITY_MODULES
            if isinstance(module, rank_keeping) and node.args and isinstance(node.args[0], fx.Node):
                return self.rank(node.args[0])
            return None
        if (node.op == "call_function" and node.target is torch.flatten) or \
                (node.op == "call_method" and node.target == "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return 2 if start == 1 and end == -1 else None
        if (node.op == "call_method" and node.target in _RESHAPES) or \
                (node.op == "call_function" and node.target is torch.reshape):
            sizes = list(node.args[1:])
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = list(sizes[0])
            return len(sizes)
        if self.is_eval_identity(node) and node.args and isinstance(node.args[0], fx.Node):
            return self.rank(node.args[0])
        return None

    def name(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return node.target
        return "output" if node.op == "output" else node.name

    def describe(self, node: fx.Node) -> str:
        """The kind of operation at `node` ("ReLU", "conv", "add"), then what follows it when there is one thing."""
        kind = self.kind(node)
        users = self.data_users(node)
        if len(users) == 1 and users[0].op != "output":
            return f"{kind} then {self.kind(users[0])}"
        return kind

    def kind(self, node: fx.Node) -> str:
        if node.op == "output":
            return "the model output"
        if node.op == "call_module":
            module = self.modules[node.target]
            if isinstance(module, _ConvNd) and not isinstance(module, _ConvTransposeNd):
                return "conv"
            kind = type(module).__name__
        elif node.op == "call_function":
            kind = getattr(node.target, "__name__", str(node.target))
        else:
            kind = str(node.target)
        return "ReLU" if kind.lower().rstrip("_") == "relu" else kind


def _is_plain(module: nn.Module, types: tuple[type, ...]) -> bool:
    """Whether `module` is one of `types`, or a subclass that computes exactly the same way."""
    base = next((t for t in types if isinstance(module, t)), None)
    return base is not None and all(getattr(type(module), attr, None) is getattr(base, attr, None)
                                    for attr in ("forward", "_conv_forward"))


def _reads_shape_of(user: fx.Node, node: fx.Node) -> bool:
    """Whether `user` reads `node` for its shape alone, as the argument of y.reshape_as(node)."""
    return user.op == "call_method" and user.target in _SHAPE_OF_ARG and len(user.args) == 2 and \
        user.args[1] is node and user.args[0] is not node


def _is_add(node: fx.Node) -> bool:
    """A plain two-tensor add (a + b, a += b, torch.add(a, b) without alpha)."""
    adds = node.op == "call_function" and node.target in _ADDS
    return adds and len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)


def _centre_reads_same_position(conv: nn.Module) -> bool:
    """Whether the kernel's centre tap reads the input at the output's own position (odd kernel, stride 1 aside,
    padding of exactly dilation * (k - 1) / 2 on each side): then a centred identity kernel computes x itself."""
    if any(k % 2 == 0 for k in conv.kernel_size):
        return False
    if conv.padding == "same":
        return True
    if conv.padding == "valid":
        return all(k == 1 for k in conv.kernel_size)
    return all(p == d * (k - 1) // 2 for p, d, k in zip(conv.padding, conv.dilation, conv.kernel_size))


def _is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.op == "call_function" and node.target is getattr and len(node.args) > 1 and \
        node.args[1] in ("shape", "ndim", "dtype", "device")


def _is_batch_size_of(size, chain: list[fx.Node]) -> bool:
    """Whether `size` is x.size(0) or x.shape[0] of a tensor in `chain` (all of one shape)."""
    if not isinstance(size, fx.Node):
        return False
    if size.op == "call_method" and size.target == "size":
        dim = size.args[1] if len(size.args) > 1 else size.kwargs.get("dim")
        return size.args[0] in chain and dim == 0
    if size.op == "call_function" and size.target is operator.getitem and size.args[1] == 0:
        source = size.args[0]
        return isinstance(source, fx.Node) and _is_shape_query(source) and source.args[1] == "shape" and \
            source.args[0] in chain
    return False


def _pads_with_zeros(conv: nn.Module) -> bool:
    if conv.padding_mode != "zeros" or conv.padding == "valid":
        return False
    if conv.padding == "same":
        return any(d * (k - 1) > 0 for k, d in zip(conv.kernel_size, conv.dilation))
    return any(p > 0 for p in conv.padding)


def tiny_scale_reason(scale, shift) -> str | None:
    """Why a BN (per-channel float64 `scale`, `shift`: arrays or tensors) cannot keep its shift in front of a
    zero-padded conv as shift / scale, or None when it can; see MIN_RELATIVE_SCALE. Both fold passes ask this."""
    s = np.abs(np.asarray(scale, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        moved = np.asarray(shift, dtype=np.float64) / np.asarray(scale, dtype=np.float64)
    tiny = ~np.isfinite(moved) | (s < MIN_RELATIVE_SCALE * s.max(initial=0.0))
    if not tiny.any():
        return None
    channel = int(np.flatnonzero(tiny)[0])
    return f"BN scale is ~0 in channel {channel} (|scale| {s[channel]:.1e}, below {MIN_RELATIVE_SCALE:g} of the " \
           "layer's largest): its shift cannot move in front of a zero-padded conv exactly"


def _tiny_scale_blocker(bn: nn.Module) -> str | None:
    scale, shift = bn_scale_shift(bn)
    return tiny_scale_reason(scale.numpy(), shift.numpy())


def _prod(values) -> int:
    result = 1
    for v in values:
        result *= int(v)
    return result


def _apply(gm: fx.GraphModule, step: _Step) -> None:
    """Rewrite `gm` for one planned fold, using the neighbours' current weights so folds compose."""
    node = step.bn_node
    scale, shift = bn_scale_shift(gm.get_submodule(node.target))
    layers = [gm.get_submodule(t) for t in step.targets]
    if step.pattern == IDENTITY_MERGE:
        _merge_identity(gm, step, scale, shift)
        return
    if step.pattern in ("conv->bn", "convtranspose->bn", "linear->bn1d", "linear->flatten->bn1d", "concat(convs)->bn"):
        start = 0
        for layer in layers:
            width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            part = slice(start, start + width)
            start += width
            weight, bias = fold_output_channels(_f64(layer.weight), _f64(layer.bias), scale[part], shift[part],
                                                groups=getattr(layer, "groups", 1),
                                                transposed=isinstance(layer, _ConvTransposeNd))
            _assign(layer, weight, bias)
    elif step.pattern == "bn->padded-conv":
        (conv,) = layers
        weight, bias = fold_input_channels(_f64(conv.weight), _f64(conv.bias), scale, None, groups=conv.groups)
        _assign(conv, weight, bias)
        add = ChannelShift((shift / scale).to(conv.weight.device, conv.weight.dtype), conv.weight.dim() - 2)
        gm.add_submodule(node.target, add)
        return
    else:
        (layer,) = layers
        if step.repeat > 1:
            scale, shift = scale.repeat_interleave(step.repeat), shift.repeat_interleave(step.repeat)
        weight, bias = fold_input_channels(_f64(layer.weight), _f64(layer.bias), scale, shift,
                                           groups=getattr(layer, "groups", 1))
        _assign(layer, weight, bias)
    node.replace_all_uses_with(node.args[0])
    gm.graph.erase_node(node)


def _merge_identity(gm: fx.GraphModule, step: _Step, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """conv' = conv + (centred identity kernel * scale, bias + shift); the branch and its Add leave the graph."""
    conv = gm.get_submodule(step.targets[0])
    weight = _f64(conv.weight).clone()
    bias = _f64(conv.bias) if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64)
    channel = torch.arange(conv.out_channels)
    centre = tuple(k // 2 for k in conv.kernel_size)
    weight[(channel, channel % (conv.in_channels // conv.groups), *centre)] += scale
    _assign(conv, weight, bias + shift)
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


def _f64(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().to("cpu", torch.float64)


def _assign(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """New Parameter objects, not in-place writes: a weight tied to another module keeps serving that module."""
    ref = layer.weight
    layer.weight = nn.Parameter(weight.to(ref.device, ref.dtype), requires_grad=ref.requires_grad)
    if bias is not None:
        bias_ref = layer.bias if layer.bias is not None else ref
        layer.bias = nn.Parameter(bias.to(bias_ref.device, bias_ref.dtype), requires_grad=bias_ref.requires_grad)
