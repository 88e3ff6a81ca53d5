"""The consistency figure: do a model's stored BN statistics describe the activations its deployed (eval-mode) forward
actually feeds each BN layer?

The exported model normalises every BN layer's input with the stored running mean mu and variance s2. Run in eval
mode over images of the calibration distribution, each layer's input has per-channel mean m and unbiased variance v
(float64 moments, pooled over every batch and process: bnport.calibrate.moments). Per channel:

- mean error  |m - mu| / sqrt(s2 + eps): the mean of the layer's normalised output, which should be 0, in units of
  its standard deviation;
- var error   |v - s2| / (s2 + eps): how far the normalised output's variance v / (s2 + eps) is from
  s2 / (s2 + eps) (about 1).

Each layer is summarised by its worst channel and its median channel (the midpoint of the two middle values for an
even count) of each error; the overall figure is the worst layer (the larger of its two worst-channel errors) and the
median over layers of that per-layer worst. A layer that the forward never calls is left out.

ema and exact mode measure a layer's statistics while every earlier layer normalises with batch statistics, so
their figure grows with depth even on the calibration images themselves; sequential mode measures each layer with
the earlier ones in eval mode, and reaches float32's rounding on those images. On other images the figure also holds
the sampling spread between image sets (large at a few hundred images).

`bn_consistency(module, batches)` measures it (forward pre-hooks on an eval-mode forward). A calibration run
(bnport.calibrate.engine) writes it in every snapshot's JSON as `consistency.held_out`, over `HELD_OUT_BATCHES`
global batches that follow the run's last one in the batch plan (what a longer run would take next: images the run
did not use when it covers less than an epoch, otherwise the same images in another order with fresh noise; the
entry counts the `unseen` ones), and, with `consistency = "full"`, on its last snapshot as `consistency.calibration`
over every batch the run used.
"""
from __future__ import annotations

import contextlib
import statistics

import torch
import torch.nn as nn

from bnport.calibrate.moments import channel_moments, pooled
from bnport.model.snapshot import apply_bn_state, bn_modules, bn_state
from bnport.runtime.distributed import Ranks

HELD_OUT_BATCHES = 4


