"""Shared test fixtures: a folder of real images, one intra-op thread per test, and two calibration runs made once per
session and shared by every module that only reads them (the helpers that build files live in tests/helpers)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.images import write_images
from tests.helpers.runs import folder_digest, tiny_run


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    write_images(folder, 24)
    return folder


@pytest.fixture(autouse=True)
def _single_thread():
    """Two cores are shared by the suite: one intra-op thread keeps tests from oversubscribing."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _shared(root: Path, **settings):
    """A `tiny_run` in `root`, checked at the end of the session to hold exactly what it held when made: a test that
    writes into a shared run (scores it, damages it) must work on a copy (tests.helpers.runs.copy_run)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tiny_run(root, **settings)
    finally:
        torch.set_num_threads(previous)
    before = folder_digest(root)
    yield root
    after = folder_digest(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test changed the shared run in {root}: {changed[:10]}; copy it with copy_run first"


@pytest.fixture(scope="session")
def shared_ema_run(tmp_path_factory) -> Path:
    """A folder holding `run/` (iresnet_tiny with trained-looking BN from `w.safetensors`, EMA mode, 16 real images
    in `calib/`, batch 4, 3 epochs with fractal noise at ratio 0.2: 12 steps, snapshots 0000 (baseline) to 0003 every
    4 steps), the weights and the images. Read-only: copy_run it before scoring it (scoring writes exports/)."""
    yield from _shared(tmp_path_factory.mktemp("ema"), mode="ema", batch_size=4, epochs=3, snapshot_every=4,
                       noise=["fractal:ratio=0.2"])


@pytest.fixture(scope="session")
def shared_exact_run(tmp_path_factory) -> Path:
    """A folder holding `run/` (iresnet_tiny as initialised, no weights file, exact mode, 12 real images in
    `calib/`, batch 4, one epoch: 3 steps, snapshots 0000 (baseline) to 0003, one per step) and the images.
    Read-only: copy_run it before changing anything."""
    yield from _shared(tmp_path_factory.mktemp("exact"), images=12, trained=False, mode="exact", batch_size=4,
                       epochs=1, snapshot_every=1)
