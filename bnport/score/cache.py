"""Decode (and align) every benchmark image once, into a uint8 array on disk that every model then reads.

The cache is `CACHE_DIR/<bench>-<h>x<w>-<key>/images.npy` (N x H x W x 3, RGB uint8, opened memory-mapped: IJB-C is
469k images, 17 GB at 112x112, more than many machines' RAM) plus `info.json`, written last, which marks it
complete. The key hashes the benchmark's fingerprint (its files, not a stat of every image), the image size and the
cache format, so K models cost one decode, and later calls none. Decoding runs in worker processes (spawned, each
writing its slice of the memory-mapped file) with a progress bar; small benchmarks decode in-process, where
starting workers would cost more than it saves. A failed decode leaves no cache behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnport.atomic import atomic_write_json, file_name_part
from bnport.errors import BnportError

CACHE_FORMAT = 1
CACHE_ENV = "BNPORT_CACHE_DIR"
# below this many images, decoding in-process beats starting worker processes (each imports numpy, cv2, bnport)
MIN_IMAGES_FOR_WORKERS = 2048
CHUNK = 256


@dataclass
class DecodedImages:
    """A complete cache entry: `images` is the memory-mapped N x H x W x 3 array; `seconds` the decode time (0 when
    it was already on disk)."""

    images: np.ndarray
    folder: Path
    key: str
    reused: bool
    seconds: float


def default_cache_dir() -> Path:
    """$BNPORT_CACHE_DIR, else $XDG_CACHE_HOME/bnport, else ~/.cache/bnport."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "bnport"


def cache_key(bench, size: tuple[int, int]) -> str:
    identity = {"format": CACHE_FORMAT, "fingerprint": bench.fingerprint(), "size": list(size)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]


def decoded_images(bench, size: tuple[int, int], *, cache_dir: str | Path | None = None, workers: int | None = None,
                   progress: bool = True, log=None) -> DecodedImages:
    """The benchmark's images at `size` (h, w), decoded now or read from the cache. `workers`: decode processes
    (None: up to 8, at most the CPU count; 0 or 1: in this process)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = cache_key(bench, size)
    folder = root / f"{file_name_part(bench.name, 40)}-{size[0]}x{size[1]}-{key}"
    info_path, data_path = folder / "info.json", folder / "images.npy"
    if info_path.is_file() and data_path.is_file():
        images = np.load(data_path, mmap_mode="r")
        if images.shape == (len(bench), size[0], size[1], 3):
            return DecodedImages(images, folder, key, True, 0.0)
    began = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".images.{os.getpid()}.npy.partial"
    try:
        array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(len(bench), size[0], size[1], 3))
        del array
        _fill(bench, size, partial, workers=workers, progress=progress)
        os.replace(partial, data_path)
        atomic_write_json(info_path, {"format": CACHE_FORMAT, "bench": bench.to_dict(), "size": list(size),
                                      "fingerprint": bench.fingerprint(), "key": key,
                                      "seconds": round(time.perf_counter() - began, 3)})
    except BaseException:
        partial.unlink(missing_ok=True)
        if not any(folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if log is not None:
        log(f"decoded {len(bench)} images of {bench.name} at {size[0]}x{size[1]} in "
            f"{time.perf_counter() - began:.1f}s (cached in {folder})")
    return DecodedImages(np.load(data_path, mmap_mode="r"), folder, key, False, time.perf_counter() - began)


def _fill(bench, size, path: Path, *, workers: int | None, progress: bool) -> None:
    from tqdm import tqdm

    n = len(bench)
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    chunks = [(start, min(n, start + CHUNK)) for start in range(0, n, CHUNK)]
    bar = tqdm(total=n, unit="img", desc=f"decode {bench.name}", disable=None if progress else True,
               file=sys.stderr, dynamic_ncols=True)
    try:
        if workers <= 1 or n < MIN_IMAGES_FOR_WORKERS:
            for start, stop in chunks:
                bar.update(_decode_chunk(bench, size, str(path), start, stop))  # the benchmark loads directly
            return
        import multiprocessing

        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init) as pool:
            futures = [pool.submit(_decode_chunk, bench.loader(start, stop), size, str(path), start, stop)
                       for start, stop in chunks]
            try:
                for future in as_completed(futures):
                    bar.update(future.result())
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    finally:
        bar.close()


def _worker_init() -> None:
    import cv2

    cv2.setNumThreads(1)  # the pool is the parallelism


def _decode_chunk(bench, size, path: str, start: int, stop: int) -> int:
    """Decode images start..stop-1 into the memory-mapped file (each worker writes its own rows); `bench` is the
    benchmark or its `loader(start, stop)`."""
    images = np.load(path, mmap_mode="r+")
    for i in range(start, stop):
        image = bench.load(i, size)
        if image.shape != (size[0], size[1], 3):
            raise BnportError(f"benchmark image {bench.describe(i)} decoded to shape {image.shape}, "
                              f"expected {(size[0], size[1], 3)}", "this is a bug in the benchmark reader")
        images[i] = image
    images.flush()
    del images
    return stop - start
