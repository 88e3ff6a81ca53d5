"""RecordIO written without mxnet, for the reader's tests and for damaged data sets: `write_rec` frames records as
dmlc-core's writer does (splitting a record where its data holds the magic at a 4-aligned offset), `record` packs an
image record's header and label, `png_bytes` a small flat PNG."""
from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

MAGIC = 0xCED7230A  # dmlc-core kMagic


def write_rec(path: Path, records: list[bytes]) -> list[int]:
    """dmlc-core's writer, re-done: split where the data holds the magic at a 4-aligned offset. Returns offsets."""
    out, offsets = bytearray(), []
    for data in records:
        offsets.append(len(out))
        magic = struct.pack("<I", MAGIC)
        cuts = [i for i in range(0, len(data) - len(data) % 4, 4) if data[i:i + 4] == magic]
        chunks, start = [], 0
        for cut in cuts:
            chunks.append(data[start:cut])
            start = cut + 4
        chunks.append(data[start:])
        for k, chunk in enumerate(chunks):
            cflag = 0 if len(chunks) == 1 else 1 if k == 0 else 3 if k == len(chunks) - 1 else 2
            out += struct.pack("<II", MAGIC, (cflag << 29) | len(chunk)) + chunk + b"\0" * ((-len(chunk)) % 4)
    path.write_bytes(bytes(out))
    return offsets


def record(payload: bytes, label: float | list[float], id_: int = 0) -> bytes:
    if isinstance(label, list):
        return struct.pack("<IfQQ", len(label), 0.0, id_, 0) + struct.pack(f"<{len(label)}f", *label) + payload
    return struct.pack("<IfQQ", 0, label, id_, 0) + payload


def png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((12, 10, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
