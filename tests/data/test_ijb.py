"""IJB-B/C release reading, alignment and template scoring, on a tiny release laid out like the real one in tmp_path
(real JPEG loose crops with drawn faces), against insightface's procedure (scikit-image + cv2 alignment, the
per-template loops of eval_ijbc.py re-implemented directly)."""
import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from bnport.data import ijb
from bnport.data.align import arcface_template
from bnport.data.ijb import IjbRelease, ijb_template_scores, read_ijb
from bnport.errors import BnportError
from tests.helpers.ijb import MEDIAS, PAIRS, TEMPLATES, insightface_scores, make_release, skimage_crop_rgb


@pytest.fixture
def release_dir(tmp_path):
    root = tmp_path / "IJBC"
    written = make_release(root)
    return root, written


# ---------------------------------------------------------------- reading


def test_read_ijb_parses_the_release(release_dir):
    root, written = release_dir
    release = read_ijb(root, "ijbc")
    assert release.kind == "ijbc" and release.root == root and len(release) == len(TEMPLATES)
    assert release.names == written["names"]
    assert release.landmarks.shape == (10, 5, 2) and release.landmarks.dtype == np.float32
    np.testing.assert_allclose(release.landmarks, written["landmarks"], atol=1e-4)
    np.testing.assert_allclose(release.faceness, written["faceness"], atol=1e-6)
    assert release.faceness.dtype == np.float32
    assert release.templates.dtype == np.int64 and release.templates.tolist() == TEMPLATES
    assert release.medias.dtype == np.int64 and release.medias.tolist() == MEDIAS
    assert release.pairs.dtype == np.int64 and release.pairs.tolist() == [[a, b] for a, b, _ in PAIRS]
    assert release.labels.dtype == bool and release.labels.tolist() == [bool(c) for _, _, c in PAIRS]


def test_read_ijbb_uses_its_prefix_and_kind_is_checked(tmp_path):
    make_release(tmp_path / "IJBB", kind="ijbb")
    assert len(read_ijb(tmp_path / "IJBB", "IJBB")) == len(TEMPLATES)
    with pytest.raises(BnportError, match="ijbc_face_tid_mid.txt"):
        read_ijb(tmp_path / "IJBB", "ijbc")
    with pytest.raises(BnportError, match="unknown IJB benchmark kind"):
        read_ijb(tmp_path / "IJBB", "ijba")


def test_blank_lines_crlf_and_extra_spaces_are_accepted(release_dir):
    root, _ = release_dir
    faces = root / "meta" / "ijbc_face_tid_mid.txt"
    faces.write_bytes(b"\n" + faces.read_bytes().replace(b"\n", b"  \r\n") + b"\n\n")
    pairs_file = root / "meta" / "ijbc_template_pair_label.txt"
    pairs_file.write_text("\n" + pairs_file.read_text().replace(" ", "\t") + "\n")
    release = read_ijb(root, "ijbc")
    assert release.templates.tolist() == TEMPLATES
    assert release.pairs.tolist() == [[a, b] for a, b, _ in PAIRS]


def test_pair_file_parsed_in_blocks(release_dir, monkeypatch):
    """The vectorised pair reader gives the same pairs, and names the right line, when the file spans many blocks."""
    root, _ = release_dir
    rng = np.random.default_rng(5)
    known = sorted(set(TEMPLATES))
    rows = [(int(rng.choice(known)), int(rng.choice(known)), int(rng.integers(0, 2))) for _ in range(300)]
    lines = [f"{a} {b} {c}" for a, b, c in rows]
    lines[100:100] = ["", "   "]  # blank lines shift line numbers against row numbers
    pairs_file = root / "meta" / "ijbc_template_pair_label.txt"
    pairs_file.write_text("\n".join(lines))  # no final newline
    monkeypatch.setattr(ijb, "_BLOCK_BYTES", 37)
    release = read_ijb(root, "ijbc")
    assert release.pairs.tolist() == [[a, b] for a, b, _ in rows]
    assert release.labels.tolist() == [bool(c) for _, _, c in rows]

    lines[250] = f"{known[0]} {known[1]} 1 7"
    pairs_file.write_text("\n".join(lines))
    with pytest.raises(BnportError, match=r"ijbc_template_pair_label.txt line 251: 4 fields"):
        read_ijb(root, "ijbc")
    lines[250] = f"{known[0]} x{known[1]} 1"
    pairs_file.write_text("\n".join(lines))
    with pytest.raises(BnportError, match=r"line 251: not three integers"):
        read_ijb(root, "ijbc")
    lines[250] = f"{known[0]} {known[1]} 1"
    lines[280] = f"{known[0]} 999 0"
    pairs_file.write_text("\n".join(lines))
    with pytest.raises(BnportError, match=r"line 281: template 999 has no images"):
        read_ijb(root, "ijbc")


