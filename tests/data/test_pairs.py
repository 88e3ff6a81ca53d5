"""pairs:FILE.csv and folder:DIR benchmarks on real image files in tmp_path."""
import hashlib
import itertools

import cv2
import numpy as np
import pytest

from bnport.data.pairs import PairList, folder_pairs, read_pairs_csv
from bnport.errors import BnportError


def write_image(path, seed: int, h: int = 60, w: int = 50) -> np.ndarray:
    """Write a random colour image (PNG: lossless, so the decoded pixels are known) and return it as RGB."""
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return rgb


@pytest.fixture
def csv_bench(tmp_path):
    root = tmp_path / "bench"
    pixels = {}
    for k, name in enumerate(["a/1.png", "a/2.png", "b/1.png", "c/x.png"]):
        pixels[name] = write_image(root / name, k)
    outside = tmp_path / "elsewhere" / "abs.png"
    pixels["abs"] = write_image(outside, 9)
    text = ("path_a,path_b,label\n"
            "a/1.png,a/2.png,1\n"
            "\n"
            "a/1.png, b/1.png ,0\n"
            f"./b/1.png,{outside},FALSE\n"
            "c/x.png,a/2.png,True\n"
            "   \n")
    (root / "pairs.csv").write_text(text)
    return root, pixels, outside


def test_read_pairs_csv(csv_bench):
    root, pixels, outside = csv_bench
    bench = read_pairs_csv(root / "pairs.csv")
    assert isinstance(bench, PairList) and bench.kind == "pairs" and bench.root == root
    assert bench.images == ["a/1.png", "a/2.png", "b/1.png", str(outside), "c/x.png"]
    assert bench.pairs.dtype == np.int64 and bench.pairs.tolist() == [[0, 1], [0, 2], [2, 3], [4, 1]]
    assert bench.labels.dtype == bool and bench.labels.tolist() == [True, False, False, True]
    assert len(bench) == 5 and bench.file(3) == outside
    np.testing.assert_array_equal(bench.load(0, (60, 50)), pixels["a/1.png"])
    np.testing.assert_array_equal(bench.load(3, (60, 50)), pixels["abs"])
    fingerprint = bench.fingerprint()
    assert fingerprint["sha256"] == hashlib.sha256((root / "pairs.csv").read_bytes()).hexdigest()
    assert fingerprint["count"] == 5 and fingerprint["pairs"] == 4 and fingerprint["kind"] == "pairs"


def test_csv_without_header_and_with_quoted_comma(tmp_path):
    write_image(tmp_path / "x, y.png", 1)
    write_image(tmp_path / "z.png", 2)
    (tmp_path / "p.csv").write_text('"x, y.png",z.png,1\nz.png,"x, y.png",0\n')
    bench = read_pairs_csv(tmp_path / "p.csv")
    assert bench.images == ["x, y.png", "z.png"] and bench.pairs.tolist() == [[0, 1], [1, 0]]


def test_load_resizes_with_cv2_inter_linear(csv_bench):
    root, pixels, _ = csv_bench
    bench = read_pairs_csv(root / "pairs.csv")
    out = bench.load(4, (112, 96))
    assert out.shape == (112, 96, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, cv2.resize(pixels["c/x.png"], (96, 112), interpolation=cv2.INTER_LINEAR))


def test_load_names_corrupt_and_missing_images(csv_bench):
    root, _, _ = csv_bench
    bench = read_pairs_csv(root / "pairs.csv")
    (root / "a" / "2.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(BnportError, match=r"cannot decode benchmark image .*a/2\.png") as info:
        bench.load(1, (112, 112))
    assert "pairs.csv" in info.value.hint
    (root / "b" / "1.png").unlink()
    with pytest.raises(BnportError, match=r"cannot read benchmark image .*b/1\.png"):
        bench.load(2, (112, 112))


@pytest.mark.parametrize("text, message", [
    ("a/1.png,a/2.png,1\na/1.png,b/1.png\n", r"pairs.csv line 2: 2 fields, expected 3"),
    ("a/1.png,a/2.png,1,extra\n", r"pairs.csv line 1: 4 fields, expected 3"),
    ("a/1.png,a/2.png,1\n\na/1.png,b/1.png,yes\n", r"pairs.csv line 3: label 'yes' is not 1/0 or true/false"),
    ("a/1.png,a/2.png,1\na/1.png,,0\n", r"pairs.csv line 2: an empty image path"),
    ("a/1.png,a/2.png,1\na/1.png,b/9.png,0\n", r"pairs.csv line 2: image not found: .*b/9\.png"),
    ("path_a,path_b,label\n\n", r"pairs.csv holds no pairs"),
    ("a/1.png,a/2.png,1\nb/1.png,a/2.png,1\n", r"no impostor pairs"),
    ("a/1.png,b/1.png,0\n", r"no genuine pairs"),
    ("a/1.png,a/2.png,1\npath_a,path_b,label\n", r"pairs.csv line 2: label 'label' is not"),  # header only first
])
def test_csv_errors_name_file_and_line(csv_bench, text, message):
    root, _, _ = csv_bench
    (root / "pairs.csv").write_text(text)
    with pytest.raises(BnportError, match=message) as info:
        read_pairs_csv(root / "pairs.csv")
    assert info.value.hint


def test_csv_missing_or_binary_file(tmp_path):
    with pytest.raises(BnportError, match="pairs file not found"):
        read_pairs_csv(tmp_path / "none.csv")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BnportError, match="not a UTF-8 text file"):
        read_pairs_csv(tmp_path / "bin.csv")


