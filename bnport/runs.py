"""The run folder as one object: `RUN/run.json` (the manifest), `snapshots/NNNN.*` (BN-only snapshots, 0000 the
untouched baseline), `exports/` (parity-verified ONNX files of snapshots, keyed by what they were made from, so a
snapshot is exported once) and `score/` (the default output of `bnport score RUN`).

calibrate, export and score all reach a run through `Run` rather than walking the folder by hand, so the layout and
its rules (a snapshot is complete when its tensors and its JSON both exist; the JSON is written last) live here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bnport.atomic import atomic_write_json
from bnport.errors import BnportError

MANIFEST = "run.json"
SNAPSHOTS = "snapshots"
EXPORTS = "exports"
SCORE = "score"


@dataclass(frozen=True)
class SnapshotRef:
    """One snapshot of a run: `index` 0 is the baseline; `tensors` and `meta_path` are its two files."""

    run: "Run"
    index: int

    @property
    def id(self) -> str:
        return f"{self.index:04d}"

    @property
    def tensors(self) -> Path:
        return self.run.path / SNAPSHOTS / f"{self.id}.safetensors"

    @property
    def meta_path(self) -> Path:
        return self.run.path / SNAPSHOTS / f"{self.id}.json"

    @property
    def resume_path(self) -> Path:
        return self.run.path / SNAPSHOTS / f"{self.id}.resume.safetensors"

    @property
    def complete(self) -> bool:
        return self.tensors.is_file() and self.meta_path.is_file()

    @property
    def label(self) -> str:
        """How tables name it: "0000 (baseline)" or "0003"."""
        return f"{self.id} (baseline)" if self.index == 0 else self.id

    def meta(self) -> dict:
        try:
            return json.loads(self.meta_path.read_text())
        except (OSError, ValueError) as e:
            raise BnportError(f"cannot read snapshot metadata {self.meta_path}: {e}",
                              "the file is damaged or half-written; recalibrate or remove the snapshot") from None

    def sha256(self) -> str:
        """sha256 of the BN tensors file: what identifies a snapshot's content."""
        from bnport.atomic import sha256_file

        return sha256_file(self.tensors)


class Run:
    """A run folder made by `bnport calibrate`. `Run(path)` only names it; `Run.open(path)` checks it is one."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        """The run in `path`; a folder without run.json is one error saying where the manifest was expected."""
        run = cls(path)
        if not run.path.is_dir():
            raise BnportError(f"run folder not found: {run.path}", "give the --out folder of bnport calibrate")
        if not run.manifest_path.is_file():
            raise BnportError(f"not a bnport run folder: {run.manifest_path} is missing",
                              "give the --out folder of bnport calibrate (it holds run.json and snapshots/)")
        return run

    @classmethod
    def of_snapshot(cls, path: str | Path) -> tuple["Run", int]:
        """(run, index) for a path RUN/snapshots/NNNN(.safetensors|.json); the run's manifest must exist."""
        path = Path(path)
        if not looks_like_snapshot(path):
            raise BnportError(f"{path} is not a snapshot path", "give RUN/snapshots/NNNN.safetensors")
        run = cls(path.parent.parent)
        if not run.manifest_path.is_file():
            raise BnportError(f"snapshot {path} has no run manifest: {run.manifest_path} is missing",
                              "a snapshot is exported with its run's model and weights, recorded in run.json; "
                              "restore the run folder as bnport calibrate wrote it")
        return run, int(path.stem.split(".")[0])

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def snapshots_dir(self) -> Path:
        return self.path / SNAPSHOTS

    @property
    def exports_dir(self) -> Path:
        return self.path / EXPORTS

    @property
    def score_dir(self) -> Path:
        return self.path / SCORE

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict:
        """run.json as a dict (an error naming the file when it is missing or not JSON)."""
        try:
            return json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise BnportError(f"not a bnport run folder: {self.manifest_path} is missing",
                              "give the --out folder of bnport calibrate") from None
        except (OSError, ValueError) as e:
            raise BnportError(f"cannot read the run manifest {self.manifest_path}: {e}",
                              "the file is damaged; restore it or recalibrate") from None

    def write_manifest(self, manifest: dict) -> None:
        atomic_write_json(self.manifest_path, manifest)

    @property
    def status(self) -> str | None:
        return self.manifest().get("status") if self.exists() else None

    def snapshot(self, index: int) -> SnapshotRef:
        return SnapshotRef(self, int(index))

    def snapshots(self) -> list[SnapshotRef]:
        """Complete snapshots (tensors and JSON both present), in index order; 0000 first when present."""
        if not self.snapshots_dir.is_dir():
            return []
        indices = sorted(int(p.stem) for p in self.snapshots_dir.glob("[0-9][0-9][0-9][0-9].json")
                         if p.with_suffix(".safetensors").is_file())
        return [SnapshotRef(self, i) for i in indices]

    def last_snapshot(self) -> SnapshotRef | None:
        done = self.snapshots()
        return done[-1] if done else None

    def export_path(self, snapshot: SnapshotRef, key: str) -> Path:
        """Where the export of `snapshot` made under settings `key` (a short hash) is cached."""
        return self.exports_dir / f"{snapshot.id}-{key}.onnx"


def looks_like_snapshot(path: str | Path) -> bool:
    """True for a path shaped RUN/snapshots/NNNN(.safetensors|.json|) whether or not the files exist."""
    path = Path(path)
    stem = path.name.split(".")[0]
    return (path.parent.name == SNAPSHOTS and len(stem) == 4 and stem.isdigit()
            and path.suffix in (".safetensors", ".json", ""))

