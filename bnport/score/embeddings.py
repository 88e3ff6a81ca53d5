"""Embeddings cached per (model file, benchmark images, flip): `CACHE_DIR/embeddings/<bench>-<key>.npy` (float32,
one row per image of the decoded-image cache, memory-mapped) and `.json` beside it, written last, which marks it
complete. The key hashes the ONNX file's sha256, the decoded images' cache key (the benchmark's files and the input
size) and the flip switch, so scoring the same file again, from another output folder or under another selection
rule, runs no inference. Rows are written straight into the memory-mapped file, so a benchmark larger than RAM
streams through; a failed run leaves no entry behind.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from bnport.atomic import atomic_write_json, file_name_part

EMBEDDING_FORMAT = 1


class EmbeddingCache:
    """The embeddings folder under the decoded-image cache's root (`root` None: bnport.score.cache's default)."""

    def __init__(self, root: str | Path | None = None):
        from bnport.score.cache import default_cache_dir

        self.folder = (Path(root) if root is not None else default_cache_dir()) / "embeddings"

    def key(self, model_sha256: str, images_key: str, flip: bool) -> str:
        identity = {"format": EMBEDDING_FORMAT, "model": model_sha256, "images": images_key, "flip": bool(flip)}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]

    def path(self, bench_name: str, key: str) -> Path:
        return self.folder / f"{file_name_part(bench_name, 40)}-{key}.npy"

    def load(self, bench_name: str, key: str, rows: int) -> np.ndarray | None:
        """The cached embeddings (memory-mapped), or None when there are none complete for `rows` images."""
        path = self.path(bench_name, key)
        if not (path.is_file() and path.with_suffix(".json").is_file()):
            return None
        try:
            features = np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            return None
        return features if features.ndim == 2 and features.shape[0] == rows else None

    def writer(self, bench_name: str, key: str) -> "EmbeddingWriter":
        return EmbeddingWriter(self.path(bench_name, key))


class EmbeddingWriter:
    """One entry being written: `allocate(rows, width)` makes the memory-mapped file (a partial name until
    `commit`), `commit(info)` flushes it, renames it into place and writes its `.json`; `discard` removes it."""

    def __init__(self, path: Path):
        self.path = path
        self.partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        self.array: np.ndarray | None = None

    def allocate(self, rows: int, width: int) -> np.ndarray:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.array = np.lib.format.open_memmap(self.partial, mode="w+", dtype=np.float32, shape=(rows, width))
        return self.array

    def commit(self, info: dict) -> np.ndarray:
        self.array.flush()
        self.array = None
        os.replace(self.partial, self.path)
        atomic_write_json(self.path.with_suffix(".json"), {"format": EMBEDDING_FORMAT, **info})
        return np.load(self.path, mmap_mode="r")

    def discard(self) -> None:
        self.array = None
        self.partial.unlink(missing_ok=True)
