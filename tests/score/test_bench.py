"""Tests for bnport.score.bench on real benchmark files written in tmp_path: what `parse_bench` makes of each --bench
SPEC (kind, name, the flip/norm/faceness switches, one-line errors for unknown kinds and options and for missing
files), `parse_benches` making names unique and refusing a benchmark with one class of pairs, the images a benchmark
hands out (OpenCV's decode, RGB), and the pair scores it computes from given features, which must equal a direct
numpy cosine per pair (insightface's .bin pair order; a pairs.csv read here with the csv module)."""
from __future__ import annotations

import csv
import pickle

import cv2
import numpy as np
import pytest

from bnport.errors import BnportError
from bnport.score.bench import BinBenchmark, IjbBenchmark, PairListBenchmark, parse_bench, parse_benches
from bnport.score.metrics import compute_verification_accuracy
from tests.helpers.benchdata import encode, identity_image, write_bin_pack, write_pairs_csv
from tests.helpers.ijb import make_release


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 12-pair .bin pack, a 10-pair pairs.csv over PNG files, a folder benchmark and a tiny IJB-C release."""
    root = tmp_path_factory.mktemp("bench")
    write_bin_pack(root / "lfw.bin", 12, size=(24, 20))
    write_pairs_csv(root / "pairs", 10, size=(24, 20))
    for identity in range(3):
        for variant in range(2):
            path = root / "people" / f"id{identity}" / f"{variant}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), identity_image(identity, variant, size=(24, 20)))
    make_release(root / "IJBC")
    return root


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row pair, computed directly."""
    return np.array([float(x @ y) / (np.linalg.norm(x) * np.linalg.norm(y)) for x, y in zip(a, b)])


def test_each_kind_of_spec_gives_its_benchmark_with_its_switches(files):
    bench = parse_bench(str(files / "lfw.bin"))
    assert isinstance(bench, BinBenchmark) and bench.kind == "bin" and bench.name == "lfw"
    assert bench.flip and bench.settings() == {"flip": True} and len(bench) == 24 and bench.n_pairs == 12
    assert not parse_bench(f"{files / 'lfw.bin'},flip=off").flip
    assert parse_bench(f" {files / 'lfw.bin'},FLIP=No ").settings() == {"flip": False}
    pairs = parse_bench(f"pairs:{files / 'pairs' / 'pairs.csv'},flip=0")
    assert isinstance(pairs, PairListBenchmark) and pairs.kind == "pairs" and pairs.name == "pairs"
    assert pairs.settings() == {"flip": False} and pairs.n_pairs == 10
    folder = parse_bench(f"folder:{files / 'people'}")
    assert folder.kind == "folder" and folder.name == "people" and len(folder) == 6
    assert folder.n_pairs == 15 and int(folder.labels().sum()) == 3  # every pair of 6 images; 3 of them genuine
    ijb = parse_bench(f"ijbc:{files / 'IJBC'},norm=off,faceness=false")
    assert isinstance(ijb, IjbBenchmark) and ijb.kind == "ijbc" and ijb.name == "IJBC"
    assert ijb.settings() == {"flip": True, "norm": False, "faceness": False}
    described = ijb.to_dict()
    assert described["kind"] == "ijbc" and described["pairs"] == ijb.n_pairs and described["images"] == len(ijb)


@pytest.mark.parametrize("spec, message", [
    ("{root}/missing.bin", "benchmark not found: {root}/missing.bin"),
    ("pairs:{root}/missing.csv", "benchmark not found: {root}/missing.csv"),
    ("lfw:{root}/lfw.bin", "unknown benchmark kind 'lfw'"),
    ("{root}/pairs/pairs.csv", "cannot tell what kind of benchmark"),
    ("{root}/lfw.bin,flip", "bad option 'flip'"),
    ("{root}/lfw.bin,flip=sometimes", "bad option 'flip=sometimes'"),
    ("{root}/lfw.bin,norm=off", "unknown option 'norm'"),
    ("pairs:{root}/pairs/pairs.csv,faceness=off", "unknown option 'faceness'"),
    ("ijbc:{root}/IJBC,align=off", "unknown option 'align'"),
    ("ijbc:{root}/lfw.bin", "is not a folder"),
    ("folder:{root}/lfw.bin", "is not a folder"),
])
def test_bad_specs_are_one_line_errors(files, spec, message):
    with pytest.raises(BnportError) as info:
        parse_bench(spec.format(root=files))
    assert message.format(root=files) in str(info.value) and "\n" not in info.value.args[0]


