"""Image-pair verification benchmarks that are not IJB: `pairs:FILE.csv` (a list of `path_a,path_b,label` lines) and
`folder:DIR` (one sub-folder per identity, every pair of images). Both give a `PairList`: the unique images, the pairs
as indices into them with same/different labels, and a loader that decodes with OpenCV and resizes to the model's
input (these images are taken as already aligned crops: no landmarks, no alignment).
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnport.data.align import read_rgb, resize_rgb
from bnport.data.folder import IMAGE_SUFFIXES
from bnport.errors import BnportError

DEFAULT_MAX_PAIRS = 10_000_000  # folder:DIR with about 4,500 images; the pair indices alone take 160 MB
_TRUE, _FALSE = ("1", "true"), ("0", "false")
_HEADER = ["path_a", "path_b", "label"]
_CSV_HINT = "write one pair per line: path_a,path_b,label (label 1/0 or true/false; paths relative to the csv's folder)"


@dataclass(eq=False)
class PairList:
    """A pair benchmark: `images` (paths as normalised strings, relative to `root` unless absolute; unique, in the
    order first seen), `pairs` (P x 2 int64 indices into `images`), `labels` (P bool, True = same identity).
    `kind` is "pairs" or "folder", `source` the csv file or the folder, `sha256` a digest of its content."""

    kind: str
    source: Path
    root: Path
    images: list[str]
    pairs: np.ndarray
    labels: np.ndarray
    sha256: str

    def __len__(self) -> int:
        return len(self.images)

    def file(self, i: int) -> Path:
        """Image i's path (an absolute name in a csv stays absolute)."""
        return self.root / self.images[i]

    def describe(self, i: int) -> str:
        """Image i's path, for messages."""
        return str(self.file(i))

    def load(self, i: int, size: tuple[int, int]) -> np.ndarray:
        """Image i as an RGB uint8 height x width x 3 array at `size` = (height, width): decoded with
        `cv2.imdecode` (as `cv2.imread`: EXIF orientation applied), BGR -> RGB, resized with `cv2.resize`
        INTER_LINEAR when its size differs (no antialiasing when shrinking: give crops near the model's size).
        A missing or undecodable file is a BnportError naming it."""
        path = self.file(i)
        rgb = read_rgb(path, "benchmark image", read_hint=f"restore the file or remove it from {self.source}",
                       decode_hint=f"the file is corrupt or not an image: replace it, or remove it from {self.source}")
        return resize_rgb(rgb, size)

    def fingerprint(self) -> dict:
        """What identifies this benchmark for caches and run records: kind, path, image and pair counts, sha256
        (of the csv file; of the folder's image names and sizes)."""
        return {"kind": self.kind, "path": str(self.source.resolve()), "count": len(self.images),
                "pairs": int(len(self.pairs)), "sha256": self.sha256}


