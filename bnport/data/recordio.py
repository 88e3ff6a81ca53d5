"""MXNet RecordIO (`train.rec` + `train.idx`) read without mxnet: dmlc-core's framing, mxnet's image record header,
and the two layouts found in the wild (insightface's face datasets and plain im2rec output).

Framing (dmlc-core recordio): each part on disk is uint32 magic 0xced7230a, uint32 lrec (top 3 bits = continuation
flag, low 29 bits = length), the data, zero padding to 4 bytes. Flag 0 is a whole record; 1, 2, 3 are the first,
middle and last part of a record the writer split where its data held the magic at a 4-byte-aligned offset, so the
parts are joined with the magic put back between them. The `.idx` file lists `key<TAB>offset` per record.
"""
from __future__ import annotations

import hashlib
import os
import struct
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bnport.data.folder import ImageDataset
from bnport.data.transforms import InputSpec
from bnport.errors import BnportError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_PART_HEAD = struct.Struct("<II")
_LENGTH_MASK = (1 << 29) - 1
_IR_HEADER = struct.Struct("<IfQQ")


class IRHeader(NamedTuple):
    """mxnet's image record header: `label` is a float, or a float32 array of `flag` labels when flag > 0."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def unpack_record(data: bytes) -> tuple[IRHeader, bytes]:
    """A record's bytes -> (header, payload), as mxnet.recordio.unpack; raises ValueError on a record too short."""
    if len(data) < _IR_HEADER.size:
        raise ValueError(f"record of {len(data)} bytes is shorter than its {_IR_HEADER.size}-byte header")
    flag, label, id_, id2 = _IR_HEADER.unpack_from(data)
    start = _IR_HEADER.size
    if flag > 0:
        if len(data) < start + 4 * flag:
            raise ValueError(f"record of {len(data)} bytes cannot hold the {flag} labels its header announces")
        label = np.frombuffer(data, dtype="<f4", count=flag, offset=start).astype(np.float32)
        start += 4 * flag
    return IRHeader(flag, label, id_, id2), data[start:]


class RecordIOReader:
    """Random access to the records of a `.rec` file by key (from the `.idx`, or by scanning the file when
    `idx_path` is None: keys are then 0, 1, ... in file order). `keys` is a list, `key_array` the same keys as an
    int64 array (cheaper for 10^7 records). Picklable; the file is reopened in each process."""

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = None if idx_path is None else Path(idx_path)
        if not self.rec_path.is_file():
            raise BnportError(f"RecordIO file not found: {self.rec_path}", "give the path of an existing train.rec")
        self._handle = None
        self._pid = None
        self.rec_size = self.rec_path.stat().st_size
        if self.idx_path is None:
            self.key_array, self._offsets = self._scan()
        else:
            self.key_array, self._offsets = self._read_idx()
        self._sort = np.argsort(self.key_array, kind="stable")
        self._sorted_keys = self.key_array[self._sort]
        if self.idx_path is not None:
            self._check_idx_fits()

    def _check_idx_fits(self) -> None:
        """What can be checked without reading every record: no offset lies past the end of the .rec, and the record
        at the largest offset is whole (a .rec cut short loses its last records)."""
        if len(self._offsets) == 0:
            return
        last = int(np.argmax(self._offsets))
        offset, key = int(self._offsets[last]), int(self.key_array[last])
        hint = "the .rec is truncated (copy it again) or the .idx belongs to another .rec (re-create it, or remove it)"
        if offset + _PART_HEAD.size > self.rec_size:
            raise BnportError(f"{self.idx_path} points past the end of {self.rec_path}: record {key} at offset "
                              f"{offset}, the file has {self.rec_size} bytes", hint)
        try:
            self.read_at(offset)
        except BnportError as err:
            raise BnportError(f"{self.idx_path}: its last record ({key} at offset {offset}) is not whole in "
                              f"{self.rec_path}: {err.message}", hint) from None
        finally:
            self.close()

    def _read_idx(self) -> tuple[np.ndarray, np.ndarray]:
        try:
            text = self.idx_path.read_bytes()
        except OSError as exc:
            raise BnportError(f"cannot read RecordIO index {self.idx_path}: {exc}",
                              "give the .idx written with the .rec, or leave it out to scan the .rec") from None
        bad = BnportError(f"{self.idx_path} is not a RecordIO index (expected 'key<TAB>offset' integer lines)",
                          "give the .idx written with the .rec, or remove it to scan the .rec instead")
        try:
            values = np.fromstring(text, dtype=np.int64, sep=" ")  # whitespace-separated integers, fast on 10^7 lines
        except ValueError:
            raise bad from None
        if values.size % 2 or (values.size and values[1::2].min() < 0):
            raise bad
        pairs = values.reshape(-1, 2)
        return pairs[:, 0].copy(), pairs[:, 1].copy()

    def _scan(self) -> tuple[np.ndarray, np.ndarray]:
        offsets = []
        size = self.rec_size
        with open(self.rec_path, "rb") as f:
            pos = 0
            while pos < size:
                cflag, length = self._part_head(f, pos)
                if cflag in (0, 1):
                    offsets.append(pos)
                pos += _PART_HEAD.size + length + (-length) % 4
                f.seek(pos)
        return np.arange(len(offsets), dtype=np.int64), np.asarray(offsets, dtype=np.int64)

    def _part_head(self, f, pos: int) -> tuple[int, int]:
        head = f.read(_PART_HEAD.size)
        if len(head) < _PART_HEAD.size:
            raise BnportError(f"{self.rec_path} ends inside a record at offset {pos}",
                              "the file is truncated: copy or re-create it (im2rec)")
        magic, lrec = _PART_HEAD.unpack(head)
        if magic != MAGIC:
            raise BnportError(f"bad RecordIO magic at offset {pos} of {self.rec_path}",
                              "the file is corrupt or not MXNet RecordIO, or its .idx belongs to another .rec")
        return lrec >> 29, lrec & _LENGTH_MASK

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"], state["_pid"] = None, None
        state.pop("keys", None)
        return state

    def _file(self):
        # a handle inherited through fork shares its offset with the parent, so each process opens its own
        if self._handle is None or self._pid != os.getpid():
            self._handle = open(self.rec_path, "rb")
            self._pid = os.getpid()
        return self._handle

    @cached_property
    def keys(self) -> list[int]:
        """The record keys, in `.idx` (or file) order."""
        return self.key_array.tolist()

    def __len__(self) -> int:
        return len(self.key_array)

    def __contains__(self, key: int) -> bool:
        return bool(self.has_keys(np.asarray([key]))[0])

    def has_keys(self, keys: np.ndarray) -> np.ndarray:
        """For each of `keys`, whether the index holds it (vectorised: insightface files have 10^7 keys)."""
        if len(self._sorted_keys) == 0:
            return np.zeros(len(keys), dtype=bool)
        pos = np.minimum(np.searchsorted(self._sorted_keys, keys), len(self._sorted_keys) - 1)
        return self._sorted_keys[pos] == keys

    def offset(self, key: int) -> int:
        """The byte offset of record `key`; KeyError when the index has no such key."""
        pos = np.searchsorted(self._sorted_keys, key)
        if pos >= len(self._sorted_keys) or self._sorted_keys[pos] != key:
            raise KeyError(f"no record {key} in {self.idx_path or self.rec_path}")
        return int(self._offsets[self._sort[pos]])

    def read(self, key: int) -> bytes:
        """The full data of record `key` (parts of a split record joined)."""
        return self.read_at(self.offset(key))

    def read_at(self, offset: int) -> bytes:
        """The full data of the record whose first part starts at byte `offset`."""
        f = self._file()
        f.seek(offset)
        pos, parts = offset, []
        while True:
            cflag, length = self._part_head(f, pos)
            if not parts and cflag not in (0, 1):
                raise BnportError(f"offset {offset} of {self.rec_path} is inside a split record, not at its start",
                                  "the .idx does not belong to this .rec: re-create it, or remove it to scan the .rec")
            data = f.read(length)
            if len(data) < length:
                raise BnportError(f"{self.rec_path} ends inside a record at offset {pos}",
                                  "the file is truncated: copy or re-create it (im2rec)")
            parts.append(data)
            if cflag in (0, 3):
                return b"".join(parts)
            parts.append(_MAGIC_BYTES)
            pos += _PART_HEAD.size + length + (-length) % 4
            f.seek(pos)

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle, self._pid = None, None

    def __enter__(self) -> "RecordIOReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def listing_sha256(self) -> str:
        """sha256 of the listing: every key, then every offset, as little-endian int64, in index order. The same
        whether the keys came from the .idx or a scan, and a fraction of a second for 10^7 records."""
        digest = hashlib.sha256()
        digest.update(self.key_array.astype("<i8", copy=False).tobytes())
        digest.update(self._offsets.astype("<i8", copy=False).tobytes())
        return digest.hexdigest()


