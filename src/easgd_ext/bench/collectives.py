"""Collectives of the benchmarks that leave nothing for Gloo's threads to release at exit."""

from __future__ import annotations

import gc
from typing import Any

import torch
import torch.distributed as dist


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
