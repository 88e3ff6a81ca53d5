"""insightface .bin packs written here as Python-3 pickles (bytes, numpy arrays) and as a Python-2 pickle built from
raw opcodes; a pickle that would run code must be refused without running it."""
import hashlib
import io
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from bnport.data import BinPackDataset, collate_images, open_images, read_bin_pack
from bnport.data.transforms import InputSpec
from bnport.errors import BnportError

ISSAME = [True, False]


def jpeg(seed: int, size: int) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def tiny_png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((2, 2, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


IMAGES = [jpeg(1, 16), jpeg(2, 20), tiny_png(200), jpeg(3, 16)]


def python2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
    """What Python 2's pickle.dump((bins, issame_list), f, protocol=2) writes for `str` items."""
    out = bytearray(b"\x80\x02]q\x00(")  # PROTO 2, EMPTY_LIST, BINPUT 0, MARK
    for data in bins:
        if len(data) < 256:
            out += b"U" + bytes([len(data)]) + data  # SHORT_BINSTRING
        else:
            out += b"T" + struct.pack("<i", len(data)) + data  # BINSTRING
    out += b"e]q\x01(" + b"".join(b"\x88" if s else b"\x89" for s in issame) + b"e\x86q\x02."
    return bytes(out)


@pytest.mark.parametrize("kind", ["py3_bytes", "py3_protocol2", "py3_numpy", "py2_str"])
def test_every_pickle_flavour_gives_the_same_pack(tmp_path, kind):
    assert len(IMAGES[2]) < 256 < len(IMAGES[0])  # both SHORT_BINSTRING and BINSTRING are exercised
    path = tmp_path / f"{kind}.bin"
    data = {
        "py3_bytes": lambda: pickle.dumps((IMAGES, ISSAME), protocol=pickle.HIGHEST_PROTOCOL),
        "py3_protocol2": lambda: pickle.dumps((IMAGES, ISSAME), protocol=2),
        "py3_numpy": lambda: pickle.dumps(([np.frombuffer(b, np.uint8) for b in IMAGES], np.array(ISSAME))),
        "py2_str": lambda: python2_pickle(IMAGES, ISSAME),
    }[kind]()
    path.write_bytes(data)
    pack = read_bin_pack(path)
    assert pack.images == IMAGES
    assert pack.issame.dtype == bool and pack.issame.tolist() == ISSAME


def test_dataset_yields_both_sides_of_every_pair(tmp_path):
    path = tmp_path / "lfw.bin"
    path.write_bytes(python2_pickle(IMAGES, ISSAME))
    ds = open_images(path, InputSpec(height=16, width=16))
    assert isinstance(ds, BinPackDataset) and len(ds) == 4
    assert ds.describe(2) == f"{path}#2"
    reference = np.asarray(Image.open(io.BytesIO(IMAGES[3])).convert("RGB"), dtype=np.float64)
    np.testing.assert_allclose(ds[3][0].numpy(), ((reference - 127.5) / 127.5).transpose(2, 0, 1), atol=1e-6)
    assert ds.load_uint8(1).shape == (16, 16, 3)  # 20x20 resized
    assert int(ds.load_uint8(2)[0, 0, 0]) == 200
    fp = ds.fingerprint()
    assert fp["kind"] == "pack" and fp["count"] == 4
    assert fp["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_pickled_dataset_reloads_the_pack_instead_of_carrying_it(tmp_path):
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(pickle.dumps((IMAGES, ISSAME)))
    ds = open_images(path, InputSpec(height=16, width=16))
    blob = pickle.dumps(ds)
    assert len(blob) < len(IMAGES[0])
    np.testing.assert_array_equal(pickle.loads(blob)[0][0].numpy(), ds[0][0].numpy())


def test_corrupt_image_in_pack_is_skipped(tmp_path):
    path = tmp_path / "cfp_fp.bin"
    path.write_bytes(pickle.dumps(([IMAGES[0], IMAGES[1][:100]], [True])))
    images, indices, skipped = collate_images([ds_item for ds_item in open_images(path, InputSpec(16, 16))])
    assert indices.tolist() == [0] and skipped == [1]
    with pytest.raises(BnportError, match=r"cfp_fp\.bin#1"):
        open_images(path, InputSpec(16, 16), strict=True)[1]


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_in_a_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([IMAGES[0], _Exploit(marker)], [True])))
    with pytest.raises(BnportError, match="system") as err:
        read_bin_pack(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x00\x01 definitely not a pickle", pickle.dumps({"bins": []}),
                                     pickle.dumps((IMAGES[:3], ISSAME)), pickle.dumps(([1, 2], [True]))])
def test_files_that_are_not_packs_are_errors(tmp_path, content):
    path = tmp_path / "broken.bin"
    path.write_bytes(content)
    with pytest.raises(BnportError) as err:
        read_bin_pack(path)
    assert str(path) in str(err.value)