class RecordIODataset(ImageDataset):
    """The images of a RecordIO file. Layout, detected from record 0 as insightface does: a header record (flag > 0,
    empty payload, label [first identity key, end key]) means an insightface dataset whose images are keys
    1 .. first identity key - 1 (the records after are identity ranges, not images); otherwise plain im2rec, where
    every key is an image."""

    kind = "recordio"

    def __init__(self, rec_path: str | Path, spec: InputSpec, *, idx_path: str | Path | None = None,
                 strict: bool = False):
        super().__init__(Path(rec_path), spec, strict=strict)
        self.reader = RecordIOReader(rec_path, idx_path)
        self.layout, self.image_keys = self._detect_layout()
        if len(self.image_keys) == 0:
            raise BnportError(f"no image records in {self.path}", "point --data at a RecordIO file that holds images")

    def _detect_layout(self) -> tuple[str, np.ndarray]:
        if 0 in self.reader:
            try:
                header, payload = unpack_record(self.reader.read(0))
            except ValueError:
                header, payload = None, b""
            # im2rec --pack-label also writes flag > 0, but with an image payload
            if header is not None and header.flag > 0 and not payload:
                first_identity = int(header.label[0])
                keys = np.arange(1, first_identity, dtype=np.int64)
                missing = keys[~self.reader.has_keys(keys)]
                if len(missing):
                    raise BnportError(f"{self.path}: its header record says images are keys 1..{first_identity - 1} "
                                      f"but key {missing[0]} is not in the index",
                                      "the .idx does not belong to this .rec: re-create it, or remove it to scan")
                return "insightface", keys
        return "im2rec", self.reader.key_array

    def __len__(self) -> int:
        return len(self.image_keys)

    def key(self, i: int) -> int:
        return int(self.image_keys[self._check_index(i)])

    def _read(self, i: int) -> bytes:
        return unpack_record(self.reader.read(self.key(i)))[1]

    def label(self, i: int) -> int:
        """The class label of item i (the first label when a record carries several)."""
        label = unpack_record(self.reader.read(self.key(i)))[0].label
        return int(label[0]) if isinstance(label, np.ndarray) else int(label)

    def describe(self, i: int) -> str:
        return f"{self.path}#{self.key(i)}"

    covers = "the record listing (keys and offsets, from the .idx or a scan) and the .rec size, not record contents"

    def _fingerprint_digest(self) -> str:
        return self.reader.listing_sha256()

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "layout": self.layout, "rec_size": self.reader.rec_size}
