"""The named tally and the process group it sums over: counts by name, sums over a real gloo group, resumed totals,
and the backend each calibration device gets."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from bnport.calibrate.tally import Tally
from bnport.runtime.distributed import Ranks, join_process_group, launched_by_torchrun, process_group_backend


@pytest.fixture
def gloo_group(tmp_path):
    """A real one-process gloo group, as torchrun --nproc-per-node 1 makes."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_counts_by_name():
    tally = Tally(["data", "blur", "data"])
    assert tally.sources == ["data", "blur"] and tally.names == ["data", "blur", "skipped", "batches"]
    tally.add("data", 8)
    tally.add("blur", 2)
    tally.add("batches")
    tally.add("skipped", 3)
    assert tally.images == {"data": 8, "blur": 2} and tally.batches == 1 and tally.skipped == 3
    with pytest.raises(KeyError):
        tally.add("gauss-add", 1)
    with pytest.raises(ValueError, match="reserved"):
        Tally(["data", "batches"])


def test_total_without_a_group_is_the_own_count():
    tally = Tally(["data"], {"data": 5, "batches": 1})
    total = tally.total(Ranks.single(torch.device("cpu")))
    assert total == tally and total is not tally


def test_total_sums_through_a_real_group(gloo_group):
    ranks = join_process_group(torch.device("cpu"))
    assert (ranks.rank, ranks.world, ranks.joined, ranks.active) == (0, 1, False, True)
    tally = Tally(["data", "fractal"], {"data": 2 ** 40 + 3, "fractal": 7, "skipped": 1, "batches": 9})
    total = tally.total(ranks)
    assert total.counts == {"data": 2 ** 40 + 3, "fractal": 7, "skipped": 1, "batches": 9}
    with pytest.raises(ValueError, match="collective tensor on meta"):
        ranks.sum(torch.zeros(2, device="meta"))  # a tensor the group was not set up for is a bug, said at once


def test_resumed_totals_come_from_the_snapshot_json():
    meta = {"images_seen": {"data": 40, "gauss-append": 3}, "skipped": 2, "batches": 5}
    tally = Tally.resumed(["data", "gauss-append", "fractal"], meta)
    assert tally.counts == {"data": 40, "gauss-append": 3, "fractal": 0, "skipped": 2, "batches": 5}


def test_backend_serves_every_tensor_of_the_calibration_device(monkeypatch):
    assert process_group_backend(torch.device("cpu")) == "gloo"
    # nccl takes CUDA tensors only: a CUDA run's group also carries gloo for anything on the CPU
    assert process_group_backend(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    for name in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert not launched_by_torchrun()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # torchrun --nproc-per-node 1 still joins a group
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launched_by_torchrun()
