"""The fold patterns of the PyTorch pass: for each BatchNorm of a traced model, which exact fold applies (into the
conv / Linear before it, the conv / Linear after it, a channel concat of convs, a sibling conv of an identity branch)
or why none does, as a `BnDecision` with a one-sentence reason and, when it folds, the `Step` that `fold_torch`
applies. The math is `bnport.export.bn_math`'s (its refusal rules included), the graph queries `FxView`'s.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils import parametrize

from bnport.errors import BnportError
from bnport.export import bn_math
from bnport.export.fx_view import (ACTIVATIONS, BN_TYPES, CAT_FUNCTIONS, CONV_TRANSPOSE_TYPES, CONV_TYPES,
                                   EVAL_IDENTITY_MODULES, FxView, ShapeRecorder, centre_reads_same_position,
                                   is_add, is_plain, norm_act_parts, pads_with_zeros, prod)


def bn_arrays(bn: nn.Module) -> tuple:
    """A BatchNorm module's eval-mode (scale, shift) per channel, float64 numpy (bnport.export.bn_math)."""
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        raise BnportError(f"BatchNorm with {bn.num_features} channels has no running statistics",
                          "only BNs built with track_running_stats=True can be folded")

    def array(tensor):
        return None if tensor is None else tensor.detach().to("cpu", torch.float64).numpy()

    return bn_math.bn_scale_shift(array(bn.running_mean), array(bn.running_var), bn.eps, array(bn.weight),
                                  array(bn.bias))


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
class Step:
    """How to apply one fold: the BN node, the pattern and the modules whose weights change."""
    pattern: str
    bn_node: fx.Node
    targets: tuple[str, ...]
    repeat: int = 1
    joins: fx.Node | None = None  # bn-identity->conv: the Add that the branch ends in, which goes
    branch_end: fx.Node | None = None  # bn-identity->conv: the last node of the branch (the BN, or an identity after)


@dataclass
class Outcome:
    """One direction's verdict: `pattern` is set when the neighbourhood matches one, `step` when it also folds."""
    pattern: str | None
    reason: str
    step: Step | None = None



def analyse(gm: fx.GraphModule, example_input: torch.Tensor | None) -> list[tuple[BnDecision, Step | None]]:
    if example_input is not None:
        try:
            with torch.no_grad():
                ShapeRecorder(gm).run(example_input)
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [""])[0]
            raise BnportError(f"an input of shape {tuple(example_input.shape)} does not run through the model: "
                              f"{type(exc).__name__}: {first_line[:200]}",
                              "give the input size the model was built for with --input-size HxW "
                              "(in Python: an example_input of that shape)") from exc
    return Matcher(gm).decide_all()



