"""Tests for the decode-once cache and the embedding runner: the cache is reused, worker processes write what one
process writes, a bad image leaves nothing behind, and preprocessing equals InputSpec.to_tensor."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import bnport.score.cache as cache_module
from bnport.data.transforms import InputSpec
from bnport.errors import BnportError
from bnport.score.bench import parse_bench
from bnport.score.cache import decoded_images
from bnport.score.embed import to_network_input
from tests.helpers.benchdata import encode, identity_image, write_bin_pack


def test_decode_once_then_reuse(tmp_path):
    write_bin_pack(tmp_path / "lfw.bin", 6)
    bench = parse_bench(str(tmp_path / "lfw.bin"))
    first = decoded_images(bench, (112, 112), cache_dir=tmp_path / "c", workers=0, progress=False)
    assert not first.reused and first.images.shape == (12, 112, 112, 3) and first.images.dtype == np.uint8
    assert isinstance(first.images, np.memmap)
    expected = np.stack([bench.load(i, (112, 112)) for i in range(12)])
    np.testing.assert_array_equal(first.images, expected)
    second = decoded_images(bench, (112, 112), cache_dir=tmp_path / "c", workers=0, progress=False)
    assert second.reused and second.folder == first.folder
    other = decoded_images(bench, (96, 96), cache_dir=tmp_path / "c", workers=0, progress=False)
    assert other.folder != first.folder and other.images.shape == (12, 96, 96, 3)


def test_changed_benchmark_file_gets_a_new_cache_entry(tmp_path):
    write_bin_pack(tmp_path / "lfw.bin", 4, seed=0)
    a = decoded_images(parse_bench(str(tmp_path / "lfw.bin")), (112, 112), cache_dir=tmp_path / "c", workers=0,
                       progress=False)
    write_bin_pack(tmp_path / "lfw.bin", 4, seed=1)
    b = decoded_images(parse_bench(str(tmp_path / "lfw.bin")), (112, 112), cache_dir=tmp_path / "c", workers=0,
                       progress=False)
    assert a.key != b.key and not b.reused


def test_worker_processes_write_what_one_process_writes(tmp_path, monkeypatch):
    write_bin_pack(tmp_path / "lfw.bin", 20, size=(64, 64))
    bench = parse_bench(str(tmp_path / "lfw.bin"))
    monkeypatch.setattr(cache_module, "MIN_IMAGES_FOR_WORKERS", 1)
    monkeypatch.setattr(cache_module, "CHUNK", 7)
    pooled = decoded_images(bench, (64, 64), cache_dir=tmp_path / "pool", workers=2, progress=False)
    single = decoded_images(bench, (64, 64), cache_dir=tmp_path / "one", workers=0, progress=False)
    np.testing.assert_array_equal(pooled.images, single.images)


def test_a_corrupt_image_fails_with_its_name_and_leaves_no_cache(tmp_path, monkeypatch):
    images = [encode(identity_image(i % 3, i)) for i in range(20)]
    images[13] = images[13][:60]
    with open(tmp_path / "cfp_fp.bin", "wb") as f:
        pickle.dump((images, [True] * 10), f)
    bench = parse_bench(str(tmp_path / "cfp_fp.bin"))
    monkeypatch.setattr(cache_module, "MIN_IMAGES_FOR_WORKERS", 1)
    for workers in (0, 2):
        with pytest.raises(BnportError, match=r"cannot decode benchmark image .*cfp_fp\.bin#13") as err:
            decoded_images(bench, (112, 112), cache_dir=tmp_path / "c", workers=workers, progress=False)
        assert err.value.hint  # the hint survives the worker process
        assert not list((tmp_path / "c").rglob("*.npy*")) and not list((tmp_path / "c").rglob("info.json"))


@pytest.mark.parametrize("spec", [InputSpec(), InputSpec(32, 40, mean=(123.7, 116.3, 103.5), std=(58.4, 57.1, 57.4),
                                                          bgr=True)])
def test_network_input_equals_input_spec_to_tensor(spec):
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, size=(3, spec.height, spec.width, 3), dtype=np.uint8)
    ours = to_network_input(batch, spec)
    reference = torch.stack([spec.to_tensor(image) for image in batch]).numpy()
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)
