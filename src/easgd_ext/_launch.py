"""Starting the worker processes of the CLIs: spawned here (Gloo over a FileStore) or already
started by torchrun, and each one joined to the process group on its device."""

from __future__ import annotations

import json
import os
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ._dist import init_process_group


def launcher_rank_world() -> tuple[int, int] | None:
    """(rank, world size) when a launcher such as torchrun started this process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def backend_for(device_kind: str, world: int) -> str:
    """NCCL when every rank has a GPU of its own, Gloo otherwise."""
    if device_kind == "cuda" and torch.cuda.device_count() >= world:
        return "nccl"
    return "gloo"


def join_group(rank: int, world: int, store: str | None, device_kind: str) -> torch.device:
    """Joins the process group (``store``: a FileStore path when spawned, ``None`` under a
    launcher) with :func:`backend_for`'s backend and returns this rank's device; the CPU threads
    are shared among the ranks of this machine."""
    backend = backend_for(device_kind, world)
    if device_kind == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if store is None:
        init_process_group(backend, timeout=timedelta(minutes=10))
    else:
        dist.init_process_group(backend, init_method=f"file://{store}", rank=rank,
                                world_size=world, timeout=timedelta(minutes=10))
    return device


def run_workers(target: Callable[..., None], world: int, *args: Any) -> Any | None:
    """Runs ``target(rank, world, store, out, *args)`` on every rank: in this process under a
    launcher, else on ``world`` spawned processes. Rank 0 writes its result as JSON to ``out``;
    returns it (``None`` on the other ranks of a launched job)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        launched = launcher_rank_world()
        if launched is not None:
            rank, world = launched
            target(rank, world, None, out, *args)
            if rank != 0:
                return None
        else:
            mp.spawn(target, args=(world, os.path.join(tmp, "store"), out, *args), nprocs=world,
                     join=True)
        return json.loads(Path(out).read_text())
