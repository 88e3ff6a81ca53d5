"""The embedding cache (bnport.score.embeddings): scoring a file again from another folder runs no inference (no
session is even started) and gives the same scores; an entry appears whole or not at all."""
from __future__ import annotations

import json

import numpy as np

from bnport.score import ScoreSettings, score
from bnport.score.embeddings import EmbeddingCache
from tests.helpers.benchdata import write_bin_pack


def _file(tmp_path):
    from bnport.export import ExportSettings, export_onnx
    from bnport.model.arch import create_model
    from tests.helpers.models import realistic_bn

    path = tmp_path / "m.onnx"
    assert export_onnx(realistic_bn(create_model("iresnet_tiny")), path, ExportSettings(exporter="torchscript"),
                       device="cpu")
    return path


def test_a_second_folder_reuses_the_embeddings_without_a_session(tmp_path):
    model = _file(tmp_path)
    write_bin_pack(tmp_path / "lfw.bin", 16)
    settings = ScoreSettings.of([str(tmp_path / "lfw.bin")], fprs="1e-1", cache_dir=tmp_path / "cache")
    first = score([str(model)], settings, out=tmp_path / "a", device="cpu", progress=False, log=lambda m: None)
    assert first.table.session_settings["sessions"] == 1
    (entry,) = (tmp_path / "cache" / "embeddings").glob("*.npy")
    info = json.loads(entry.with_suffix(".json").read_text())
    assert info["onnx_sha256"] == first.candidates[0].sha256 and info["flip"] is True
    assert np.load(entry).shape == (32, 32)  # 16 pairs of images, 32-d embeddings
    second = score([str(model)], settings, out=tmp_path / "b", device="cpu", progress=False, log=lambda m: None)
    assert second.table.session_settings == {}, "no inference: every feature came from the embedding cache"
    np.testing.assert_array_equal(np.load(second.table.results[0].scores_file),
                                  np.load(first.table.results[0].scores_file))


def test_an_entry_is_whole_or_absent(tmp_path):
    cache = EmbeddingCache(tmp_path)
    key = cache.key("ab" * 32, "images", True)
    writer = cache.writer("lfw", key)
    writer.allocate(4, 3)[:] = 1.0
    assert cache.load("lfw", key, 4) is None, "not committed: not there"
    writer.discard()
    assert not any((tmp_path / "embeddings").iterdir())
    writer = cache.writer("lfw", key)
    writer.allocate(4, 3)[:] = 2.0
    writer.commit({"model": "m"})
    np.testing.assert_array_equal(cache.load("lfw", key, 4), np.full((4, 3), 2.0, np.float32))
    assert cache.load("lfw", key, 5) is None  # another image count: another benchmark
    assert cache.key("ab" * 32, "images", False) != key