def read_pairs_csv(path: str | Path) -> PairList:
    """Read a `pairs:FILE.csv` benchmark: lines `path_a,path_b,label`, paths relative to the csv's folder (or
    absolute), label 1/0 or true/false (any case); an optional header line `path_a,path_b,label`; blank lines
    ignored; fields may be quoted (a path with a comma). Every image must exist (checked once per unique path).
    The list needs both genuine (1) and impostor (0) pairs. Problems are BnportErrors naming the file and line."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BnportError(f"pairs file not found: {path}", "give pairs:FILE.csv with an existing file") from None
    except OSError as exc:
        raise BnportError(f"cannot read pairs file {path}: {exc.strerror or exc}", _CSV_HINT) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BnportError(f"{path} is not a UTF-8 text file (byte {exc.start})", _CSV_HINT) from None
    root = path.parent
    index: dict[str, int] = {}
    first_line: list[int] = []
    pairs, labels = [], []
    reader = csv.reader(io.StringIO(text, newline=""))
    seen_row = False
    for row in reader:
        fields = [f.strip() for f in row]
        if not any(fields):
            continue
        line = reader.line_num
        if not seen_row and [f.lower() for f in fields] == _HEADER:
            seen_row = True
            continue
        seen_row = True
        if len(fields) != 3:
            raise BnportError(f"{path} line {line}: {len(fields)} fields, expected 3 (path_a,path_b,label)", _CSV_HINT)
        label = fields[2].lower()
        if label not in _TRUE + _FALSE:
            raise BnportError(f"{path} line {line}: label {fields[2]!r} is not 1/0 or true/false", _CSV_HINT)
        pair = []
        for name in fields[:2]:
            if not name:
                raise BnportError(f"{path} line {line}: an empty image path", _CSV_HINT)
            name = os.path.normpath(name)
            if name not in index:
                index[name] = len(index)
                first_line.append(line)
            pair.append(index[name])
        pairs.append(pair)
        labels.append(label in _TRUE)
    if not pairs:
        raise BnportError(f"{path} holds no pairs", _CSV_HINT)
    images = list(index)
    for name, line in zip(images, first_line):
        if not (root / name).is_file():
            raise BnportError(f"{path} line {line}: image not found: {root / name}",
                              "fix the path (relative paths start at the csv's folder) or remove the pair")
    label_array = np.array(labels, dtype=bool)
    _check_both_labels(path, label_array)
    return PairList(kind="pairs", source=path, root=root, images=images, pairs=np.array(pairs, dtype=np.int64),
                    labels=label_array, sha256=hashlib.sha256(data).hexdigest())


def folder_pairs(root: str | Path, *, max_pairs: int | None = None) -> PairList:
    """Read a `folder:DIR` benchmark: each sub-folder of `root` is one identity, holding its images (searched
    recursively inside it: jpg/jpeg/png/bmp/webp, any case; hidden names skipped; symlinks followed). Images are
    ordered by identity folder, then by path inside it, and every pair i < j is scored, label True when both lie
    in the same sub-folder. Refused with a BnportError: an image directly in `root` (it has no identity), no
    images, fewer than 2 identities, no identity with 2 images, or more than `max_pairs` pairs (default
    10,000,000, i.e. about 4,500 images: beyond that, sample the pairs you want into a pairs:FILE.csv)."""
    limit = DEFAULT_MAX_PAIRS if max_pairs is None else int(max_pairs)
    root = Path(root).expanduser()
    hint = "give folder:DIR where DIR holds one sub-folder per identity, each with that identity's images"
    if not root.is_dir():
        raise BnportError(f"benchmark folder not found: {root}", hint)
    loose = sorted(entry.name for entry in os.scandir(root)
                   if entry.is_file() and _is_image_name(entry.name))
    if loose:
        raise BnportError(f"image {root / loose[0]} lies directly in the benchmark folder, not in an identity "
                          f"sub-folder ({len(loose)} such images)", "move each image into its identity's sub-folder")
    images, identity = [], []
    identities = sorted(entry.name for entry in os.scandir(root)
                        if entry.is_dir() and not entry.name.startswith("."))
    for number, name in enumerate(identities):
        found = _walk_images(root / name)
        images.extend(os.path.join(name, f) for f in found)
        identity.extend([number] * len(found))
    if not images:
        raise BnportError(f"no images found in the identity sub-folders of {root}", hint)
    counts = np.bincount(identity)
    if np.count_nonzero(counts) < 2:
        raise BnportError(f"{root} has images of only one identity: no impostor pairs", hint)
    if counts.max() < 2:
        raise BnportError(f"no identity in {root} has two images: no genuine pairs", hint)
    count = len(images)
    total = count * (count - 1) // 2
    if total > limit:
        raise BnportError(f"{root} has {count} images: {total:,} pairs, more than the limit of {limit:,}",
                          "write the pairs you want to score to a csv (path_a,path_b,label) and use pairs:FILE.csv")
    first, second = np.triu_indices(count, k=1)
    ident = np.asarray(identity)
    digest = hashlib.sha256()
    for name in images:
        digest.update(f"{name}\t{(root / name).stat().st_size}\n".encode())
    return PairList(kind="folder", source=root, root=root, images=images,
                    pairs=np.stack([first, second], axis=1).astype(np.int64), labels=ident[first] == ident[second],
                    sha256=digest.hexdigest())


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _walk_images(folder: Path) -> list[str]:
    """Image files under `folder`, relative to it, sorted; hidden entries skipped, symlink loops cut."""
    names, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        names.extend(os.path.relpath(os.path.join(dirpath, f), folder) for f in filenames if _is_image_name(f))
    return sorted(names)


def _check_both_labels(path: Path, labels: np.ndarray) -> None:
    if labels.all():
        raise BnportError(f"{path} has no impostor pairs (label 0)", "TPR at FPR needs both kinds: add impostor pairs")
    if not labels.any():
        raise BnportError(f"{path} has no genuine pairs (label 1)", "TPR at FPR needs both kinds: add genuine pairs")