def layer_errors(mean: torch.Tensor, var: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean error, var error) of input moments (mean, var) against stored statistics; see the module
    docstring."""
    scale = running_var.double() + eps
    return (mean - running_mean.double()).abs() / scale.sqrt(), (var - running_var.double()).abs() / scale


def _median(values: torch.Tensor) -> float:
    return float(torch.quantile(values, 0.5)) if values.numel() else float("nan")


def summarise(moments: dict[str, torch.Tensor], module: nn.Module, images: int) -> dict:
    """The figure from per-layer `channel_moments` sums (taken with each layer's running mean as the shift) against
    the statistics `module`'s BN layers hold."""
    layers = {}
    for name, bn in bn_modules(module):
        m = moments.get(name)
        if m is None or float(m[0, 0]) < 2:
            continue
        mean, var = pooled(m, bn.running_mean)
        mean_err, var_err = layer_errors(mean, var, bn.running_mean.to(m.device), bn.running_var.to(m.device),
                                         bn.eps)
        layers[name] = {"mean_worst": float(mean_err.max()), "mean_median": _median(mean_err),
                        "var_worst": float(var_err.max()), "var_median": _median(var_err)}
    worst = {name: max(f["mean_worst"], f["var_worst"]) for name, f in layers.items()}
    top = max(worst, key=worst.get) if worst else None
    return {"images": images, "worst": worst[top] if top else None, "worst_layer": top,
            "median_layer": statistics.median(worst.values()) if worst else None, "layers": layers}


@torch.no_grad()
def measure_moments(module: nn.Module, batches, ranks: Ranks | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """(per-layer float64 moments of every BN input, images) over an eval-mode forward of `module` on `batches`
    (tensors, moved to the module's device), summed over every rank when `ranks` is a process group. The module's
    modes are put back."""
    bns = bn_modules(module)
    device = next((b.device for b in module.buffers()), torch.device("cpu"))
    moments = {name: torch.zeros(3, bn.num_features, dtype=torch.float64, device=device) for name, bn in bns}
    shifts = {name: bn.running_mean.detach().clone() for name, bn in bns}

    def hook(name):
        def record(bn, inputs):
            moments[name].add_(channel_moments(inputs[0], shifts[name]))
        return record

    modes = [(m, m.training) for m in module.modules()]
    hooks = [bn.register_forward_pre_hook(hook(name)) for name, bn in bns]
    images = 0
    try:
        module.eval()
        for x in batches:
            module(x.to(device, non_blocking=True))
            images += x.shape[0]
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes:
            m.train(mode)
    if ranks is not None and ranks.active:
        count = torch.tensor([float(images)], dtype=torch.float64, device=ranks.device)
        images = round(float(ranks.sum(count)[0]))
        for m in moments.values():
            ranks.sum(m)
    return moments, images


def bn_consistency(module: nn.Module, batches, ranks: Ranks | None = None) -> dict:
    """The consistency figure of `module`'s stored BN statistics on `batches` (an iterable of input tensors), from an
    eval-mode forward with hooks; see the module docstring for its definition and layout."""
    moments, images = measure_moments(module, batches, ranks)
    return summarise(moments, module, images)


@contextlib.contextmanager
def holding(module: nn.Module, state: dict[str, torch.Tensor]):
    """`module` with BN state `state` in its buffers for the duration, its own buffers put back after."""
    saved = bn_state(module)
    apply_bn_state(module, state)
    try:
        yield module
    finally:
        apply_bn_state(module, saved)


class HeldOut:
    """The held-out batches of a run and what they cover: this rank's share of the `HELD_OUT_BATCHES` global batches
    after the run's `total_batches` (rank r takes every W-th, from the r-th), loaded once with the run's noise (each
    batch seeded by its global index, as the run's own), kept on the host."""

    def __init__(self, dataset, plan, total_batches: int, mix, ranks: Ranks, count: int = HELD_OUT_BATCHES):
        from bnport.calibrate.sampler import load_batches

        self.globals = list(range(total_batches, total_batches + count))
        mine = _Batches(plan, self.globals[ranks.rank::ranks.world])
        self.batches = [b.images for b in load_batches(dataset, mine, mix=mix)
                        if b.images is not None and b.images.shape[0] >= 2]
        self.items, self.unseen = _coverage(plan, total_batches, self.globals)

    def figure(self, module: nn.Module, state: dict[str, torch.Tensor], ranks: Ranks) -> dict:
        """The figure of BN state `state` applied to `module` (its own statistics put back after); every rank calls
        it together."""
        with holding(module, state):
            result = bn_consistency(module, self.batches, ranks)
        return {**result, "items": self.items, "unseen": self.unseen}


class _Batches(torch.utils.data.Sampler):
    """A batch sampler over given global batch indices (the loader seeds each batch's noise by its global index)."""

    def __init__(self, plan, globals_: list[int]):
        self.plan, self.steps = plan, list(globals_)

    def global_index(self, step: int) -> int:
        return step

    def __iter__(self):
        return (self.plan.batch(g) for g in self.steps)

    def __len__(self) -> int:
        return len(self.steps)


def _coverage(plan, total_batches: int, held: list[int]) -> tuple[int, int]:
    """(dataset images in the held-out batches, how many of them no batch of the run holds)."""
    items = [i for g in held for i in plan.batch(g)]
    if total_batches >= plan.per_epoch:
        return len(items), 0
    used = torch.zeros(plan.n_items, dtype=torch.bool)
    last = plan.batch(total_batches - 1) if total_batches else []
    stop = (total_batches - 1) * plan.batch_size + len(last) if total_batches else 0
    used[plan.permutation(0)[:stop].long()] = True
    return len(items), int((~used[torch.tensor(items, dtype=torch.long)]).sum()) if items else 0
