"""The process group a calibration runs in under `torchrun`, and the one collective it needs: a sum over ranks.

Every tensor that crosses processes lives on the calibration device (BN buffers, exact-mode sums, the tally's
counters), so a group whose backend serves that device serves every collective: gloo on CPU; on CUDA a group with
nccl for CUDA tensors and gloo for CPU ones (`cpu:gloo,cuda:nccl`). The CPU and CUDA runs go through the same code;
only the backend string differs. A single process without `torchrun` gets `Ranks.single(device)`, whose collectives
do nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def process_group_backend(device: torch.device) -> str:
    """The backend for a group whose collectives carry tensors on `device`."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def launched_by_torchrun() -> bool:
    """True when torchrun started this process (even with one process: its collectives then really run)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Ranks:
    """This process's place in the group: `rank` of `world`; `device` is where collective tensors live; `joined` says
    the group was created here (and is destroyed by `close`), not by the caller."""

    rank: int
    world: int
    device: torch.device
    joined: bool = False

    @classmethod
    def single(cls, device: torch.device) -> "Ranks":
        return cls(0, 1, device)

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over every rank, in place (it must be on `device`); returns it."""
        if self.active:
            if tensor.device != self.device:
                raise ValueError(f"collective tensor on {tensor.device}, the group serves {self.device}")
            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        """Wait for every rank, then leave the group if it was joined here."""
        if self.joined and self.active:
            dist.barrier()
            dist.destroy_process_group()


def join_process_group(device: torch.device) -> Ranks:
    """The group this process calibrates in: the caller's when one is initialised, a new one when `torchrun`
    started the process (the CUDA device becomes cuda:LOCAL_RANK), else a single process."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), device)
    if not launched_by_torchrun():
        return Ranks.single(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(backend=process_group_backend(device))
    return Ranks(dist.get_rank(), dist.get_world_size(), device, joined=True)
