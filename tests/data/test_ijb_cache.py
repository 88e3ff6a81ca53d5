"""Tests for bnport.data.ijb_cache: a parsed IJB release kept on disk equals a fresh read of the release (arrays,
dtypes, names, 1:N protocol, fingerprint), is used while the meta files are unchanged, is read again when one
changes, and is rebuilt when damaged; the score benchmark keeps it in its cache folder."""
from __future__ import annotations

import os

import numpy as np
import pytest

import bnport.data.ijb_cache as ijb_cache
from bnport.data.ijb import read_ijb
from bnport.data.ijb_cache import read_ijb_cached
from tests.helpers.ijb import make_release, write_identification


@pytest.fixture
def release(tmp_path):
    root = tmp_path / "IJBC"
    make_release(root)
    return root


def _assert_same(a, b) -> None:
    assert a.names == b.names and a.kind == b.kind and a.root == b.root
    for name in ("landmarks", "faceness", "templates", "medias", "pairs", "labels"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.meta_sha256 == b.meta_sha256 and a.fingerprint() == b.fingerprint()
    assert (a.identification is None) == (b.identification is None)
    if a.identification is not None:
        assert list(a.identification.galleries) == list(b.identification.galleries)
        assert a.identification.sha256 == b.identification.sha256
        for name in a.identification.galleries:
            for field in ("templates", "subjects"):
                np.testing.assert_array_equal(getattr(a.identification.galleries[name], field),
                                              getattr(b.identification.galleries[name], field))
        np.testing.assert_array_equal(a.identification.probes.subjects, b.identification.probes.subjects)


@pytest.mark.parametrize("one_to_n", [False, True], ids=["1:1", "1:1 and 1:N"])
def test_the_kept_release_equals_a_fresh_read_and_is_used_while_nothing_changed(release, tmp_path, monkeypatch,
                                                                                 one_to_n):
    if one_to_n:
        write_identification(release)
    folder = tmp_path / "cache"
    first = read_ijb_cached(release, "ijbc", folder)
    assert len(list(folder.glob("ijbc-*.npz"))) == 1
    _assert_same(first, read_ijb(release, "ijbc"))

    def no_reading(*args, **kwargs):
        raise AssertionError("the release was read again")

    monkeypatch.setattr(ijb_cache, "read_ijb", no_reading)
    _assert_same(read_ijb_cached(release, "ijbc", folder), read_ijb(release, "ijbc"))


def test_a_changed_meta_file_is_read_again(release, tmp_path):
    folder = tmp_path / "cache"
    before = read_ijb_cached(release, "ijbc", folder)
    pairs = release / "meta" / "ijbc_template_pair_label.txt"
    lines = pairs.read_text().splitlines()
    pairs.write_text("\n".join(lines[:-1]) + "\n")  # one pair fewer
    stat = pairs.stat()
    os.utime(pairs, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = read_ijb_cached(release, "ijbc", folder)
    assert len(after.pairs) == len(before.pairs) - 1
    _assert_same(after, read_ijb(release, "ijbc"))
    write_identification(release)  # an added 1:N file counts as a change too
    assert read_ijb_cached(release, "ijbc", folder).identification is not None


def test_a_damaged_cache_file_is_rebuilt(release, tmp_path):
    folder = tmp_path / "cache"
    read_ijb_cached(release, "ijbc", folder)
    kept = next(folder.glob("ijbc-*.npz"))
    kept.write_bytes(kept.read_bytes()[:100])
    _assert_same(read_ijb_cached(release, "ijbc", folder), read_ijb(release, "ijbc"))
    assert kept.stat().st_size > 100  # written again, whole
    assert read_ijb_cached(release, "ijbc", None).names == read_ijb(release, "ijbc").names  # None: no cache


def test_the_ijb_benchmark_keeps_its_release_in_the_score_cache(release, tmp_path):
    from bnport.score.bench import parse_bench
    from bnport.score.settings import ScoreSettings

    settings = ScoreSettings.of([f"ijbc:{release}"], cache_dir=tmp_path / "cache").with_benchmarks()
    assert len(list((tmp_path / "cache" / "ijb-releases").glob("ijbc-*.npz"))) == 1
    assert settings.benches[0].fingerprint() == parse_bench(f"ijbc:{release}").fingerprint()
