"""The BatchNorm fold formulas, once: plain float64 numpy arrays in, arrays out, callable from any graph walker (the
PyTorch fx pass and the ONNX pass both use them), as `torch.nn.utils.fusion.fuse_conv_bn_weights` is for torch.

An eval-mode BN is the per-channel affine map y = scale * x + shift with scale = gamma / sqrt(var + eps) and
shift = beta - mean * scale. It folds exactly:
- into the layer before it, per output channel (`fold_output_channels`: conv, grouped conv, Linear, ConvTranspose);
- into the layer after it, per input channel (`fold_input_channels`), where every value that layer reads is a real
  input value (no zero padding: a padded zero would become shift / scale);
- in front of a zero-padded conv, the scale only, the shift staying as a per-channel `shift / scale` added before the
  conv (pad0(s*x + b) = s * pad0(x + b/s)), which needs every scale well away from 0;
- into a sibling conv of an identity branch as a centred identity kernel plus bias (`merge_identity`, RepVGG).

The refusal rules are here too, so both passes refuse alike: `unusable_reason` (a non-finite scale or shift) and
`tiny_scale_reason` (a scale too small to carry its shift in front of a zero-padded conv). Pattern names are the ones
every report uses, whichever graph the fold happened on.
"""
from __future__ import annotations

import numpy as np

# one name per fold pattern, for the PyTorch pass, the ONNX pass, `inspect` and every report
CONV_BN = "conv->bn"
CONV_TRANSPOSE_BN = "convtranspose->bn"
LINEAR_BN = "linear->bn1d"
LINEAR_FLATTEN_BN = "linear->flatten->bn1d"
BN_CONV = "bn->conv"
BN_PADDED_CONV = "bn->padded-conv"
BN_FLATTEN_LINEAR = "bn->flatten->linear"
BN_LINEAR = "bn1d->linear"
CONCAT_BN = "concat(convs)->bn"
IDENTITY_MERGE = "bn-identity->conv"
PATTERNS = (CONV_BN, CONV_TRANSPOSE_BN, LINEAR_BN, LINEAR_FLATTEN_BN, BN_CONV, BN_PADDED_CONV, BN_FLATTEN_LINEAR,
            BN_LINEAR, CONCAT_BN, IDENTITY_MERGE)

# A BN channel whose scale is below this fraction of the layer's largest cannot have its shift moved in front of a
# zero-padded conv as shift / scale: that value would dwarf the input it is added to, and float32 would keep little
# of the input.
MIN_RELATIVE_SCALE = 1e-6


def _f64(value) -> np.ndarray | None:
    return None if value is None else np.asarray(value, dtype=np.float64)


def bn_scale_shift(mean, var, eps: float, gamma=None, beta=None) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode BN as y = scale * x + shift per channel, in float64; `gamma`/`beta` None (affine=False) mean 1/0."""
    mean, var = _f64(mean).reshape(-1), _f64(var).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = 1.0 / np.sqrt(var + eps)
    if gamma is not None:
        scale = _f64(gamma).reshape(-1) * scale
    shift = -mean * scale
    if beta is not None:
        shift = shift + _f64(beta).reshape(-1)
    return scale, shift


def unusable_reason(scale, shift) -> str | None:
    """Why a BN with this per-channel `scale` and `shift` cannot fold at all (a NaN/Inf, from NaN statistics or a
    negative variance), or None."""
    bad = ~(np.isfinite(_f64(scale)) & np.isfinite(_f64(shift)))
    if not bad.any():
        return None
    return f"its statistics give a non-finite scale or shift (channel {int(np.flatnonzero(bad)[0])})"


def tiny_scale_reason(scale, shift) -> str | None:
    """Why a BN cannot keep its shift in front of a zero-padded conv as shift / scale, or None when it can; see
    MIN_RELATIVE_SCALE."""
    scale, shift = _f64(scale), _f64(shift)
    magnitude = np.abs(scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        moved = shift / scale
    tiny = ~np.isfinite(moved) | (magnitude < MIN_RELATIVE_SCALE * magnitude.max(initial=0.0))
    if not tiny.any():
        return None
    channel = int(np.flatnonzero(tiny)[0])
    return f"BN scale is ~0 in channel {channel} (|scale| {magnitude[channel]:.1e}, below {MIN_RELATIVE_SCALE:g} of " \
           "the layer's largest): its shift cannot move in front of a zero-padded conv exactly"


def fold_output_channels(weight, bias, scale, shift, *, groups: int = 1, transposed: bool = False
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Weight and bias of layer' = scale * layer(x) + shift per output channel (conv, grouped conv, Linear,
    ConvTranspose). Conv and Linear weights are [out, ...]; ConvTranspose weights are [in, out/groups, ...], so
    output channel g*out/groups + j lives at column j of group g's rows. `bias` None: no bias before."""
    weight, scale, shift = _f64(weight), _f64(scale), _f64(shift)
    ones = [1] * (weight.ndim - 2)
    if transposed:
        rows, cols = weight.shape[:2]
        grouped = weight.reshape(groups, rows // groups, cols, *weight.shape[2:])
        new_weight = (grouped * scale.reshape(groups, 1, cols, *ones)).reshape(weight.shape)
    else:
        new_weight = weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))
    new_bias = shift.copy() if bias is None else _f64(bias) * scale + shift
    return new_weight, new_bias


def fold_input_channels(weight, bias, scale, shift, *, groups: int = 1) -> tuple[np.ndarray, np.ndarray | None]:
    """Weight and bias of layer' = layer(scale * x + shift) per input channel, for a Linear or a conv that never
    reads a padded zero (weights [out, in/groups, ...]). `shift` None folds the scale alone and leaves the bias.

    Input channel of weight[o, j] is (o // (out/groups)) * in/groups + j; bias' = b + sum(W * shift)."""
    weight, scale = _f64(weight), _f64(scale)
    out_channels, per_group = weight.shape[:2]
    ones = [1] * (weight.ndim - 2)
    grouped = weight.reshape(groups, out_channels // groups, per_group, *weight.shape[2:])
    new_weight = (grouped * scale.reshape(groups, 1, per_group, *ones)).reshape(weight.shape)
    if shift is None:
        return new_weight, None if bias is None else _f64(bias)
    moved = (grouped * _f64(shift).reshape(groups, 1, per_group, *ones)).sum(axis=tuple(range(2, grouped.ndim)))
    moved = moved.reshape(out_channels)
    return new_weight, moved if bias is None else _f64(bias) + moved


def padded_conv_shift(scale, shift) -> np.ndarray:
    """The per-channel value added in front of a zero-padded conv whose weights took `scale` (check
    `tiny_scale_reason` first): shift / scale."""
    return _f64(shift) / _f64(scale)


def merge_identity(weight, bias, scale, shift, *, groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """conv' = conv + (scale * x + shift): a centred identity kernel scaled by `scale` added to `weight`
    ([out, in/groups, k...], odd kernel, out == in channels), `shift` added to the bias."""
    new_weight = _f64(weight).copy()
    out_channels = new_weight.shape[0]
    channel = np.arange(out_channels)
    centre = tuple(k // 2 for k in new_weight.shape[2:])
    new_weight[(channel, channel % new_weight.shape[1], *centre)] += _f64(scale)
    base = np.zeros(out_channels) if bias is None else _f64(bias)
    return new_weight, base + _f64(shift)