class Matcher(FxView):
    """Decides each BN's fold on a traced module: the FxView queries plus the patterns and their blockers."""

    def decide_all(self) -> list[tuple[BnDecision, Step | None]]:
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

    def with_norm_act_note(self, name: str, decision: BnDecision, step: Step | None):
        layer = self.norm_acts.get(name)
        if layer is None or step is None:
            return decision, step
        kept = [type(part).__name__ for _, part in norm_act_parts(layer)
                if type(part) not in EVAL_IDENTITY_MODULES]
        tail = f"its {' and '.join(kept)} stays after it" if kept else "it has no activation"
        note = f" ({type(layer).__name__}: the BN part folds, {tail})"
        return replace(decision, reason=decision.reason + note), step

    def decide(self, name: str, nodes: list[fx.Node]) -> tuple[BnDecision, Step | None]:
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
        if not is_plain(bn, BN_TYPES):
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
        return bn_math.unusable_reason(*bn_arrays(bn))

    def module_blocker(self, role: str, node: fx.Node, exact: tuple[type, ...]) -> str | None:
        """Why the layer at `node` cannot take a fold, or None: it must be plain, used once and read nowhere else."""
        name, module = node.target, self.modules[node.target]
        if parametrize.is_parametrized(module):
            return f"{role} {name} has parametrized weights, which a fold cannot change exactly"
        if not is_plain(module, exact):
            return f"{role} {name} is a {type(module).__name__}, a subclass with its own forward: folding could be " \
                   "inexact"
        if module._forward_hooks or module._forward_pre_hooks:
            return f"{role} {name} has forward hooks"
        if len(self.sites[name]) > 1:
            return f"{role} {name} is called at {len(self.sites[name])} sites"
        if name in self.attr_users:
            return f"{role} {name}'s weights are also read directly by the model"
        return None

    def backward(self, node: fx.Node, bn: nn.Module, producer: fx.Node) -> Outcome:
        channels = bn.num_features
        module = self.modules.get(producer.target) if producer.op == "call_module" else None
        if isinstance(module, (_ConvNd, nn.Linear)):
            if isinstance(module, nn.Linear):
                pattern, exact, width = bn_math.LINEAR_BN, (nn.Linear,), module.out_features
            elif isinstance(module, _ConvTransposeNd):
                pattern, exact, width = bn_math.CONV_TRANSPOSE_BN, CONV_TRANSPOSE_TYPES, module.out_channels
            else:
                pattern, exact, width = bn_math.CONV_BN, CONV_TYPES, module.out_channels
            blocker = self.module_blocker("producer", producer, exact) or self.sole_consumer(producer, node)
            if blocker is None and pattern == bn_math.LINEAR_BN:
                blocker = self.linear_rank_blocker(producer, bn)
            if blocker is None and width != channels:
                blocker = f"producer {producer.target} has {width} outputs but the BN has {channels} channels"
            if blocker:
                return Outcome(pattern, blocker)
            reason = f"folded into {producer.target}'s weight and bias"
            return Outcome(pattern, reason, Step(pattern, node, (producer.target,)))
        if producer.op == "call_function" and producer.target in CAT_FUNCTIONS:
            return self.backward_concat(node, producer, channels)
        if self.is_reshape(producer):
            return self.backward_flat_linear(node, bn, producer)
        return Outcome(None, f"producer {self.name(producer)} is not a conv or Linear")

    def backward_flat_linear(self, node: fx.Node, bn: nn.Module, flat: fx.Node) -> Outcome:
        """Linear on (..., C) -> reshape to (-1, C) -> BatchNorm1d (timm LeViT's LinearNorm): the reshape only merges
        leading dims, so the BN's channels are the Linear's output features and the fold is exact."""
        pattern = bn_math.LINEAR_FLATTEN_BN
        source = flat.args[0] if flat.args and isinstance(flat.args[0], fx.Node) else None
        linear = self.modules.get(source.target) if source is not None and source.op == "call_module" else None
        if not isinstance(linear, nn.Linear):
            return Outcome(None, f"producer {self.name(flat)} reshapes something other than a Linear output")
        before, after = self.shape(source), self.shape(flat)
        if before is None or after is None:
            return Outcome(pattern, f"the shapes around {flat.name} are unknown: pass example_input to show them")
        if type(bn) is not nn.BatchNorm1d or len(after) != 2 or len(before) < 2 or after[1] != before[-1]:
            return Outcome(pattern, f"{flat.name} turns {source.target}'s output {list(before)} into "
                                     f"{list(after)}: its features are not the BN's channels")
        blocker = self.module_blocker("producer", source, (nn.Linear,)) or self.sole_consumer(source, flat) or \
            self.sole_consumer(flat, node)
        if blocker is None and linear.out_features != bn.num_features:
            blocker = f"producer {source.target} has {linear.out_features} outputs but the BN has " \
                      f"{bn.num_features} channels"
        if blocker:
            return Outcome(pattern, blocker)
        reason = f"folded into {source.target}'s weight and bias ({flat.name} only merges leading dims)"
        return Outcome(pattern, reason, Step(pattern, node, (source.target,)))


    def linear_rank_blocker(self, linear: fx.Node, bn: nn.Module) -> str | None:
        if type(bn) is not nn.BatchNorm1d:
            return f"a Linear feeds {type(bn).__name__}: only BatchNorm1d on a 2-D Linear output folds exactly"
        rank = self.rank(linear)
        if rank is None:
            return "Linear input rank is unknown: pass example_input to show it is 2-D"
        if rank != 2:
            return f"Linear input is {rank}-D: folding would be inexact"
        return None

    def backward_concat(self, node: fx.Node, cat: fx.Node, channels: int) -> Outcome:
        pattern = bn_math.CONCAT_BN
        parts = cat.args[0] if cat.args else cat.kwargs.get("tensors")
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        rank = self.rank(cat) or {nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}.get(type(self.modules[node.target]))
        if isinstance(dim, int) and dim < 0 and rank is not None:
            dim += rank
        is_conv = [isinstance(p, fx.Node) and p.op == "call_module" and isinstance(self.modules[p.target], _ConvNd)
                   for p in parts or ()]
        if not parts or not all(is_conv):
            return Outcome(None, f"producer {cat.name} joins inputs that are not all convs")
        if dim != 1:
            return Outcome(pattern, f"producer {cat.name} joins along dim {dim}, not the channel dim")
        if len(set(parts)) != len(parts):
            return Outcome(pattern, f"producer {cat.name} joins the same conv output twice")
        blocker = self.sole_consumer(cat, node)
        for part in parts:
            exact = CONV_TRANSPOSE_TYPES if isinstance(self.modules[part.target], _ConvTransposeNd) else CONV_TYPES
            blocker = blocker or self.module_blocker("producer", part, exact) or self.sole_consumer(part, cat)
        width = sum(self.modules[p.target].out_channels for p in parts)
        if blocker is None and width != channels:
            blocker = f"producer {cat.name} has {width} channels but the BN has {channels}"
        if blocker:
            return Outcome(pattern, blocker)
        targets = tuple(p.target for p in parts)
        return Outcome(pattern, f"split by channel into {', '.join(targets)}", Step(pattern, node, targets))

    def forward(self, node: fx.Node, bn: nn.Module, users: list[fx.Node]) -> Outcome:
        if len(users) != 1:
            names = ", ".join(self.name(u) for u in users)
            return Outcome(None, f"its output feeds {len(users)} consumers ({names}): no exact fold exists")
        chain = [node]
        nxt = users[0]
        while self.is_eval_identity(nxt) and len(self.data_users(nxt)) == 1:
            chain.append(nxt)
            nxt = self.data_users(nxt)[0]
        if self.is_flatten(nxt, chain):
            return self.forward_flatten(node, bn, nxt)
        if nxt.op == "output":
            return Outcome(None, "its output is a model output: there is nothing after it to fold into")
        module = self.modules.get(nxt.target) if nxt.op == "call_module" else None
        if isinstance(module, _ConvNd) and not isinstance(module, _ConvTransposeNd):
            return self.forward_conv(node, bn, nxt, module)
        if isinstance(module, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
            return self.forward_linear(node, bn, nxt, module)
        kind = self.kind(nxt)
        why = f" ({kind} is not affine: the BN's scale and shift cannot move past it)" \
            if kind.lower().rstrip("_") in ACTIVATIONS else ""
        return Outcome(None, f"followed by {self.describe(nxt)}: no exact fold exists{why}")

    def forward_linear(self, node: fx.Node, bn: nn.Module, linear_node: fx.Node, linear: nn.Linear) -> Outcome:
        """BatchNorm1d on a 2-D input -> Linear (timm LeViT's NormLinear head): exact, the BN's channels are the
        Linear's input features. On a 3-D input BN normalises dim 1 and the Linear reads the last: refused."""
        pattern = bn_math.BN_LINEAR
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
            return Outcome(pattern, blocker)
        return Outcome(pattern, f"folded forward into {linear_node.target}",
                        Step(pattern, node, (linear_node.target,)))

    def identity_branch(self, node: fx.Node, bn: nn.Module, decided: dict, claimed: set[str]) -> Outcome:
        """x -> BN -> Add, where the Add's other side sums conv branches that read the same x (RepVGG): the BN is
        the per-channel map s*x + t, which a sibling conv computes exactly as a centred identity kernel scaled by s
        plus bias t, when it has stride 1, in = out channels and its centre tap reads x at the output's position.
        The sibling is a conv whose output (after its own BN, when that folds into it) reaches the Add through Adds
        alone, every tensor on the way read by nothing else."""
        pattern = bn_math.IDENTITY_MERGE
        end = node
        users = self.data_users(end)
        while len(users) == 1 and self.is_eval_identity(users[0]):
            end = users[0]
            users = self.data_users(end)
        if len(users) != 1 or not is_add(users[0]):
            return Outcome(None, "")
        add = users[0]
        others = [a for a in add.args[:2] if a is not end]
        if len(others) != 1 or not isinstance(others[0], fx.Node):
            return Outcome(None, "")
        siblings: list[tuple[fx.Node, str | None]] = []
        self.collect_branches(others[0], add, decided, siblings)
        why = []
        for conv_node, via in sorted(siblings, key=lambda item: prod(self.modules[item[0].target].kernel_size)):
            blocker = self.sibling_blocker(conv_node, node, bn, claimed)
            if blocker is None:
                conv = conv_node.target
                own = f" after {via} folds into it" if via else ""
                reason = f"merged into sibling conv {conv}{own} as a centred identity kernel plus bias (RepVGG " \
                         f"re-parameterisation); {add.name} goes"
                return Outcome(pattern, reason, Step(pattern, node, (conv,), joins=add, branch_end=end))
            why.append(blocker)
        if not siblings:
            return Outcome(None, "")
        return Outcome(pattern, "; ".join(why))

    def collect_branches(self, value: fx.Node, parent: fx.Node, decided: dict, out: list) -> None:
        """Conv nodes (with the BN that folds into each, or None) whose outputs reach `parent` by Adds alone."""
        if self.data_users(value) != [parent]:
            return
        if self.is_eval_identity(value) and isinstance(value.args[0], fx.Node):
            self.collect_branches(value.args[0], value, decided, out)
        elif is_add(value):
            for operand in value.args[:2]:
                if isinstance(operand, fx.Node):
                    self.collect_branches(operand, value, decided, out)
        elif value.op == "call_module" and value.target in decided:
            decision, step = decided[value.target]
            if step is not None and decision.pattern == bn_math.CONV_BN:
                out.append((value.args[0], value.target))
        elif value.op == "call_module" and isinstance(self.modules[value.target], CONV_TYPES):
            out.append((value, None))

    def sibling_blocker(self, conv_node: fx.Node, node: fx.Node, bn: nn.Module, claimed: set[str]) -> str | None:
        conv = self.modules[conv_node.target]
        name = conv_node.target
        blocker = self.module_blocker("sibling conv", conv_node, CONV_TYPES)
        if blocker:
            return blocker
        if conv_node.args[0] is not node.args[0]:
            return f"sibling conv {name} reads another tensor than the BN"
        if not conv.in_channels == conv.out_channels == bn.num_features:
            return f"sibling conv {name} maps {conv.in_channels} to {conv.out_channels} channels, the BN has " \
                   f"{bn.num_features}"
        if any(st != 1 for st in conv.stride):
            return f"sibling conv {name} has stride {tuple(conv.stride)}"
        if not centre_reads_same_position(conv):
            return f"sibling conv {name}'s kernel {tuple(conv.kernel_size)} with padding {conv.padding} has no " \
                   "centre tap at the output's own position"
        if name in claimed:
            return f"sibling conv {name} already takes another identity branch"
        return None

    def forward_conv(self, node: fx.Node, bn: nn.Module, conv_node: fx.Node, conv: nn.Module) -> Outcome:
        name = conv_node.target
        zero_padded = pads_with_zeros(conv)
        pattern = bn_math.BN_PADDED_CONV if zero_padded else bn_math.BN_CONV
        blocker = self.module_blocker("consumer", conv_node, CONV_TYPES)
        if blocker is None and conv.in_channels != bn.num_features:
            blocker = f"consumer {name} has {conv.in_channels} input channels but the BN has {bn.num_features}"
        if blocker is None and zero_padded:
            blocker = bn_math.tiny_scale_reason(*bn_arrays(bn))
        if blocker:
            return Outcome(pattern, blocker)
        if zero_padded:
            reason = f"scale folded into {name}; the shift stays as one per-channel Add before it (exact at the " \
                     "zero padding)"
        elif conv.padding_mode != "zeros":
            reason = f"folded forward into {name} ({conv.padding_mode} padding copies values, so the affine commutes)"
        else:
            reason = f"folded forward into {name} (no padding)"
        return Outcome(pattern, reason, Step(pattern, node, (name,)))

    def forward_flatten(self, node: fx.Node, bn: nn.Module, flatten: fx.Node) -> Outcome:
        pattern = bn_math.BN_FLATTEN_LINEAR
        users = self.data_users(flatten)
        nxt = users[0] if len(users) == 1 else None
        while nxt is not None and self.is_eval_identity(nxt):
            following = self.data_users(nxt)
            nxt = following[0] if len(following) == 1 else None
        module = self.modules.get(nxt.target) if nxt is not None and nxt.op == "call_module" else None
        if not isinstance(module, nn.Linear):
            what = self.describe(nxt) if nxt is not None else "several consumers"
            return Outcome(None, f"followed by flatten then {what}: no exact fold exists")
        blocker = self.module_blocker("consumer", nxt, (nn.Linear,))
        channels = bn.num_features
        if blocker is None and module.in_features % channels:
            blocker = f"consumer {nxt.target} has {module.in_features} inputs, not a multiple of {channels} channels"
        shape = self.shape(node)
        if blocker is None and shape is not None and prod(shape[1:]) != module.in_features:
            blocker = f"consumer {nxt.target} has {module.in_features} inputs but the flattened BN output has " \
                      f"{prod(shape[1:])}"
        if blocker:
            return Outcome(pattern, blocker)
        step = Step(pattern, node, (nxt.target,), repeat=module.in_features // channels)
        return Outcome(pattern, f"folded forward through the flatten into {nxt.target}", step)