@pytest.fixture
def identity_folder(tmp_path):
    root = tmp_path / "ids"
    layout = {"alice": ["1.jpg", "2.PNG", "sub/3.bmp"], "bob": ["1.webp", "2.jpeg"], "carol": ["only.png"]}
    seed = 0
    for person, names in layout.items():
        for name in names:
            seed += 1
            path = root / person / name
            if path.suffix.lower() == ".webp":
                path.parent.mkdir(parents=True, exist_ok=True)
                rgb = np.random.default_rng(seed).integers(0, 256, (60, 50, 3), dtype=np.uint8)
                assert cv2.imwrite(str(path), rgb, [cv2.IMWRITE_WEBP_QUALITY, 101])
            else:
                write_image(path, seed)
    (root / "alice" / "notes.txt").write_text("not an image")
    (root / "alice" / "._1.jpg").write_bytes(b"resource fork")
    (root / ".hidden").mkdir()
    write_image(root / ".hidden" / "x.png", 99)
    (root / "empty_person").mkdir()
    return root


def test_folder_pairs_all_pairs_labelled_by_folder(identity_folder):
    bench = folder_pairs(identity_folder)
    assert bench.kind == "folder" and bench.root == identity_folder
    assert bench.images == ["alice/1.jpg", "alice/2.PNG", "alice/sub/3.bmp", "bob/1.webp", "bob/2.jpeg",
                            "carol/only.png"]
    expected = list(itertools.combinations(range(6), 2))
    assert bench.pairs.dtype == np.int64 and bench.pairs.tolist() == [list(p) for p in expected]
    person = [name.split("/")[0] for name in bench.images]
    assert bench.labels.tolist() == [person[i] == person[j] for i, j in expected]
    assert bench.labels.sum() == 3 + 1
    for i in range(len(bench)):
        image = bench.load(i, (32, 32))
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    fingerprint = bench.fingerprint()
    assert fingerprint["count"] == 6 and fingerprint["pairs"] == 15
    write_image(identity_folder / "carol" / "only.png", 5, h=61)  # a changed file changes the fingerprint
    assert folder_pairs(identity_folder).fingerprint()["sha256"] != fingerprint["sha256"]


def test_folder_pairs_refusals(tmp_path, identity_folder):
    with pytest.raises(BnportError, match="more than the limit of 10"):
        folder_pairs(identity_folder, max_pairs=10)
    assert len(folder_pairs(identity_folder, max_pairs=15).pairs) == 15
    with pytest.raises(BnportError, match="benchmark folder not found"):
        folder_pairs(tmp_path / "missing")
    one = tmp_path / "one"
    write_image(one / "alice" / "1.png", 1)
    write_image(one / "alice" / "2.png", 2)
    with pytest.raises(BnportError, match="only one identity"):
        folder_pairs(one)
    singles = tmp_path / "singles"
    write_image(singles / "alice" / "1.png", 1)
    write_image(singles / "bob" / "1.png", 2)
    with pytest.raises(BnportError, match="no genuine pairs"):
        folder_pairs(singles)
    empty = tmp_path / "empty"
    (empty / "alice").mkdir(parents=True)
    (empty / "alice" / "readme.txt").write_text("x")
    with pytest.raises(BnportError, match="no images found"):
        folder_pairs(empty)
    write_image(identity_folder / "stray.jpg", 3)
    with pytest.raises(BnportError, match=r"image .*stray\.jpg lies directly in the benchmark folder"):
        folder_pairs(identity_folder)
