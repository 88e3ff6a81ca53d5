"""insightface verification packs (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...): a pickle of `(bins, issame_list)`
where bins holds 2 x pairs encoded images (pair k = images 2k and 2k+1) and issame_list says which pairs match.

Security: a pickle can run arbitrary code when loaded, and packs are downloaded from the internet. They are read
with a restricted unpickler that only builds builtin containers, bytes and numpy arrays (the allow-list in
`_PackUnpickler`); anything else, such as an `os.system` call hidden in a file, is refused before it can run.
Python-2 packs (their `str` items) load as bytes.
"""
from __future__ import annotations

import codecs
import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnport.data.folder import ImageDataset
from bnport.data.transforms import InputSpec
from bnport.errors import BnportError

_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_SCALAR = np.bool_(True).__reduce__()[0]
# numpy 1.x pickles name numpy.core, numpy 2.x numpy._core: both map to the installed numpy's functions
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    ("builtins", "bytes"): bytes,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "bool"): bool,
}


@dataclass
class BinPack:
    """A verification pack: `images[2k]` and `images[2k + 1]` form pair k, `issame[k]` says if they match."""

    images: list[bytes]
    issame: np.ndarray


class _PackUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise BnportError(f"{self.path} is not a plain verification pack: its pickle calls {module}.{name}",
                              "bnport only loads (bins, issame_list) of bytes and numpy arrays; re-create the pack "
                              "from its images") from None


def read_bin_pack(path: str | Path) -> BinPack:
    """Load an insightface `.bin` pack (Python 2 or 3 pickle; image items as bytes or uint8 numpy arrays)."""
    path = Path(path)
    hint = "give an insightface verification pack such as lfw.bin, a pickle of (bins, issame_list)"
    try:
        with open(path, "rb") as f:
            loaded = _PackUnpickler(f, path).load()
    except BnportError:
        raise
    except OSError as exc:
        raise BnportError(f"cannot read {path}: {exc}", hint) from None
    except Exception as exc:  # a file that is not a pickle can fail in many ways (EOFError, UnpicklingError, ...)
        raise BnportError(f"{path} is not a readable .bin pack ({type(exc).__name__}: {exc})", hint) from None
    if not (isinstance(loaded, (tuple, list)) and len(loaded) == 2):
        raise BnportError(f"{path} holds a {type(loaded).__name__}, not the pair (bins, issame_list)", hint)
    bins, issame = loaded
    images = []
    for item in bins:
        if isinstance(item, np.ndarray) and item.dtype == np.uint8:
            images.append(item.tobytes())
        elif isinstance(item, (bytes, bytearray)):
            images.append(bytes(item))
        else:
            raise BnportError(f"{path}: image {len(images)} is a {type(item).__name__}, not encoded image bytes", hint)
    try:
        issame = np.asarray(issame, dtype=bool).reshape(-1)
    except (TypeError, ValueError):
        raise BnportError(f"{path}: issame_list is not a list of booleans", hint) from None
    if len(images) != 2 * len(issame):
        raise BnportError(f"{path} holds {len(images)} images for {len(issame)} pairs (expected twice as many)", hint)
    return BinPack(images=images, issame=issame)


class BinPackDataset(ImageDataset):
    """Every image of a `.bin` pack (both sides of every pair), for calibration or parity inputs. Workers reload
    the pack themselves instead of receiving it pickled."""

    kind = "pack"

    def __init__(self, path: str | Path, spec: InputSpec, *, strict: bool = False):
        super().__init__(Path(path), spec, strict=strict)
        self._pack: BinPack | None = read_bin_pack(self.path)
        self._count = len(self._pack.images)
        if self._count == 0:
            raise BnportError(f"{self.path} holds no images", "give a pack with at least one pair")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pack": None}

    @property
    def pack(self) -> BinPack:
        if self._pack is None:
            self._pack = read_bin_pack(self.path)
        return self._pack

    def __len__(self) -> int:
        return self._count

    def _read(self, i: int) -> bytes:
        return self.pack.images[i]

    def describe(self, i: int) -> str:
        return f"{self.path}#{self._check_index(i)}"

    def _fingerprint_digest(self) -> str:
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
