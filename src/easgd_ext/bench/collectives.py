"""Collectives of the benchmarks that leave nothing for Gloo's threads to release at exit."""

from __future__ import annotations

import contextlib
import gc
import json
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from easgd_ext._launch import join_group


class Works:
    """Keeps the Work objects of the last call of each variant referenced, so that Gloo's
    worker thread never drops the last reference to a tensor (at interpreter shutdown that
    aborts the process: "terminate called without an active exception")."""

    def __init__(self) -> None:
        self.kept: dict[str, list[Any]] = {}

    def run(self, name: str, tensors: list[torch.Tensor], **kwargs: Any) -> None:
        """All-reduces each of ``tensors`` (posted together), waits, and keeps the works."""
        works = [dist.all_reduce(t, async_op=True, **kwargs) for t in tensors]
        for w in works:
            w.wait()
        self.kept[name] = works


def leave_group() -> None:
    """Destroys the process group and frees what still refers to it now, while the interpreter
    is whole: left to the interpreter's shutdown, the group's Gloo threads would be torn down
    mid-finalization and the process would die with SIGABRT ("terminate called without an
    active exception") after finishing its work."""
    dist.destroy_process_group()
    gc.collect()


@contextlib.contextmanager
def rank_session(rank: int, world: int, store: str | None,
                 device_kind: str) -> Iterator[tuple[torch.device, Works]]:
    """One benchmark rank's process group (joined as :func:`join_group` does) and the
    :class:`Works` its collectives keep: the group is left however the body ends, and the
    works are dropped only after it is gone (ours is then the last reference to every tensor
    they held)."""
    device = join_group(rank, world, store, device_kind)
    works = Works()
    try:
        yield device, works
    finally:
        leave_group()
        del works


def write_records_of_rank0(rank: int, out: str, records: list[dict]) -> None:
    """Rank 0 writes the records for the launching process to read back."""
    if rank == 0:
        Path(out).write_text(json.dumps(records))
