"""Image files on disk: decoding encoded bytes into RGB arrays, the dataset interface every calibration source
implements (`ImageDataset`), and the two file-based sources: a folder searched recursively and a list file. An
image that cannot be decoded is reported by index so a calibration run can skip and count it (or, with
`strict`, stop and name it); the RecordIO and `.bin` readers reuse the same interface.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from bnport.data.transforms import InputSpec
from bnport.errors import BnportError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
LIST_SUFFIXES = (".txt", ".lst", ".list")


class UnreadableImageError(BnportError):
    """One image could not be read or decoded; datasets skip these unless `strict`."""


def decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG/BMP/WebP bytes -> HxWx3 RGB uint8 (grayscale, palette and RGBA converted; alpha dropped).

    The EXIF orientation is applied, as cv2.imread (used by insightface's tools) does. Raises ValueError when the
    bytes are not a complete image (corrupt, truncated, empty)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = ImageOps.exif_transpose(image).convert("RGB")
    except UnidentifiedImageError:
        raise ValueError(f"not a readable image (no known image format in its {len(data)} bytes)") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a readable image ({exc})") from None
    return np.array(rgb, dtype=np.uint8)


class ImageDataset(torch.utils.data.Dataset):
    """Calibration images as network inputs. Item i is `(spec.to_tensor(image), i)`, or `(None, i)` when the image
    cannot be decoded and `strict` is False (batch with `collate_images`, which counts the skipped ones).

    Subclasses implement `__len__`, `_read(i) -> bytes` (raising OSError/ValueError for an unreadable item),
    `describe(i)` and `_fingerprint_digest()`, and say in `covers` what that digest covers. Instances are picklable
    so DataLoader workers can use them; file handles are opened lazily in each process."""

    kind = "images"
    covers = "the source file's bytes"  # what `_fingerprint_digest` hashes; subclasses hashing other things say so

    def __init__(self, path: Path, spec: InputSpec, *, strict: bool = False):
        self.path = Path(path)
        self.spec = spec
        self.strict = strict

    def __len__(self) -> int:
        raise NotImplementedError

    def _read(self, i: int) -> bytes:
        raise NotImplementedError

    def describe(self, i: int) -> str:
        """A human name for item i: a file path, `train.rec#key` or `pack.bin#i`."""
        raise NotImplementedError

    def _fingerprint_digest(self) -> str:
        raise NotImplementedError

    def _check_index(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        return int(i)

    def load_uint8(self, i: int) -> np.ndarray:
        """Item i as HxWx3 RGB uint8 resized to the spec; raises UnreadableImageError (a BnportError) if corrupt."""
        i = self._check_index(i)
        try:
            image = decode_image(self._read(i))
        except (OSError, ValueError) as exc:
            raise UnreadableImageError(
                f"cannot read image {self.describe(i)}: {exc}",
                "fix or remove it, or drop --strict-data to skip unreadable images") from None
        return self.spec.resize(image)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int]:
        i = self._check_index(i)
        try:
            image = self.load_uint8(i)
        except UnreadableImageError:
            if self.strict:
                raise
            return None, i
        return self.spec.to_tensor(image), i

    def fingerprint(self) -> dict:
        """What run.json records about the data (and a resumed run checks): kind, path, count, and a sha256 of what
        the source was opened from (`covers` says what; never a read of every image, which would cost minutes at
        millions of images)."""
        return {"kind": self.kind, "path": str(self.path.resolve()), "count": len(self),
                "sha256": self._fingerprint_digest(), "covers": self.covers}


class ImageFilesDataset(ImageDataset):
    """Image files named relative to `root` (absolute names stay absolute): a folder's tree or a list file's lines."""

    def __init__(self, path: Path, root: Path, names: list[str], spec: InputSpec, *, kind: str,
                 strict: bool = False):
        super().__init__(path, spec, strict=strict)
        self.kind = kind
        self.root = Path(root)
        self.names = names

    def __len__(self) -> int:
        return len(self.names)

    def file(self, i: int) -> Path:
        return self.root / self.names[i]

    def _read(self, i: int) -> bytes:
        return self.file(i).read_bytes()

    def describe(self, i: int) -> str:
        return str(self.file(self._check_index(i)))

    @property
    def covers(self) -> str:
        if self.kind == "list":
            return "the list file's bytes, not the images it names"
        return "the image paths under the folder (its directory listing), not the files' sizes or contents"

    def _fingerprint_digest(self) -> str:
        if self.kind == "list":
            return _sha256_file(self.path)
        digest = hashlib.sha256()
        for start in range(0, len(self.names), 65536):
            digest.update("".join(f"{name}\n" for name in self.names[start:start + 65536]).encode())
        return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _walk_images(root: Path) -> list[str]:
    names, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop: stop descending
            dirnames[:] = []
            continue
        seen.add(real)
        # hidden entries are skipped: macOS "._x.jpg" resource forks are not images but carry image suffixes
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        names.extend(os.path.relpath(os.path.join(dirpath, f), root) for f in filenames
                     if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES)
    return sorted(names)


def open_folder(path: str | Path, spec: InputSpec, *, strict: bool = False) -> ImageFilesDataset:
    """Every .jpg/.jpeg/.png/.bmp/.webp file under `path` (recursive, suffixes case-insensitive, hidden names
    skipped, symlinks followed), in sorted path order."""
    path = Path(path)
    names = _walk_images(path)
    if not names:
        raise BnportError(f"no images found in {path}",
                          f"the folder is searched recursively for {'/'.join(IMAGE_SUFFIXES)} files; point --data "
                          "at a folder that holds some")
    return ImageFilesDataset(path, path, names, spec, kind="folder", strict=strict)


def read_list_file(path: str | Path) -> list[str]:
    """Image paths from a list file: one per line; an im2rec `.lst` line `index<TAB>label(s)<TAB>path` gives its
    last field; blank lines and `#` comments are skipped. Paths are returned as written."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise BnportError(f"cannot read list file {path}: {exc}",
                          "give a UTF-8 text file, one image path per line") from None
    # one comprehension over the lines: a list of 5.8 M images opens in about a second
    lines = (line for line in map(str.strip, text.splitlines()) if line and line[0] != "#")
    if "\t" in text:
        return [line.rsplit("\t", 1)[-1].strip() for line in lines]
    return list(lines)


def open_list(path: str | Path, spec: InputSpec, *, strict: bool = False) -> ImageFilesDataset:
    """The images named in a list file, relative paths taken from the list's folder. A missing file counts as
    unreadable (skipped, or an error with `strict`)."""
    path = Path(path)
    names = read_list_file(path)
    if not names:
        raise BnportError(f"no image paths in list file {path}",
                          "write one image path per line (relative to the list's folder)")
    return ImageFilesDataset(path, path.parent, names, spec, kind="list", strict=strict)
