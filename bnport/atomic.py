"""Files: every file bnport writes appears whole or not at all (temp file in the same folder, fsync, os.replace), so a
killed run or a failed export never leaves a half-written file under the final name; and the sha256 that identifies
a file's content (weights, snapshots, ONNX files)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; the final file gets the permissions any new file would (0666 less the umask)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_bytes(obj) -> bytes:
    """Indented JSON (numpy/torch values as lists, paths as strings, non-finite floats as strings) as bytes."""
    return (json.dumps(obj, indent=1, default=_json_default) + "\n").encode()


def file_name_part(text: str, limit: int | None = None) -> str:
    """`text` made safe inside a file name (letters, digits, -, _ and . kept, anything else _), cut to `limit`."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
    return safe if limit is None else safe[:limit]


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_replace_dir(folder: Path, fill: Callable[[Path], None]) -> Path:
    """Build `folder` anew: `fill(tmp)` writes the files into a temporary sibling folder, which then replaces
    `folder` by renames (the old one, if any, is removed after). A failure in `fill` leaves `folder` as it was."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
