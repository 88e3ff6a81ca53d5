"""What a calibration has counted: images per source, unreadable reads skipped, batches calibrated.

Each process counts what it saw (`add`), as plain integers; `total` sums the counts over every rank through the
process group, on the calibration device (see bnport.runtime.distributed), as float64 (exact for counts below
2^53). Counts are cumulative: a resumed run starts rank 0 from the totals its snapshot recorded and the other ranks
from zero, so the sum over ranks is always the run's total.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bnport.runtime.distributed import Ranks

SKIPPED = "skipped"
BATCHES = "batches"


@dataclass
class Tally:
    """Counts of images per source (`sources`, in order), plus `skipped` unreadable reads and calibrated `batches`."""

    sources: list[str]
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sources = list(dict.fromkeys(self.sources))
        if {SKIPPED, BATCHES} & set(self.sources):
            raise ValueError(f"source names {SKIPPED!r} and {BATCHES!r} are reserved")
        self.counts = {name: int(self.counts.get(name, 0)) for name in self.names}

    @property
    def names(self) -> list[str]:
        return [*self.sources, SKIPPED, BATCHES]

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] += int(n)

    def __getitem__(self, name: str) -> int:
        return self.counts[name]

    @property
    def images(self) -> dict[str, int]:
        """Images per source."""
        return {name: self.counts[name] for name in self.sources}

    @property
    def skipped(self) -> int:
        return self.counts[SKIPPED]

    @property
    def batches(self) -> int:
        return self.counts[BATCHES]

    def total(self, ranks: Ranks) -> "Tally":
        """A new tally holding the sums over every rank (this one unchanged); every rank must call it together."""
        values = torch.tensor([float(self.counts[name]) for name in self.names], dtype=torch.float64,
                              device=ranks.device)
        summed = ranks.sum(values).tolist()
        return Tally(self.sources, {name: round(v) for name, v in zip(self.names, summed)})

    @classmethod
    def resumed(cls, sources: list[str], meta: dict) -> "Tally":
        """The totals a snapshot's JSON recorded (`images_seen`, `skipped`, `batches`)."""
        seen = meta.get("images_seen", {})
        return cls(sources, {**{name: seen.get(name, 0) for name in sources}, SKIPPED: meta.get("skipped", 0),
                             BATCHES: meta.get("batches", 0)})
