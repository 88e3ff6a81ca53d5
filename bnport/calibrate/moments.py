"""Per-channel moments of a BN layer's input in float64, pooled over batches and processes.

`channel_moments(x, shift)` gives, for each channel (dimension 1) of `x`, the float64 triple (n, sum(x - shift),
sum((x - shift)^2)), computed from a float64 copy of `x` taken a slice of the batch at a time (a bounded
temporary, which on a CPU stays in cache). The sums of several batches, or of several processes (all-reduced),
pool them exactly; `pooled` turns them into the mean and the unbiased variance. `shift` is any per-channel value
every process shares (the layer's stored running mean): near the data's mean, it keeps sum(x^2) - n mean^2 clear of
cancellation.

The sequential calibration (bnport.calibrate.sequential) measures its statistics this way, and so does the
consistency figure (bnport.calibrate.consistency).
"""
from __future__ import annotations

import torch

# Elements of the float64 copy made at once: 2^20 (8 MB, a size caches hold: three times faster than one copy of a
# whole 32-image batch at 112x112), taken a slice of images at a time (one image when an image holds more).
CHUNK_ELEMENTS = 1 << 20
# On a GPU a slice costs kernel launches, not cache misses: whole batches up to 2^26 elements (512 MB).
DEVICE_CHUNK_ELEMENTS = 1 << 26


def channel_moments(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(3, C) float64 on x's device: n, sum(x - shift) and sum((x - shift)^2) per channel (dimension 1) of `x`."""
    channels = x.shape[1]
    per_image = max(1, x[0].numel())
    step = max(1, (CHUNK_ELEMENTS if x.device.type == "cpu" else DEVICE_CHUNK_ELEMENTS) // per_image)
    view = (1, channels) + (1,) * (x.dim() - 2)
    dims = [0] + list(range(2, x.dim()))
    centre = shift.to(x.device, torch.float64).view(view)
    out = torch.zeros(3, channels, dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], step):
        d = x[start:start + step].double()
        d -= centre
        out[1] += d.sum(dims)
        d.mul_(d)
        out[2] += d.sum(dims)
    out[0] = float(x.numel() // channels)
    return out


def pooled(moments: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased variance) in float64 from `channel_moments` sums taken with `shift`; a channel with fewer than
    two values gives NaN variance (the caller decides what such a layer keeps)."""
    n, s1, s2 = moments[0], moments[1], moments[2]
    centred_mean = s1 / n
    var = (s2 - s1 * centred_mean) / (n - 1)
    return shift.to(moments.device, torch.float64) + centred_mean, var.clamp_min(0)
