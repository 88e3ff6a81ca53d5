"""A parsed IJB release kept on disk, so that every later `score` call on the same release starts at once.

Reading and checking IJB-C's meta files (469,375 faces, 15,658,489 template pairs, the 1:N CSVs) takes about 7 s on
a CPU core, on every call; the checked arrays load back in a fraction of a second. `read_ijb_cached` keeps them in
`FOLDER/KIND-KEY.npz`, KEY naming the release's folder and each meta file's size and modification time (or its
absence), as make does: an edited, added or removed meta file is read and checked again. The file is a plain numpy
.npz (no pickles, loaded with allow_pickle=False) written to a temporary name and renamed into place; one that cannot
be read is read from the release again and rewritten. Images are not part of it (see bnport.score.cache).
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np

from bnport.atomic import atomic_write_bytes
from bnport.data.ijb import IjbRelease, meta_file_names, read_ijb
from bnport.data.ijb_1n import IdentificationProtocol, TemplateSet, protocol_files

FORMAT = 1
ARRAYS = ("landmarks", "faceness", "templates", "medias", "pairs", "labels")


def release_key(root: str | Path, kind: str) -> str:
    """What a cached release is valid for: the folder, and each meta file's size and mtime (or its absence)."""
    meta = Path(root).expanduser().resolve() / "meta"
    files = {}
    for name in [*meta_file_names(kind).values(), *protocol_files(kind).values()]:
        try:
            stat = (meta / name).stat()
            files[name] = [stat.st_size, stat.st_mtime_ns]
        except FileNotFoundError:
            files[name] = None
    identity = {"format": FORMAT, "kind": kind, "root": str(meta.parent), "files": files}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def read_ijb_cached(root: str | Path, kind: str, folder: str | Path | None) -> IjbRelease:
    """`bnport.data.ijb.read_ijb(root, kind)`, from `folder`'s copy when the meta files are unchanged since it was
    written (None: no cache, read the release)."""
    kind = str(kind).lower()
    if folder is None or kind not in ("ijbc", "ijbb"):
        return read_ijb(root, kind)
    path = Path(folder) / f"{kind}-{release_key(root, kind)}.npz"
    if path.is_file():
        try:
            return _load(path, Path(root).expanduser(), kind)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # damaged: read the release again
            pass
    release = read_ijb(root, kind)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, _dump(release))
    except OSError:  # a read-only or full cache folder costs the next call its 7 s, nothing else
        pass
    return release


def _dump(release: IjbRelease) -> bytes:
    arrays = {name: getattr(release, name) for name in ARRAYS}
    arrays["names"] = np.array(release.names, dtype=str)
    protocol = release.identification
    info = {"meta_sha256": release.meta_sha256, "galleries": None}
    if protocol is not None:
        info["galleries"] = list(protocol.galleries)
        info["identification_sha256"] = protocol.sha256
        for name, group in [*protocol.galleries.items(), ("probes", protocol.probes)]:
            arrays[f"set_{name}_templates"] = group.templates
            arrays[f"set_{name}_subjects"] = group.subjects
    arrays["info"] = np.array(json.dumps(info))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _load(path: Path, root: Path, kind: str) -> IjbRelease:
    with np.load(path, allow_pickle=False) as data:
        info = json.loads(str(data["info"]))
        protocol = None
        if info["galleries"] is not None:
            def group(name: str) -> TemplateSet:
                return TemplateSet(data[f"set_{name}_templates"], data[f"set_{name}_subjects"])

            protocol = IdentificationProtocol(galleries={g: group(g) for g in info["galleries"]},
                                              probes=group("probes"), sha256=info["identification_sha256"])
        return IjbRelease(root=root, kind=kind, names=data["names"].tolist(), meta_sha256=info["meta_sha256"],
                          identification=protocol, **{name: data[name] for name in ARRAYS})
