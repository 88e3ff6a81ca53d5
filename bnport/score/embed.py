"""Run ONNX models over decoded benchmark images: uint8 RGB -> the model's input spec -> onnxruntime -> features.

`embed_many` feeds every model the same batch: each batch is read from the memory-mapped cache, normalised (and
mirrored, with `flip`) once, and on CUDA copied to the GPU once (an OrtValue every session binds through IOBinding);
a background thread prepares the next batch while the models run on this one, so reading, normalising and the
host-to-device copy overlap inference. With `flip` each model's features are the sum over the image and its mirror,
as insightface's evaluation scripts do. Features go into arrays the caller may give (memory-mapped files of the
embedding cache), so a benchmark larger than RAM streams through.
"""
from __future__ import annotations

import queue
import sys
import threading
import time

import numpy as np

from bnport.data.transforms import InputSpec
from bnport.errors import BnportError

DEFAULT_BATCH = {"cpu": 32, "cuda": 256}
PREFETCH = 2  # batches prepared ahead of the one the models run on


def to_network_input(batch: np.ndarray, spec: InputSpec) -> np.ndarray:
    """N x H x W x 3 RGB uint8 -> N x 3 x H x W float32 network input, exactly as `InputSpec.to_tensor` does it
    (channel order, then (x - mean) / std with mean and std in the model's channel order). The layout is changed on
    the uint8 pixels and the subtraction writes the float32 result in place, two passes over the batch where
    converting first and transposing last took four (7x faster on a CPU: it runs beside inference)."""
    x = (batch[..., ::-1] if spec.bgr else batch).transpose(0, 3, 1, 2)
    out = np.empty(x.shape, dtype=np.float32)
    np.subtract(x, np.asarray(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1), out=out, dtype=np.float32)
    np.divide(out, np.asarray(spec.std, dtype=np.float32).reshape(1, -1, 1, 1), out=out)
    return out


def embed_images(session, images: np.ndarray, spec: InputSpec, *, flip: bool = True, batch_size: int | None = None,
                 start: int = 0, stop: int | None = None, progress: bool = True, desc: str = "embed") -> np.ndarray:
    """Features (float32, one row per image start..stop-1) of `images` (N x H x W x 3 uint8) from one `session` (a
    bnport.runtime.sessions.RuntimeSession); see `embed_many`."""
    return embed_many([session], images, spec, flip=flip, batch_size=batch_size, start=start, stop=stop,
                      progress=progress, desc=desc)[0]


def embed_many(sessions: list, images: np.ndarray, spec: InputSpec, *, flip: bool = True,
               batch_size: int | None = None, start: int = 0, stop: int | None = None, out: list | None = None,
               progress: bool = True, desc: str = "embed") -> list[np.ndarray]:
    """Features of images start..stop-1 from each of `sessions` (all taking `spec`'s input, all on one device),
    every batch prepared once for all of them. `batch_size` None: 32 on CPU, 256 on CUDA. `out`: one array per
    session to write the rows into, or a callable (rows, width) -> array made when the width is known (None: new
    arrays). A model that gives NaN/Inf, or not one row per image, is an error naming the first bad image."""
    from tqdm import tqdm

    stop = len(images) if stop is None else stop
    if images.shape[1:3] != (spec.height, spec.width):
        raise BnportError(f"benchmark images are {images.shape[1]}x{images.shape[2]}, the model takes "
                          f"{spec.height}x{spec.width}", "this is a bug: images are decoded at the model's size")
    if not sessions or stop <= start:
        return [np.zeros((0, 0), dtype=np.float32) for _ in sessions]
    batch_size = batch_size or DEFAULT_BATCH.get(sessions[0].device, 32)
    results = list(out) if out is not None else [None] * len(sessions)
    bar = tqdm(total=stop - start, unit="img", desc=desc, disable=None if progress else True, file=sys.stderr,
               dynamic_ncols=True, leave=False)
    began = time.perf_counter()
    batches = _Prefetched(images, spec, sessions[0], flip=flip, ranges=[(lo, min(stop, lo + batch_size))
                                                                         for lo in range(start, stop, batch_size)])
    try:
        for lo, hi, x, mirrored in batches:
            for k, session in enumerate(sessions):
                features = _run(session, x, hi - lo)
                if mirrored is not None:
                    features = features + _run(session, mirrored, hi - lo)
                if results[k] is None or callable(results[k]):
                    make = results[k] or (lambda rows, width: np.empty((rows, width), dtype=np.float32))
                    results[k] = make(stop - start, features.shape[1])
                results[k][lo - start:hi - start] = features
            bar.update(hi - lo)
            bar.set_postfix_str(f"{(hi - start) / max(time.perf_counter() - began, 1e-9):.0f} img/s x "
                                f"{len(sessions)} model{'s' if len(sessions) > 1 else ''}")
    finally:
        batches.close()
        bar.close()
    for features in results:
        _check_finite(features, start)
    return results


class _Prefetched:
    """The batches of `ranges`, each read from `images`, normalised, mirrored when `flip`, and made ready for
    `session`'s device (bnport.runtime.sessions.RuntimeSession.prepare), by a background thread that stays up to
    PREFETCH batches ahead. An error in the thread is raised in the caller's."""

    def __init__(self, images: np.ndarray, spec: InputSpec, session, *, flip: bool, ranges: list[tuple[int, int]]):
        self._queue: queue.Queue = queue.Queue(maxsize=PREFETCH)
        self._stop = threading.Event()

        def work() -> None:
            try:
                for lo, hi in ranges:
                    x = to_network_input(np.asarray(images[lo:hi]), spec)
                    mirrored = session.prepare(np.ascontiguousarray(x[..., ::-1])) if flip else None
                    if not self._put((lo, hi, session.prepare(x), mirrored)):
                        return
                self._put(None)
            except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
                self._put(err)

        self._thread = threading.Thread(target=work, name="bnport-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _run(session, x, n: int) -> np.ndarray:
    features = np.asarray(session.run_prepared(x)[0], dtype=np.float32)
    if features.ndim < 2 or features.shape[0] != n:
        raise BnportError(f"the model's first output has shape {list(features.shape)} for a batch of {n}",
                          "score needs a model whose first output is one embedding per image (N x D)")
    return features.reshape(features.shape[0], -1)


def _check_finite(features: np.ndarray, start: int, rows: int = 65536) -> None:
    for lo in range(0, len(features), rows):  # in slices: a memory-mapped IJB-C array need not be read at once
        bad = ~np.isfinite(features[lo:lo + rows]).all(axis=1)
        if bad.any():
            first = int(np.flatnonzero(bad)[0]) + lo + start
            raise BnportError(f"the model gave NaN/Inf features (first at image {first})",
                              "check the model file and its input spec (--mean/--std/--bgr)")
