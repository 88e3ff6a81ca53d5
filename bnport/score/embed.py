"""Run one ONNX model over decoded benchmark images: uint8 RGB -> the model's input spec -> onnxruntime -> features.

With `flip`, each batch also runs horizontally flipped and the two features are summed, as insightface's evaluation
scripts do. Batches are read from the memory-mapped cache, so a benchmark larger than RAM streams through.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from bnport.data.transforms import InputSpec
from bnport.errors import BnportError

DEFAULT_BATCH = {"cpu": 32, "cuda": 256}


def to_network_input(batch: np.ndarray, spec: InputSpec) -> np.ndarray:
    """N x H x W x 3 RGB uint8 -> N x 3 x H x W float32 network input, exactly as `InputSpec.to_tensor` does it
    (channel order, then (x - mean) / std with mean and std in the model's channel order)."""
    x = batch[..., ::-1] if spec.bgr else batch
    x = x.astype(np.float32)
    x -= np.asarray(spec.mean, dtype=np.float32)
    x /= np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def embed_images(session, images: np.ndarray, spec: InputSpec, *, flip: bool = True, batch_size: int | None = None,
                 start: int = 0, stop: int | None = None, progress: bool = True, desc: str = "embed") -> np.ndarray:
    """Features (float32, one row per image start..stop-1) of `images` (N x H x W x 3 uint8) from `session` (a
    bnport.runtime.sessions.RuntimeSession). `batch_size` None: 32 on CPU, 256 on CUDA."""
    from tqdm import tqdm

    stop = len(images) if stop is None else stop
    if images.shape[1:3] != (spec.height, spec.width):
        raise BnportError(f"benchmark images are {images.shape[1]}x{images.shape[2]}, the model takes "
                          f"{spec.height}x{spec.width}", "this is a bug: images are decoded at the model's size")
    batch_size = batch_size or DEFAULT_BATCH.get(session.device, 32)
    out = None
    bar = tqdm(total=stop - start, unit="img", desc=desc, disable=None if progress else True, file=sys.stderr,
               dynamic_ncols=True, leave=False)
    began = time.perf_counter()
    try:
        for lo in range(start, stop, batch_size):
            hi = min(stop, lo + batch_size)
            x = to_network_input(np.asarray(images[lo:hi]), spec)
            features = _run(session, x)
            if flip:
                features = features + _run(session, np.ascontiguousarray(x[..., ::-1]))
            if out is None:
                out = np.empty((stop - start, features.shape[1]), dtype=np.float32)
            out[lo - start:hi - start] = features
            bar.update(hi - lo)
            bar.set_postfix_str(f"{(hi - start) / max(time.perf_counter() - began, 1e-9):.0f} img/s")
    finally:
        bar.close()
    if out is None:
        return np.zeros((0, 0), dtype=np.float32)
    if not np.all(np.isfinite(out)):
        bad = int(np.argwhere(~np.isfinite(out))[0][0]) + start
        raise BnportError(f"the model gave NaN/Inf features (first at image {bad})",
                          "check the model file and its input spec (--mean/--std/--bgr)")
    return out


def _run(session, x: np.ndarray) -> np.ndarray:
    features = np.asarray(session.run(x), dtype=np.float32)
    if features.ndim == 1 or features.shape[0] != x.shape[0]:
        raise BnportError(f"the model's first output has shape {list(features.shape)} for a batch of {x.shape[0]}",
                          "score needs a model whose first output is one embedding per image (N x D)")
    return features.reshape(features.shape[0], -1)