def test_fingerprint_hashes_meta_files_not_images(release_dir):
    root, _ = release_dir
    first = read_ijb(root, "ijbc").fingerprint()
    assert first["count"] == 10 and first["templates"] == 5 and first["pairs"] == len(PAIRS)
    assert set(first["files"]) == set(ijb.meta_file_names("ijbc").values())
    assert len(first["sha256"]) == 64
    (root / "loose_crop" / "1.jpg").write_bytes(b"changed")  # images are not read for the fingerprint
    assert read_ijb(root, "ijbc").fingerprint() == first
    pairs_file = root / "meta" / "ijbc_template_pair_label.txt"
    pairs_file.write_text(pairs_file.read_text().replace("101 103 0", "101 103 1"))
    second = read_ijb(root, "ijbc").fingerprint()
    assert second["sha256"] != first["sha256"]
    assert second["files"]["ijbc_face_tid_mid.txt"] == first["files"]["ijbc_face_tid_mid.txt"]


# ---------------------------------------------------------------- alignment


@pytest.mark.parametrize("size", [(112, 112), (128, 128)])
def test_load_aligned_matches_insightface_alignment(release_dir, size):
    root, written = release_dir
    release = read_ijb(root, "ijbc")
    for i in (0, 3, 7):
        crop = release.load_aligned(i, size)
        expected = skimage_crop_rgb(root / "loose_crop" / written["names"][i], release.landmarks[i], size)
        assert crop.shape == (*size, 3) and crop.dtype == np.uint8
        diff = np.abs(crop.astype(np.int16) - expected.astype(np.int16))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    # the drawn face fills the crop: the dark eyes sit at the template's eye points
    crop = release.load_aligned(0, size).astype(np.float64).mean(axis=2)
    for x, y in arcface_template(size)[:2]:
        assert crop[int(round(y)), int(round(x))] < 80 < crop.mean()


def test_release_and_images_pickle_for_workers(release_dir):
    root, _ = release_dir
    release = read_ijb(root, "ijbc")
    clone = pickle.loads(pickle.dumps(release))
    images = pickle.loads(pickle.dumps(release.images))
    np.testing.assert_array_equal(clone.load_aligned(4, (112, 112)), release.load_aligned(4, (112, 112)))
    np.testing.assert_array_equal(images.load_aligned(4, (112, 112)), release.load_aligned(4, (112, 112)))
    assert len(images) == len(release) and images.describe(2) == release.describe(2)
    np.testing.assert_array_equal(clone.pairs, release.pairs)


def test_unreadable_images_are_named(release_dir):
    root, _ = release_dir
    release = read_ijb(root, "ijbc")
    (root / "loose_crop" / "2.jpg").unlink()
    with pytest.raises(BnportError, match=r"cannot read IJB image .*loose_crop/2\.jpg"):
        release.load_aligned(1, (112, 112))
    data = (root / "loose_crop" / "3.jpg").read_bytes()
    (root / "loose_crop" / "3.jpg").write_bytes(b"not a jpeg" + data[:50])
    with pytest.raises(BnportError, match=r"cannot decode IJB image .*3\.jpg"):
        release.load_aligned(2, (112, 112))
    (root / "loose_crop" / "4.jpg").write_bytes(b"")
    with pytest.raises(BnportError, match=r"cannot decode IJB image .*4\.jpg"):
        release.load_aligned(3, (112, 112))
    release.landmarks[4] = 50.0  # all five points coincide
    with pytest.raises(BnportError, match=r"cannot align IJB image .*5\.jpg.*coincide"):
        release.load_aligned(4, (112, 112))


# ---------------------------------------------------------------- bad releases


@pytest.mark.parametrize("role", ["faces", "landmarks", "pairs"])
def test_missing_meta_file(release_dir, role):
    root, _ = release_dir
    name = ijb.meta_file_names("ijbc")[role]
    (root / "meta" / name).unlink()
    with pytest.raises(BnportError, match=f"IJB meta file not found: .*{name}") as info:
        read_ijb(root, "ijbc")
    assert "meta/" in info.value.hint


def test_missing_folders(tmp_path, release_dir):
    with pytest.raises(BnportError, match="IJB folder not found"):
        read_ijb(tmp_path / "nowhere", "ijbc")
    root, _ = release_dir
    for image in (root / "loose_crop").iterdir():
        image.unlink()
    (root / "loose_crop").rmdir()
    with pytest.raises(BnportError, match="no loose_crop/ folder"):
        read_ijb(root, "ijbc")


