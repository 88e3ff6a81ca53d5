"""Tests for bnport.runs: the run-folder object over a real calibration run."""
from __future__ import annotations

import hashlib

import pytest

from bnport.errors import BnportError
from bnport.runs import Run, looks_like_snapshot


@pytest.fixture(scope="module")
def run_dir(shared_exact_run):
    """The shared exact run (12 images, batch 4, a snapshot per step: 0000 to 0003), read only."""
    return shared_exact_run / "run"


def test_run_lists_complete_snapshots_in_order(run_dir):
    run = Run.open(run_dir)
    snaps = run.snapshots()
    assert [s.index for s in snaps] == [0, 1, 2, 3]
    assert snaps[0].label == "0000 (baseline)" and snaps[2].label == "0002"
    assert run.last_snapshot().index == 3
    assert run.status == "complete"
    assert snaps[1].meta()["step"] == 1
    assert snaps[1].sha256() == hashlib.sha256(snaps[1].tensors.read_bytes()).hexdigest()


def test_incomplete_snapshot_is_not_listed(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "snapshots" / "0003.json").unlink()
    assert [s.index for s in Run(copy).snapshots()] == [0, 1, 2]


def test_open_without_manifest_names_the_expected_file(tmp_path):
    (tmp_path / "snapshots").mkdir()
    with pytest.raises(BnportError, match="run.json is missing"):
        Run.open(tmp_path)
    with pytest.raises(BnportError, match="run folder not found"):
        Run.open(tmp_path / "nope")


def test_snapshot_without_manifest_says_so(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "run.json").unlink()
    snap = copy / "snapshots" / "0002.safetensors"
    assert looks_like_snapshot(snap)
    with pytest.raises(BnportError, match=r"no run manifest: .*run.json is missing"):
        Run.of_snapshot(snap)
    run, index = Run.of_snapshot(run_dir / "snapshots" / "0002.safetensors")
    assert index == 2 and run.path == run_dir


def test_damaged_manifest_is_one_error(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "run.json").write_text("{not json")
    with pytest.raises(BnportError, match="cannot read the run manifest"):
        Run(copy).manifest()
