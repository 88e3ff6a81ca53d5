"""The torch.fx side of the PyTorch fold: trace a model so that every BatchNorm, conv and Linear is one node (timm's
norm+act layers become their BN, drop and act parts), record tensor shapes from an example input, and answer the
questions the fold patterns ask of the graph (who reads a tensor for its values, what a node is, its rank, whether it
flattens). Queries only: the patterns are in `bnport.export.fold_patterns`, the rewriting in `fold_torch`.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
EVAL_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                          nn.FeatureAlphaDropout)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
CAT_FUNCTIONS = (torch.cat, torch.concat, torch.concatenate)
RESHAPES = ("view", "reshape")
_ADDS = (operator.add, operator.iadd, torch.add)
# activations by module class or function name, lower case: a BN followed by one of these cannot fold forward
ACTIVATIONS = frozenset({"relu", "relu6", "prelu", "leakyrelu", "leaky_relu", "elu", "selu", "celu", "gelu", "silu",
                          "swish", "mish", "hardswish", "hardsigmoid", "sigmoid", "tanh", "softplus"})
# methods whose second argument is read for its shape only: y.reshape_as(x) does not care what a fold does to x
_SHAPE_OF_ARG = ("reshape_as", "view_as", "expand_as")
# timm's norm + act layers, by defining module and class name: a BatchNorm subclass whose forward is exactly the BN,
# then its `drop` module (when it has one), then its `act` module (when it has one). A user's own class of the same
# name may compute anything, so the module path is part of the key.
NORM_ACT_LAYERS = frozenset({(module, name) for module in ("timm.layers.norm_act", "timm.models.layers.norm_act")
                             for name in ("BatchNormAct2d", "SyncBatchNormAct")})
SHAPE_KEY = "bnport_shape"
NORM_ACT_KEY = "bnport_norm_acts"


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
    base = next(t for t in BN_TYPES if isinstance(layer, t))
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


def trace(model: nn.Module) -> fx.GraphModule | str:
    """The traced module, or the one-line error when torch.fx cannot trace `model`.

    Each known norm+act layer's node calls a plain BatchNorm twin in the traced module (the layer's own forward
    would also apply the activation, which now has its own node); `meta[NORM_ACT_KEY]` names those layers."""
    try:
        tracer = _LeafTracer()
        graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:  # any failure means "not traceable": the plan reports it, the ONNX pass takes over
        message = " ".join(str(exc).split())
        return f"{type(exc).__name__}: {message[:200]}"
    for name, layer in tracer.norm_acts.items():
        set_submodule(gm, name, _plain_twin(layer))
    gm.meta[NORM_ACT_KEY] = {name: layer for name, layer in tracer.norm_acts.items()}
    return gm


def set_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Put `module` at `target` of `gm`. The containers on the way are the GraphModule's own (fx builds fresh ones
    for the dotted paths it copies), so the traced model's modules are not changed."""
    parent, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


def settle_norm_acts(gm: fx.GraphModule) -> None:
    """After the folds: each norm+act layer's tail parts stay reachable under its name. A folded BN part leaves an
    empty container there (not a BatchNorm that nothing calls), a shift module (padded-conv fold) takes the parts."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for name, layer in gm.meta.get(NORM_ACT_KEY, {}).items():
        parts = norm_act_parts(layer)
        if not any(f"{name}.{part}" in called for part, _ in parts):
            continue
        holder = gm.get_submodule(name) if name in called else nn.Module()
        for part_name, part in parts:
            if getattr(holder, part_name, None) is not part:
                holder.add_module(part_name, part)
        set_submodule(gm, name, holder)




class ShapeRecorder(fx.Interpreter):
    """Runs the traced graph once and notes each tensor's shape on its node."""

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta[SHAPE_KEY] = tuple(result.shape)
        return result



class FxView:
    """Read-only view of a traced module: call sites, data users, ranks, what each node is."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.norm_acts: dict[str, nn.Module] = gm.meta.get(NORM_ACT_KEY, {})
        self.sites: dict[str, list[fx.Node]] = {}
        self.attr_users: set[str] = set()
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.sites.setdefault(node.target, []).append(node)
            elif node.op == "get_attr":
                self.attr_users.add(node.target.rsplit(".", 1)[0])


    def is_reshape(self, node: fx.Node) -> bool:
        return (node.op == "call_method" and node.target in (*RESHAPES, "flatten")) or \
            (node.op == "call_function" and node.target in (torch.flatten, torch.reshape))


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
            return type(self.modules[node.target]) in EVAL_IDENTITY_MODULES
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
        if (node.op == "call_method" and node.target in RESHAPES) or \
                (node.op == "call_function" and node.target is torch.reshape):
            sizes = list(node.args[1:])
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = list(sizes[0])
            return len(sizes) == 2 and sizes[1] == -1 and _is_batch_size_of(sizes[0], chain)
        return False

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        return node.meta.get(SHAPE_KEY)

    def rank(self, node: fx.Node) -> int | None:
        """Tensor rank from the example input's run, else from what the graph itself shows (flatten gives 2-D)."""
        shape = self.shape(node)
        if shape is not None:
            return len(shape)
        if node.op == "call_module":
            module = self.modules[node.target]
            if type(module) is nn.Flatten and module.start_dim == 1 and module.end_dim == -1:
                return 2
            rank_keeping = (nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.PReLU) + EVAL_IDENTITY_MODULES
            if isinstance(module, rank_keeping) and node.args and isinstance(node.args[0], fx.Node):
                return self.rank(node.args[0])
            return None
        if (node.op == "call_function" and node.target is torch.flatten) or \
                (node.op == "call_method" and node.target == "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return 2 if start == 1 and end == -1 else None
        if (node.op == "call_method" and node.target in RESHAPES) or \
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



def is_plain(module: nn.Module, types: tuple[type, ...]) -> bool:
    """Whether `module` is one of `types`, or a subclass that computes exactly the same way."""
    base = next((t for t in types if isinstance(module, t)), None)
    return base is not None and all(getattr(type(module), attr, None) is getattr(base, attr, None)
                                    for attr in ("forward", "_conv_forward"))


def _reads_shape_of(user: fx.Node, node: fx.Node) -> bool:
    """Whether `user` reads `node` for its shape alone, as the argument of y.reshape_as(node)."""
    return user.op == "call_method" and user.target in _SHAPE_OF_ARG and len(user.args) == 2 and \
        user.args[1] is node and user.args[0] is not node


def is_add(node: fx.Node) -> bool:
    """A plain two-tensor add (a + b, a += b, torch.add(a, b) without alpha)."""
    adds = node.op == "call_function" and node.target in _ADDS
    return adds and len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)


def centre_reads_same_position(conv: nn.Module) -> bool:
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


def pads_with_zeros(conv: nn.Module) -> bool:
    if conv.padding_mode != "zeros" or conv.padding == "valid":
        return False
    if conv.padding == "same":
        return any(d * (k - 1) > 0 for k, d in zip(conv.kernel_size, conv.dilation))
    return any(p > 0 for p in conv.padding)



def prod(values) -> int:
    result = 1
    for v in values:
        result *= int(v)
    return result