@pytest.mark.parametrize("role", ["faces", "landmarks", "pairs"])
def test_empty_meta_file(release_dir, role):
    root, _ = release_dir
    name = ijb.meta_file_names("ijbc")[role]
    (root / "meta" / name).write_text("\n \n")
    with pytest.raises(BnportError, match=f"{name} is empty"):
        read_ijb(root, "ijbc")


def _replace_line(path, number: int, text: str) -> None:
    lines = path.read_text().split("\n")
    lines[number - 1] = text
    path.write_text("\n".join(lines))


@pytest.mark.parametrize("role, line, text, message", [
    ("faces", 4, "4.jpg 102", r"ijbc_face_tid_mid.txt line 4: 2 fields, expected 3"),
    ("faces", 6, "6.jpg 103 9 extra", r"ijbc_face_tid_mid.txt line 6: 4 fields, expected 3"),
    ("faces", 2, "2.jpg abc 5", r"ijbc_face_tid_mid.txt line 2: template id 'abc' is not an integer"),
    ("faces", 9, "9.jpg 104 5.5", r"ijbc_face_tid_mid.txt line 9: media id '5.5' is not an integer"),
    ("landmarks", 5, "5.jpg 1 2 3 4 5 6 7 8 9 10", r"ijbc_name_5pts_score.txt line 5: 11 fields, expected 12"),
    ("landmarks", 3, "3.jpg 1 2 3 4 5 x 7 8 9 10 0.9", r"ijbc_name_5pts_score.txt line 3: .* 'x' is not a finite"),
    ("landmarks", 7, "7.jpg 1 2 3 4 5 nan 7 8 9 10 0.9", r"ijbc_name_5pts_score.txt line 7: .* 'nan' is not a fin"),
    ("pairs", 2, "101 103", r"ijbc_template_pair_label.txt line 2: 2 fields, expected 3"),
    ("pairs", 3, "102 104.0 0", r"ijbc_template_pair_label.txt line 3: not three integers"),
    ("pairs", 5, "104 105 2", r"ijbc_template_pair_label.txt line 5: label 2 is not 0 or 1"),
    ("pairs", 1, "101 4242 1", r"ijbc_template_pair_label.txt line 1: template 4242 has no images"),
])
def test_malformed_lines_are_named(release_dir, role, line, text, message):
    root, _ = release_dir
    _replace_line(root / "meta" / ijb.meta_file_names("ijbc")[role], line, text)
    with pytest.raises(BnportError, match=message) as info:
        read_ijb(root, "ijbc")
    assert info.value.hint


def test_rows_that_do_not_line_up(release_dir):
    root, _ = release_dir
    points = root / "meta" / "ijbc_name_5pts_score.txt"
    original = points.read_text()
    lines = original.split("\n")
    lines[3], lines[4] = lines[4], lines[3]
    points.write_text("\n".join(lines))
    with pytest.raises(BnportError, match=r"row 4 names '4.jpg' in .*ijbc_face_tid_mid.txt \(line 4\) but '5.jpg' in "
                                          r".*ijbc_name_5pts_score.txt \(line 4\)") as info:
        read_ijb(root, "ijbc")
    assert "row by row" in info.value.hint
    points.write_text("\n".join(original.split("\n")[:-2]))  # the last row dropped
    with pytest.raises(BnportError, match=r"has 10 rows but .* has 9: .*ijbc_face_tid_mid.txt line 10 \('10.jpg'\)"):
        read_ijb(root, "ijbc")


# ---------------------------------------------------------------- template scores


def random_release(seed: int = 0, dim: int = 24, id_step: int = 1) -> tuple[IjbRelease, np.ndarray]:
    rng = np.random.default_rng(seed)
    templates, medias = [], []
    for template in rng.choice(np.arange(1, 500), size=40, replace=False) * id_step:
        for _ in range(int(rng.integers(1, 5))):
            media = int(rng.integers(1, 60))  # small range: the same media id recurs in other templates
            for _ in range(int(rng.integers(1, 6))):
                templates.append(int(template))
                medias.append(media)
    order = rng.permutation(len(templates))  # images of a template need not be contiguous
    templates, medias = np.array(templates)[order], np.array(medias)[order]
    unique = np.unique(templates)
    pairs = rng.choice(unique, size=(500, 2))
    pairs[:5, 1] = pairs[:5, 0]
    count = len(templates)
    release = IjbRelease(root=Path("IJBC"), kind="ijbc", names=[f"{k}.jpg" for k in range(count)],
                         landmarks=np.zeros((count, 5, 2), np.float32),
                         faceness=rng.uniform(0.1, 1.0, count).astype(np.float32), templates=templates,
                         medias=medias, pairs=pairs, labels=rng.integers(0, 2, len(pairs)).astype(bool))
    features = rng.normal(size=(count, dim)) * rng.uniform(0.2, 3.0, (count, 1))
    return release, features


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("faceness", [True, False])
@pytest.mark.parametrize("chunk", [1, 3, None])
def test_template_scores_equal_insightface_loops(norm, faceness, chunk):
    release, features = random_release()
    assert len(np.unique(release.medias)) < np.unique(np.stack([release.templates, release.medias]), axis=1).shape[1]
    got = ijb_template_scores(release, features, norm=norm, faceness=faceness, chunk=chunk)
    expected = insightface_scores(features, release.faceness.astype(np.float64), release.templates, release.medias,
                                  release.pairs, use_norm_score=norm, use_detector_score=faceness)
    assert got.dtype == np.float64 and got.shape == (len(release.pairs),)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got[:5], 1.0, atol=1e-12)  # a template against itself


