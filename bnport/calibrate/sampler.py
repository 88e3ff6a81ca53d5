"""Which images each calibration step takes, and how they are loaded: the batch plan, the per-rank batch sampler and
the loader that carries a worker's read error back as the error it was.

`BatchPlan` is the endless sequence of global batches: one seeded permutation of the items per epoch, drawn once when
the epoch starts and kept, cut into batches of `batch_size` (a last batch of a single image joins the one before it:
BatchNorm needs two values per channel). A step costs a slice of that permutation, whatever the dataset's size.
Under `torchrun`, rank r takes global batches r, r+W, r+2W, ... (`RankBatches`), so the sequence of global batches
does not depend on the number of processes.

`load_batches` wraps torch's DataLoader. A `BnportError` raised while a worker reads an item (a `.rec` cut short)
reaches the main process through torch as the worker's formatted traceback, message and hint lost; here the worker
returns the error as data and the main process raises it again as the same `BnportError`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch

from bnport.errors import BnportError

# The permutation seed of epoch e is SEED_STRIDE * seed + e, so (seed, epoch) pairs of nearby seeds do not collide.
SEED_STRIDE = 1_000_003


def batches_per_epoch(n_items: int, batch_size: int) -> int:
    """Batches in one pass over `n_items` (a trailing batch of one image is merged into the one before)."""
    per_epoch = math.ceil(n_items / batch_size)
    return per_epoch - 1 if per_epoch > 1 and n_items % batch_size == 1 else per_epoch


class BatchPlan:
    """Global batch g of the endless sequence: epoch g // per_epoch, batch g % per_epoch of that epoch's permutation.

    The permutation of the current epoch is kept (int32 when the items fit, so 17 M items take 68 MB), so asking for
    consecutive batches draws one permutation per epoch."""

    def __init__(self, n_items: int, batch_size: int, seed: int):
        if n_items < 1:
            raise ValueError("a batch plan needs at least one item")
        self.n_items, self.batch_size, self.seed = int(n_items), int(batch_size), int(seed)
        self.per_epoch = batches_per_epoch(self.n_items, self.batch_size)
        self._epoch: int | None = None
        self._order: torch.Tensor | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        """The item order of `epoch` (drawn on first use, kept until another epoch is asked for)."""
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * SEED_STRIDE + epoch)
            dtype = torch.int32 if self.n_items < 2 ** 31 else torch.int64
            self._order = torch.randperm(self.n_items, generator=generator, dtype=dtype)
            self._epoch = epoch
        return self._order

    def batch(self, g: int) -> list[int]:
        """The item indices of global batch `g`."""
        epoch, k = divmod(int(g), self.per_epoch)
        start = k * self.batch_size
        stop = start + self.batch_size if k < self.per_epoch - 1 else self.n_items
        return self.permutation(epoch)[start:stop].tolist()


def global_batches(n_items: int, batch_size: int, seed: int, first: int, count: int) -> list[list[int]]:
    """Global batches first .. first+count-1 of `BatchPlan(n_items, batch_size, seed)`."""
    plan = BatchPlan(n_items, batch_size, seed)
    return [plan.batch(g) for g in range(first, first + count)]


class RankBatches(torch.utils.data.Sampler):
    """Batch sampler: for each step in `steps`, this rank's global batch `step * world + rank`, or an empty batch
    once the run's `total` global batches are used up (the rank still takes part in the step's collectives)."""

    def __init__(self, plan: BatchPlan, steps: range, *, rank: int = 0, world: int = 1, total: int | None = None):
        self.plan, self.steps, self.rank, self.world = plan, steps, rank, world
        self.total = total if total is not None else steps.stop * world

    def global_index(self, step: int) -> int:
        return step * self.world + self.rank

    def __iter__(self) -> Iterator[list[int]]:
        for step in self.steps:
            g = self.global_index(step)
            yield self.plan.batch(g) if g < self.total else []

    def __len__(self) -> int:
        return len(self.steps)


@dataclass(frozen=True)
class ReadFailure:
    """A `BnportError` raised while reading an item, carried out of a DataLoader worker as data."""

    message: str
    hint: str | None

    def error(self) -> BnportError:
        return BnportError(self.message, self.hint)


class LoadedBatch(NamedTuple):
    """One loaded batch: the decoded images (N x 3 x H x W, or None when no image of the batch decoded) with the
    noise mixed in when the loader was given a mix, their indices, the indices that could not be decoded, the read
    failure that stopped it (then the rest is empty), and the images each source gave (`counts`, with a mix)."""

    images: torch.Tensor | None
    indices: list[int]
    skipped: list[int]
    failure: ReadFailure | None = None
    counts: dict | None = None


class _CarryErrors(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        g, i = key
        try:
            image, index = self.dataset[i]
        except BnportError as err:
            return ReadFailure(err.message, err.hint), i, g
        return image, index, g


class _Tagged(torch.utils.data.Sampler):
    """A batch sampler's batches with each item tagged by its batch's global index (`RankBatches.global_index`;
    the position for any other list of batches), which seeds the noise mixed into that batch."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        steps = getattr(self.batches, "steps", None)
        for k, batch in enumerate(self.batches):
            g = self.batches.global_index(steps[k]) if steps is not None else k
            yield [(g, i) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


class _Collate:
    """Stacks a batch's decoded images and mixes the noise into them (`mix`, None: none), in the loader's worker
    process when there are workers, so the main process only moves finished batches to the device."""

    def __init__(self, mix=None):
        self.mix = mix

    def __call__(self, items: list) -> LoadedBatch:
        for item, _, _ in items:
            if isinstance(item, ReadFailure):
                return LoadedBatch(None, [], [], item)
        good = [(image, int(i)) for image, i, _ in items if image is not None]
        skipped = [int(i) for image, i, _ in items if image is None]
        images = torch.stack([image for image, _ in good]) if good else None
        counts = None
        if images is not None and self.mix is not None:
            images, counts = self.mix.apply(images, items[0][2])
        return LoadedBatch(images, [i for _, i in good], skipped, counts=counts)


def load_batches(dataset, sampler, *, workers: int = 0, pin_memory: bool = False,
                 mix=None) -> Iterator[LoadedBatch]:
    """The batches `sampler` names, read from `dataset` (items `(tensor | None, index)`) by `workers` processes
    (0: in this one), with `mix` (a bnport.calibrate.noise.NoiseMix, seeded by each batch's global index) applied
    there too. A `BnportError` raised while reading is raised here, as itself, whichever process read it."""
    loader = torch.utils.data.DataLoader(_CarryErrors(dataset), batch_sampler=_Tagged(sampler), num_workers=workers,
                                         collate_fn=_Collate(mix), pin_memory=pin_memory, persistent_workers=False)
    for batch in loader:
        if batch.failure is not None:
            raise batch.failure.error()
        yield batch
