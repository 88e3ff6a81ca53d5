"""Batch plan, per-rank sampler and batch loading: the documented sequence, one permutation per epoch, and read errors
from DataLoader workers raised as themselves."""
from __future__ import annotations

import shutil
import struct
import time
from pathlib import Path

import pytest
import torch

from bnport.calibrate.sampler import BatchPlan, RankBatches, batches_per_epoch, global_batches, load_batches
from bnport.data import open_images
from bnport.data.transforms import InputSpec
from bnport.errors import BnportError
from tests.helpers.images import write_images
from tests.helpers.paths import FIXTURES

RECORDIO = FIXTURES / "recordio"


def reference_batches(n: int, batch_size: int, seed: int, epochs: int) -> list[list[int]]:
    """The documented sequence written out: per epoch torch.randperm(n) seeded 1_000_003 * seed + epoch, cut into
    batches of batch_size, a trailing batch of one image merged into the one before."""
    out = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(1_000_003 * seed + epoch)).tolist()
        cuts = list(range(0, n, batch_size))
        if len(cuts) > 1 and n - cuts[-1] == 1:
            cuts.pop()
        out += [order[a:b] for a, b in zip(cuts, cuts[1:] + [n])]
    return out


@pytest.mark.parametrize("n, batch_size", [(24, 8), (25, 4), (23, 5), (3, 8)])
def test_plan_follows_the_documented_sequence(n, batch_size):
    want = reference_batches(n, batch_size, seed=9, epochs=3)
    per_epoch = batches_per_epoch(n, batch_size)
    assert len(want) == 3 * per_epoch
    plan = BatchPlan(n, batch_size, 9)
    assert [plan.batch(g) for g in range(len(want))] == want
    assert global_batches(n, batch_size, 9, per_epoch - 1, 3) == want[per_epoch - 1:per_epoch + 2]
    for epoch in range(3):
        assert sorted(sum(want[epoch * per_epoch:(epoch + 1) * per_epoch], [])) == list(range(n))


def test_one_permutation_per_epoch_so_a_step_does_not_grow_with_the_dataset():
    n, batch_size = 2_000_000, 32
    plan = BatchPlan(n, batch_size, 0)
    sampler = RankBatches(plan, range(0, 200), rank=1, world=2)
    t0 = time.perf_counter()
    first_order = plan.permutation(0)
    batches = list(sampler)
    seconds = time.perf_counter() - t0
    assert plan.permutation(0) is first_order, "the epoch's permutation is kept, not drawn again"
    assert batches[0] == first_order[32:64].tolist() and batches[-1] == first_order[399 * 32:400 * 32].tolist()
    # drawing a 2 M permutation per step (as before) took 0.2-0.5 s a step here; 200 slices take milliseconds
    assert seconds < 5, f"200 steps over 2 M items took {seconds:.1f}s"


def test_ranks_take_interleaved_global_batches_and_empty_ones_past_the_end():
    plan = BatchPlan(24, 5, 4)  # 5 global batches
    got = {rank: list(RankBatches(plan, range(1, 3), rank=rank, world=2, total=5)) for rank in (0, 1)}
    assert got[0] == [plan.batch(2), plan.batch(4)]
    assert got[1] == [plan.batch(3), []]


def test_loaded_batches_keep_indices_and_count_unreadable_images(tmp_path):
    folder = tmp_path / "images"
    write_images(folder, 6)
    (folder / "id00" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    dataset = open_images(folder, InputSpec(112, 112))
    broken = dataset.names.index("id00/broken.jpg")
    good = [i for i in range(len(dataset)) if i != broken]
    order = [[good[0], broken, good[1]], good[2:4], good[4:6]]
    for workers in (0, 2):
        batches = list(load_batches(dataset, order, workers=workers))
        assert [b.indices for b in batches] == [good[0:2], good[2:4], good[4:6]]
        assert batches[0].skipped == [broken] and batches[1].skipped == []
        assert torch.equal(batches[1].images, torch.stack([dataset[i][0] for i in good[2:4]]))


def corrupt_middle_record(folder: Path) -> tuple[Path, int]:
    """A copy of the plain fixture whose third record's framing is broken (the .idx still fits the file)."""
    rec = folder / "train.rec"
    shutil.copy(RECORDIO / "plain" / "train.rec", rec)
    shutil.copy(RECORDIO / "plain" / "train.idx", folder / "train.idx")
    offsets = sorted(int(line.split()[1]) for line in (folder / "train.idx").read_text().splitlines())
    raw = bytearray(rec.read_bytes())
    raw[offsets[2]:offsets[2] + 4] = struct.pack("<I", 0x12345678)
    rec.write_bytes(bytes(raw))
    return rec, offsets[2]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_read_error_in_a_worker_is_raised_as_itself(tmp_path, workers):
    rec, offset = corrupt_middle_record(tmp_path)
    dataset = open_images(tmp_path, InputSpec(12, 10))
    with pytest.raises(BnportError) as err:
        list(load_batches(dataset, [[0, 1], [2, 3]], workers=workers))
    assert err.value.message == f"bad RecordIO magic at offset {offset} of {rec}"
    assert err.value.hint and "Traceback" not in str(err.value) and "DataLoader worker" not in str(err.value)