def test_parse_benches_makes_names_unique_and_refuses_one_class_of_pairs(files, tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    write_bin_pack(tmp_path / "b" / "lfw.bin", 4, size=(24, 20))
    write_bin_pack(tmp_path / "c" / "lfw.bin", 4, size=(24, 20))
    benches = parse_benches([str(files / "lfw.bin"), str(tmp_path / "b" / "lfw.bin"), f"{tmp_path / 'c' / 'lfw.bin'}",
                             f"pairs:{files / 'pairs' / 'pairs.csv'}"])
    assert [b.name for b in benches] == ["lfw", "lfw-2", "lfw-3", "pairs"]
    assert [b.path for b in benches[:3]] == [files / "lfw.bin", tmp_path / "b" / "lfw.bin", tmp_path / "c" / "lfw.bin"]
    with pytest.raises(BnportError, match="no benchmark given"):
        parse_benches([])
    images = [encode(identity_image(0, k, size=(24, 20))) for k in range(6)]
    with open(tmp_path / "same.bin", "wb") as f:
        pickle.dump((images, [True, True, True]), f)
    with pytest.raises(BnportError, match=r"same.bin cannot be scored: 6 images, 3 genuine and 0 impostor pairs"):
        parse_benches([str(tmp_path / "same.bin")])


def test_bin_images_are_the_packs_bytes_decoded_by_opencv(files):
    bench = parse_bench(str(files / "lfw.bin"))
    bins, _ = pickle.loads((files / "lfw.bin").read_bytes())
    for i in (0, 7, 23):
        direct = cv2.cvtColor(cv2.imdecode(np.frombuffer(bins[i], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(bench.load(i, (24, 20)), direct)
        assert bench.describe(i) == f"{files / 'lfw.bin'}#{i}"
    resized = bench.load(3, (12, 10))
    assert resized.shape == (12, 10, 3) and resized.dtype == np.uint8
    loader = bench.loader(10, 14)  # what a decode worker gets: global indices, the same pixels
    np.testing.assert_array_equal(loader.load(12, (24, 20)), bench.load(12, (24, 20)))
    assert loader.describe(12) == bench.describe(12)


def test_bin_pair_scores_equal_a_direct_cosine_of_images_2k_and_2k_plus_1(files, tmp_path):
    bench = parse_bench(str(files / "lfw.bin"))
    _, issame = pickle.loads((files / "lfw.bin").read_bytes())
    features = np.random.default_rng(0).normal(size=(len(bench), 7)).astype(np.float32)
    result = bench.score_pairs(features)
    assert result.scores.dtype == np.float64 and result.scores.shape == (12,)
    np.testing.assert_allclose(result.scores, _cosines(features[0::2].astype(np.float64),
                                                       features[1::2].astype(np.float64)), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(result.labels, np.asarray(issame, dtype=bool))
    np.testing.assert_array_equal(bench.labels(), np.asarray(issame, dtype=bool))
    accuracy = result.extra["accuracy"]  # 12 pairs: enough for insightface's 10 folds, on the raw features
    direct = compute_verification_accuracy(features[0::2].astype(np.float64), features[1::2].astype(np.float64),
                                           np.asarray(issame))
    assert accuracy.n_pairs == 12 and accuracy.n_folds == 10 and 0 <= accuracy.accuracy <= 1
    assert accuracy.fold_accuracies == pytest.approx(direct.fold_accuracies)
    scaled = bench.score_pairs(features * np.arange(1, 25, dtype=np.float32)[:, None])  # cosine ignores each norm
    np.testing.assert_allclose(scaled.scores, result.scores, atol=1e-6)
    write_bin_pack(tmp_path / "small.bin", 4, size=(24, 20))
    small = parse_bench(str(tmp_path / "small.bin"))
    assert "accuracy" not in small.score_pairs(np.ones((8, 3)) + np.eye(8, 3)).extra  # 4 pairs: no 10 folds


def test_pairs_csv_scores_equal_a_direct_cosine_of_the_named_files(files):
    csv_path = files / "pairs" / "pairs.csv"
    bench = parse_bench(f"pairs:{csv_path}")
    rng = np.random.default_rng(1)
    by_file = {bench.describe(i): rng.normal(size=5) for i in range(len(bench))}  # a feature per image file
    features = np.stack([by_file[bench.describe(i)] for i in range(len(bench))])
    result = bench.score_pairs(features)
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert len(rows) == bench.n_pairs == len(result.scores)
    folder = csv_path.parent
    expected = _cosines(np.stack([by_file[str(folder / a)] for a, _, _ in rows]),
                        np.stack([by_file[str(folder / b)] for _, b, _ in rows]))
    np.testing.assert_allclose(result.scores, expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(result.labels, [label == "1" for _, _, label in rows])
    first = rows[0][0]
    direct = cv2.cvtColor(cv2.imread(str(folder / first)), cv2.COLOR_BGR2RGB)
    index = next(i for i in range(len(bench)) if bench.describe(i) == str(folder / first))
    np.testing.assert_array_equal(bench.load(index, (24, 20)), direct)
