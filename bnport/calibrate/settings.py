"""`CalibrationSettings`: how a calibration runs (noise mix, mode, momentum, batch size, length, snapshots, seed,
loader workers, strictness with unreadable images, the consistency figure). Declared once; `bnport calibrate`'s
options and the `[calibrate]` table of `bnport run` build it alike, and its rules (`--momentum` only with ema,
`--snapshot-every` not with sequential, steps or epochs, not both) are checked here, when it is made. `RunLength` is
how long a run with these settings is on a given dataset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from bnport.errors import BnportError
from bnport.options import Setting, SettingsGroup

MODES = ("ema", "exact", "sequential")
CONSISTENCY = ("held-out", "full", "off")
DATA = Setting("data", None, "str", "calibration images: a folder, list file, train.rec (+.idx) or .bin pack",
               required=True, path=True)


@dataclass(frozen=True)
class CalibrationSettings(SettingsGroup):
    """See SETTINGS for each field. `noise` holds noise specs (bnport.calibrate.noise) or NoiseSource objects;
    `momentum` None is the model's own; `steps` and `epochs` None is one epoch; `snapshot_every` None is a tenth of
    the run."""

    noise: tuple = ()
    mode: str = "ema"
    momentum: float | None = None
    batch_size: int = 32
    steps: int | None = None
    epochs: int | None = None
    snapshot_every: int | None = None
    seed: int = 0
    workers: int = 2
    strict_data: bool = False
    consistency: str = "held-out"

    SETTINGS: ClassVar[tuple[Setting, ...]] = (
        Setting("noise", [], "list[str]", "noise sources: blur:p=0.05,sigma=3-5 | gauss-append:ratio=0.05,std=1 | "
                "gauss-add:std=0.1 | ood:DIR,ratio=0.05 | fractal:ratio=0.05"),
        Setting("mode", "ema", "str", "ema: BN momentum updates; exact: pooled float64 statistics over all images; "
                "sequential: as exact, layer by layer, each measured with every earlier BN already normalising with "
                "its new statistics (what the exported model computes)", choices=MODES),
        Setting("momentum", None, "float", "BN momentum for --mode ema only, in (0, 1] (default: the model's own)",
                minimum=0.0, maximum=1.0, open_minimum=True),
        Setting("batch_size", 32, "int", "images per batch and process (at least 2)", minimum=2),
        Setting("steps", None, "int", "number of steps (batches per process)", minimum=1),
        Setting("epochs", None, "int", "passes over the data (default 1 when steps is not given)", minimum=1),
        Setting("snapshot_every", None, "int", "steps between snapshots (default: a tenth of the run; sequential "
                "mode writes one snapshot, at the end)", minimum=1),
        Setting("seed", 0, "int", "seed of the batch order and the noise"),
        Setting("workers", 2, "int", "DataLoader workers", minimum=0),
        Setting("strict_data", False, "bool", "stop at the first unreadable image instead of skipping it"),
        Setting("consistency", "held-out", "str", "each snapshot's BN consistency figure (stored statistics against "
                "an eval-mode forward): held-out (4 batches past the run's), full (also the last snapshot over "
                "every calibration image: one more pass), off", choices=CONSISTENCY),
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise", tuple(self.noise))
        if self.mode not in MODES:
            raise BnportError(f"unknown mode {self.mode!r}", f"use --mode {', '.join(MODES)}")
        if self.consistency not in CONSISTENCY:
            raise BnportError(f"unknown consistency {self.consistency!r}",
                              f"use --consistency {', '.join(CONSISTENCY)}")
        if self.momentum is not None and self.mode != "ema":
            raise BnportError(f"--momentum has no effect with --mode {self.mode} (it pools every image, with no "
                              "momentum)", "drop --momentum, or use --mode ema")
        if self.snapshot_every is not None and self.mode == "sequential":
            raise BnportError("--snapshot-every has no effect with --mode sequential (it writes one snapshot, when "
                              "every BN layer is calibrated over all the run's images)", "drop --snapshot-every")
        if self.momentum is not None and not 0 < self.momentum <= 1:
            raise BnportError(f"momentum must be in (0, 1], got {self.momentum}", "use e.g. --momentum 0.1")
        if self.batch_size < 2:
            raise BnportError(f"batch size must be at least 2, got {self.batch_size} (BatchNorm needs two values per "
                              "channel)", "use e.g. --batch-size 32")
        if self.steps is not None and self.epochs is not None:
            raise BnportError("give --steps or --epochs, not both", "steps count batches, epochs passes over the data")

    @classmethod
    def _convert(cls, values: dict[str, Any]) -> dict[str, Any]:
        return {**values, "noise": tuple(values.get("noise", ()))}

    def sources(self) -> list:
        """The noise sources, parsed (bnport.calibrate.noise)."""
        from bnport.calibrate.noise import parse_noise

        return [parse_noise(s) if isinstance(s, str) else s for s in self.noise]

    def length(self, per_epoch: int, world: int) -> "RunLength":
        """How long a run is over data of `per_epoch` batches shared by `world` processes."""
        total_batches = self.steps * world if self.steps is not None else (self.epochs or 1) * per_epoch
        total_steps = math.ceil(total_batches / world)
        if self.mode == "sequential":  # one snapshot: the statistics exist only when every layer is done
            return RunLength(total_batches, total_steps, total_steps)
        return RunLength(total_batches, total_steps, self.snapshot_every or max(1, total_steps // 10))


@dataclass(frozen=True)
class RunLength:
    """How long a run is: `total_batches` global batches, `total_steps` per process, a snapshot every
    `snapshot_every` steps (and after the last)."""

    total_batches: int
    total_steps: int
    snapshot_every: int

    def snapshot_due(self, done_steps: int) -> bool:
        return done_steps % self.snapshot_every == 0 or done_steps == self.total_steps
