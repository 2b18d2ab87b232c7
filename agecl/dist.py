"""Distributed helpers for `torchrun` (DDP): rank, world size, main-process printing, reductions.

A run started by `torchrun` (or `python -m torch.distributed.run`) has RANK, LOCAL_RANK and
WORLD_SIZE in its environment; a plain `python -m agecl.train` has none of them and runs as rank
0 of 1, so every helper here is also correct, and free, in a single process. The process group
uses NCCL on CUDA and Gloo on CPU (the CPU path is what the tests exercise for real).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int = 0  # global rank, 0 .. world_size - 1
    local_rank: int = 0  # rank on this machine: the CUDA device it drives
    world_size: int = 1
    ddp: bool = False  # True when a process group is initialised (torchrun with >= 1 process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """The job as the environment describes it (torchrun's variables), without initialising anything."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    return DistInfo(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ["WORLD_SIZE"]),
        ddp=True,
    )


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 (and in a single process): the process that prints and writes files."""
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """`print` on the main process only (flushed: ranks share a terminal)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def init(device_type: str, timeout_minutes: float = 60.0) -> DistInfo:
    """Initialise the process group when launched by torchrun; return this process's DistInfo.

    `device_type` is "cuda" or "cpu": NCCL for CUDA, Gloo for CPU. On CUDA the current device is
    set to LOCAL_RANK before the group starts (NCCL binds to it). The generous timeout covers rank
    0 evaluating the test fold while the others wait at a barrier. Calling it twice is harmless.
    """
    info = env_info()
    if not info.ddp or is_initialized():
        return info
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    kwargs = {"device_id": torch.device("cuda", info.local_rank)} if device_type == "cuda" else {}
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
    return info


def destroy() -> None:
    """Tear the process group down (a no-op in a single process)."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce(t: torch.Tensor, op: str = "mean") -> torch.Tensor:
    """Reduce `t` over ranks in place ("sum", "mean", "max" or "min") and return it.

    A no-op in a single process. A collective: every rank must call it, in the same order, and it
    synchronises them (on CUDA it is queued on the stream; reading the result is the host sync).
    """
    if not is_initialized():
        return t
    ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"unknown reduction {op!r} (known: {', '.join(ops)})")
    dist.all_reduce(t, op=ops[op])
    if op == "mean":
        t /= dist.get_world_size()
    return t


def all_gather_object(obj) -> list:
    """Every rank's `obj` (picklable), in rank order; `[obj]` in a single process."""
    if not is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (picklable); `obj` itself in a single process."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