@pytest.mark.parametrize("norm", [True, False])
def test_template_scores_from_float32_features_match_insightfaces_float32_run(norm):
    release, features = random_release(seed=1, dim=64)
    features = features.astype(np.float32)
    got = ijb_template_scores(release, features, norm=norm)
    expected = insightface_scores(features, release.faceness, release.templates, release.medias, release.pairs,
                                  use_norm_score=norm)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)


def test_template_scores_with_widely_spread_template_ids():
    """Template ids spanning more than a lookup table holds take the binary-search path; same scores."""
    release, features = random_release(seed=3, id_step=10_000_000)
    assert release.templates.max() - release.templates.min() > 1 << 24
    expected = insightface_scores(features, release.faceness.astype(np.float64), release.templates, release.medias,
                                  release.pairs)
    np.testing.assert_allclose(ijb_template_scores(release, features, chunk=4), expected, rtol=0, atol=1e-12)
    release.pairs[3, 1] = release.templates.max() + 1
    with pytest.raises(ValueError, match="no images"):
        ijb_template_scores(release, features)


def test_template_scores_by_hand():
    """Template 1: media 7 holds [1, 0] and [0, 1] (mean [.5, .5]), media 8 holds [1, 0]: sum [1.5, .5].
    Template 2: one image [0, 2]. Cosine = .5 / sqrt(2.5)."""
    release = IjbRelease(root=Path("IJBC"), kind="ijbc", names=["a", "b", "c", "d"], landmarks=np.zeros((4, 5, 2)),
                         faceness=np.array([1.0, 1.0, 1.0, 0.5]), templates=np.array([1, 1, 1, 2]),
                         medias=np.array([7, 7, 8, 7]), pairs=np.array([[1, 2], [2, 1]]),
                         labels=np.array([True, False]))
    features = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(ijb_template_scores(release, features, faceness=False), [0.5 / math.sqrt(2.5)] * 2)
    # faceness 0.5 on the lone image of template 2 does not change its direction; on template 1 it would
    release.faceness[:] = [0.5, 1.0, 1.0, 1.0]  # media 7 mean becomes [.25, .5]; sum [1.25, .5]
    np.testing.assert_allclose(ijb_template_scores(release, features), [0.5 / math.hypot(1.25, 0.5)] * 2)
    # normalising images first: [0, 2] -> [0, 1]; direction unchanged, so the same score
    np.testing.assert_allclose(ijb_template_scores(release, features, norm=False), [0.5 / math.hypot(1.25, 0.5)] * 2)


def test_template_scores_guard_bad_features():
    release, features = random_release(seed=2)
    features[7, 3] = np.nan
    features[9, 0] = np.inf
    with pytest.raises(BnportError, match=r"2 image features contain NaN or Inf, first IJBC/loose_crop/7\.jpg"):
        ijb_template_scores(release, features)
    with pytest.raises(ValueError, match="shape"):
        ijb_template_scores(release, features[:-1])
    # a zero feature with norm=False counts as nothing (insightface would divide by zero): the scores equal those
    # of the release without that image, when it is alone in its media and its template has other images
    same_media = (release.templates[:, None] == release.templates) & (release.medias[:, None] == release.medias)
    template_size = (release.templates[:, None] == release.templates).sum(axis=1)
    k = int(np.flatnonzero((same_media.sum(axis=1) == 1) & (template_size > 1))[0])
    features[[7, 9]] = 1.0
    features[k] = 0.0
    got = ijb_template_scores(release, features, norm=False)
    keep = np.arange(len(features)) != k
    trimmed = IjbRelease(root=Path("IJBC"), kind="ijbc", names=[n for n, kept in zip(release.names, keep) if kept],
                         landmarks=release.landmarks[keep], faceness=release.faceness[keep],
                         templates=release.templates[keep], medias=release.medias[keep], pairs=release.pairs,
                         labels=release.labels)
    np.testing.assert_allclose(got, ijb_template_scores(trimmed, features[keep], norm=False), rtol=0, atol=1e-12)
