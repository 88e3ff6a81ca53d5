"""Opening a Data SRC (an image folder, a list file, MXNet RecordIO or an insightface `.bin` pack) as an
`ImageDataset` whose items are network inputs under an `InputSpec`, and batching its items while counting the images
that could not be decoded."""
from __future__ import annotations

from pathlib import Path

import torch

from bnport.data.binpack import BinPackDataset
from bnport.data.folder import LIST_SUFFIXES, ImageDataset, open_folder, open_list
from bnport.data.recordio import RecordIODataset
from bnport.data.transforms import InputSpec
from bnport.errors import BnportError

_ACCEPTED = ("an image folder, a folder holding train.rec, a .rec file, a .bin pack, or a list file "
             f"({'/'.join(LIST_SUFFIXES)})")


def open_images(src: str | Path, spec: InputSpec, *, strict: bool = False) -> ImageDataset:
    """Open a Data SRC: a folder holding `train.rec` (an insightface dataset dir) or any other folder (searched
    recursively for images), a `.rec` (its `.idx` beside it is used when present, else the file is scanned), a
    `.bin` pack, or a list file (`.txt`, `.lst`, `.list`). With `strict`, an unreadable image raises instead of
    being skipped."""
    path = Path(src).expanduser()
    if not path.exists():
        raise BnportError(f"data path not found: {path}", f"check the path; give {_ACCEPTED}")
    if path.is_dir():
        if (path / "train.rec").is_file():
            path = path / "train.rec"
        else:
            return open_folder(path, spec, strict=strict)
    suffix = path.suffix.lower()
    if suffix == ".rec":
        idx = path.with_suffix(".idx")
        return RecordIODataset(path, spec, idx_path=idx if idx.is_file() else None, strict=strict)
    if suffix == ".bin":
        return BinPackDataset(path, spec, strict=strict)
    if suffix in LIST_SUFFIXES:
        return open_list(path, spec, strict=strict)
    raise BnportError(f"unknown kind of data: {path}", f"give {_ACCEPTED}")


def collate_images(items: list[tuple[torch.Tensor | None, int]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Batch dataset items: (the decoded images stacked N x 3 x H x W, their indices as a LongTensor, the indices
    that could not be decoded). When no image of the batch decoded, the first element is `torch.empty(0)` (its
    H and W are unknown): callers skip batches whose images are empty."""
    good = [(image, i) for image, i in items if image is not None]
    skipped = [int(i) for image, i in items if image is None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    return (torch.stack([image for image, _ in good]), torch.tensor([i for _, i in good], dtype=torch.long),
            skipped)
