"""The processes of one evaluation: this process alone, or the ones ``accelerate launch`` started.

The evaluation stages split their work into independent items (batches of questions about a
few images; the decoded image sets of a codec sweep), give each process every ``world``-th
item, and gather the per-item results back into the order one process would produce them, so
N processes compute the metrics one process computes. Each process holds one model on its own
device; only the main process writes outputs. Started without ``accelerate launch`` (a
notebook, ``dvc repro``) there is one process and nothing is initialised.

On a machine without CUDA the processes join over gloo, as accelerate does for CPU training.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

_INDEXED = re.compile(r"[a-z][a-z0-9_]*:[0-9]+")


def launched_world_size() -> int:
    """Processes the launcher started (``WORLD_SIZE``; 1 when run directly)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"WORLD_SIZE: expected a process count, got {raw!r}") from None
    if n < 1:
        raise ValueError(f"WORLD_SIZE: expected a process count >= 1, got {n}")
    return n


@dataclass(frozen=True)
class Processes:
    """This process's place among the evaluation's processes (``rank`` of ``world``)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0      # index among the processes on this machine: its GPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> list[int]:
        """This process's share of ``n`` items: every ``world``-th index from ``rank``.
        Strided rather than blocked, so items ordered by cost spread evenly."""
        return list(range(self.rank, n, self.world))

    def device(self, requested: str) -> str:
        """The torch device this process loads its model on. ``cpu`` stays ``cpu``; an
        accelerator named without an index (``cuda``) becomes this process's own one
        (``cuda:<local_rank>``); with several processes an indexed device would put every
        model on one GPU, so it is an error."""
        if self.world == 1 or requested == "cpu":
            return requested
        if _INDEXED.fullmatch(requested):
            raise ValueError(f"lvlm.device: {requested!r} names one device, but {self.world} processes were "
                             f"launched; name the device type ({requested.split(':')[0]!r}) and each process "
                             f"takes its own")
        return f"{requested}:{self.local_rank}"

    def gather(self, obj: T) -> list[T]:
        """Every process's ``obj`` (picklable), in rank order, on every process."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, obj: T) -> T:
        """The main process's ``obj`` on every process (the others pass anything, e.g. None)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def main_log(self, log: Callable[..., Any]) -> Callable[..., Any]:
        """``log`` on the main process; on the others a log that says nothing (the main
        process speaks for all)."""
        return log if self.is_main else _silent

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _silent(*args: Any) -> None:
    """A log that says nothing."""


def merge_shards(parts: Sequence[Sequence[tuple[int, T]]]) -> list[T]:
    """``(index, result)`` pairs from every process -> the results in index order; each index
    exactly once."""
    flat = sorted((p for part in parts for p in part), key=lambda p: p[0])
    indices = [i for i, _ in flat]
    if indices != list(range(len(flat))):
        raise RuntimeError(f"shards do not tile the items: got indices {indices[:10]}...")
    return [r for _, r in flat]


_CURRENT: Processes | None = None


def current() -> Processes:
    """The processes of this run: a single process unless ``accelerate launch`` (or another
    torch launcher setting ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) started several, in which
    case the process group is joined (NCCL on CUDA, gloo on CPU) on the first call."""
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    world = launched_world_size()
    if world == 1:
        _CURRENT = Processes()
        return _CURRENT
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes != world:
        raise RuntimeError(f"{world} processes were launched but accelerate joined {state.num_processes}; "
                           f"on CPU set ACCELERATE_USE_CPU=1")
    _CURRENT = Processes(rank=state.process_index, world=state.num_processes,
                         local_rank=state.local_process_index)
    return _CURRENT
