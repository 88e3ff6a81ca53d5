"""Image folder and list-file readers on real PNG/JPEG/BMP/WebP files, corrupt ones among them."""
import hashlib
import io
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from bnport.data import ImageFilesDataset, collate_images, decode_image, open_images
from bnport.data.transforms import InputSpec
from bnport.errors import BnportError

H, W = 6, 5
SPEC = InputSpec(height=H, width=W)
GOOD = ["a/b/deep.jpg", "a/upper.PNG", "c.BMP", "d.webp", "gray.png", "rgba.png"]
BAD = ["bad/empty.jpg", "bad/random.jpg", "bad/truncated.JPEG"]


def pixels(seed: int, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(H, W, channels), dtype=np.uint8)


def encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "images"
    files = {
        "a/b/deep.jpg": encode(pixels(1), "JPEG", quality=95),
        "a/upper.PNG": encode(pixels(2), "PNG"),
        "c.BMP": encode(pixels(3), "BMP"),
        "d.webp": encode(pixels(4), "WEBP", lossless=True),
        "gray.png": encode(pixels(5, 1)[:, :, 0], "PNG"),
        "rgba.png": encode(pixels(6, 4), "PNG"),
        "bad/empty.jpg": b"",
        "bad/random.jpg": np.random.default_rng(7).integers(0, 256, 500, dtype=np.uint8).tobytes(),
        "bad/truncated.JPEG": encode(pixels(8), "JPEG")[:200],
        "notes.txt": b"not an image",
        "._resource_fork.jpg": b"macOS metadata",
        ".cache/hidden.png": encode(pixels(9), "PNG"),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def reference(path) -> np.ndarray:
    """(x - 127.5) / 127.5 in float64 of the pixels PIL reads, as 3 x H x W."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    return ((rgb - 127.5) / 127.5).transpose(2, 0, 1)


def test_folder_lists_images_recursively_case_insensitive(tree):
    ds = open_images(tree, SPEC)
    assert isinstance(ds, ImageFilesDataset) and ds.kind == "folder"
    assert ds.names == sorted(GOOD + BAD)
    assert ds.describe(0) == str(tree / sorted(GOOD + BAD)[0])


def test_pixels_equal_the_normalised_pil_pixels(tree):
    ds = open_images(tree, SPEC)
    for i, name in enumerate(ds.names):
        if name in GOOD:
            tensor, index = ds[i]
            assert index == i and tensor.dtype == torch.float32
            np.testing.assert_allclose(tensor.numpy(), reference(tree / name), atol=1e-6)


def test_grayscale_and_rgba_become_rgb(tree):
    gray = decode_image((tree / "gray.png").read_bytes())
    assert gray.shape == (H, W, 3) and gray.dtype == np.uint8
    np.testing.assert_array_equal(gray[:, :, 0], pixels(5, 1)[:, :, 0])
    np.testing.assert_array_equal(gray[:, :, 2], gray[:, :, 0])
    np.testing.assert_array_equal(decode_image((tree / "rgba.png").read_bytes()), pixels(6, 4)[:, :, :3])


def test_corrupt_files_are_skipped_and_counted(tree):
    ds = open_images(tree, SPEC)
    images, indices, skipped = collate_images([ds[i] for i in range(len(ds))])
    assert images.shape == (len(GOOD), 3, H, W)
    assert [ds.names[i] for i in indices.tolist()] == sorted(GOOD)
    assert sorted(ds.names[i] for i in skipped) == sorted(BAD)
    for name in BAD:
        with pytest.raises(ValueError):
            decode_image((tree / name).read_bytes())


def test_a_batch_with_no_readable_image_is_empty(tree):
    ds = open_images(tree, SPEC)
    bad = [ds.names.index(name) for name in BAD]
    images, indices, skipped = collate_images([ds[i] for i in bad])
    assert images.numel() == 0 and indices.dtype == torch.long and indices.numel() == 0 and skipped == bad


def test_strict_names_the_corrupt_file(tree):
    ds = open_images(tree, SPEC, strict=True)
    i = ds.names.index("bad/truncated.JPEG")
    with pytest.raises(BnportError, match="strict-data") as err:
        ds[i]
    assert str(tree / "bad/truncated.JPEG") in str(err.value)
    lenient = open_images(tree, SPEC)
    with pytest.raises(BnportError, match="random.jpg"):
        lenient.load_uint8(lenient.names.index("bad/random.jpg"))


def test_load_uint8_resizes_to_the_spec(tree):
    ds = open_images(tree, InputSpec(height=8, width=7))
    image = ds.load_uint8(ds.names.index("c.BMP"))
    assert image.shape == (8, 7, 3) and image.dtype == np.uint8
    assert ds[0][0].shape == (3, 8, 7)


def test_fingerprint_covers_the_listing_not_each_file(tree):
    first = open_images(tree, SPEC).fingerprint()
    assert first["kind"] == "folder" and first["count"] == len(GOOD) + len(BAD)
    assert first["path"] == str(tree.resolve())
    listing = "".join(f"{name}\n" for name in sorted(GOOD + BAD))
    assert first["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert "directory listing" in first["covers"] and "not the files' sizes or contents" in first["covers"]
    assert open_images(tree, SPEC).fingerprint() == first
    # no stat per image: a file's content is not part of it (millions of stats take minutes on network storage)
    (tree / "c.BMP").write_bytes((tree / "c.BMP").read_bytes() + b"\0")
    assert open_images(tree, SPEC).fingerprint() == first
    (tree / "c.BMP").rename(tree / "e.bmp")
    assert open_images(tree, SPEC).fingerprint()["sha256"] != first["sha256"]


def test_symlink_loop_does_not_recurse_forever(tree):
    os.symlink(tree, tree / "a" / "loop")
    assert len(open_images(tree, SPEC)) == len(GOOD) + len(BAD)


def test_list_file_with_relative_absolute_and_im2rec_lines(tree):
    listing = tree / "lists" / "calib.lst"
    listing.parent.mkdir()
    listing.write_text("# calibration subset\n\n../a/upper.PNG\n"
                       f"{tree / 'd.webp'}\n"
                       "7\t3.000000\t../a/b/deep.jpg\n"
                       "../missing.png\n")
    ds = open_images(listing, SPEC)
    assert ds.kind == "list" and len(ds) == 4
    assert ds.describe(1) == str(tree / "d.webp")
    for i, name in enumerate(["a/upper.PNG", "d.webp", "a/b/deep.jpg"]):
        np.testing.assert_allclose(ds[i][0].numpy(), reference(tree / name), atol=1e-6)
    assert ds[3] == (None, 3)
    with pytest.raises(BnportError, match="missing.png"):
        open_images(listing, SPEC, strict=True)[3]
    fp = open_images(listing, SPEC).fingerprint()
    assert fp["count"] == 4 and fp["sha256"] == hashlib.sha256(listing.read_bytes()).hexdigest()
    assert "list file" in fp["covers"]


@pytest.mark.parametrize("case", ["missing", "empty_folder", "unknown_suffix", "empty_list"])
def test_bad_data_paths_name_the_path(tmp_path, case):
    path = {"missing": tmp_path / "nope", "empty_folder": tmp_path / "empty", "unknown_suffix": tmp_path / "x.csv",
            "empty_list": tmp_path / "calib.txt"}[case]
    if case == "empty_folder":
        path.mkdir()
        (path / "readme.md").write_text("no images here")
    elif case == "unknown_suffix":
        path.write_text("a,b\n")
    elif case == "empty_list":
        path.write_text("# nothing\n\n")
    with pytest.raises(BnportError) as err:
        open_images(path, SPEC)
    assert str(path) in str(err.value)
    if case == "missing":
        assert "data path not found" in str(err.value)
    if case == "unknown_suffix":
        assert "train.rec" in str(err.value) and ".bin" in str(err.value)


def test_dataloader_workers_skip_corrupt_images(tree):
    ds = open_images(tree, SPEC)
    ds = pickle.loads(pickle.dumps(ds))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_images)
    good, skipped = [], []
    for images, indices, bad in loader:
        if images.numel():
            assert images.shape[0] == len(indices)
            for image, i in zip(images, indices.tolist()):
                assert torch.equal(image, ds[i][0])
        good += indices.tolist()
        skipped += bad
    assert sorted(ds.names[i] for i in good) == sorted(GOOD)
    assert sorted(ds.names[i] for i in skipped) == sorted(BAD)
