"""torch.distributed plumbing shared by the averagers: which group, who am I, and a
construction-time agreement that turns a local mistake into the same error on every rank
(instead of one rank raising while the others wait forever in the next collective)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist


_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class Comm:
    """A process group (``None``: a single process without torch.distributed) and this rank's
    place in it, with the collectives the averagers use (so a group simulated in one process,
    :mod:`easgd_ext.simulate`, can stand in for a real one)."""
    group: Any
    rank: int
    world_size: int

    @property
    def distributed(self) -> bool:
        return self.group is not None

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank) if self.distributed else group_rank

    def backend(self) -> str:
        return dist.get_backend(self.group)

    def all_reduce(self, t: torch.Tensor, async_op: bool = False) -> Any:
        return dist.all_reduce(t, group=self.group, async_op=async_op)

    def all_to_all_single(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False) -> Any:
        return dist.all_to_all_single(out, inp, group=self.group, async_op=async_op)

    def all_gather_single(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False) -> Any:
        return _all_gather(out, inp, group=self.group, async_op=async_op)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> None:
        """``t`` becomes group rank ``src``'s."""
        dist.broadcast(t, src=self.global_rank(src), group=self.group)

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out


def init_process_group(backend: str | None = None, timeout: timedelta | None = None) -> None:
    """``torch.distributed.init_process_group`` for a job that a launcher may restart (the
    environment variables of torchrun: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    Under ``torchrun --max-restarts``, every attempt of the job joins its group through the
    launcher's own store under a namespace of its own (``TORCHELASTIC_RESTART_COUNT``): with
    plain ``init_process_group`` a restarted Gloo group finds the previous attempt's addresses
    in that store and can fail to connect (6 of 8 restarts of a plain torch script failed so
    here, torch 2.14). Outside a restarting launcher it is
    ``init_process_group(backend, timeout=timeout)``."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    if attempt is None or "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, **kwargs)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=False, **kwargs)
    dist.init_process_group(backend, store=dist.PrefixStore(f"easgd_ext-attempt-{attempt}", store),
                            rank=rank, world_size=world, **kwargs)


def resolve(process_group: Any = None) -> Comm:
    """The given group, else the default one; a single process where torch.distributed is not
    initialized and no launcher asked for more than one. A one-dimensional ``DeviceMesh``
    (``mesh["replicate"]``) stands for its group. A :class:`Comm` (a simulated group's rank,
    :mod:`easgd_ext.simulate`) is taken as it is."""
    if isinstance(process_group, Comm):
        return process_group
    if _is_device_mesh(process_group):
        if process_group.ndim != 1:
            names = process_group.mesh_dim_names
            raise ValueError(
                f"process_group is a {process_group.ndim}-dimensional DeviceMesh"
                f"{'' if names is None else f' {names}'}; pass the dimension to average over, "
                "the replicate one: process_group=mesh['replicate'] (its ranks hold the same "
                "shards in different replicas)")
        process_group = process_group.get_group()
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            launched = int(os.environ.get("WORLD_SIZE", "1"))
            if launched > 1:
                raise RuntimeError(
                    f"WORLD_SIZE is {launched} but torch.distributed is not initialized: call "
                    "torch.distributed.init_process_group() before building the averager")
            return Comm(None, 0, 1)
        process_group = dist.group.WORLD
    return Comm(process_group, dist.get_rank(process_group), dist.get_world_size(process_group))


def _is_device_mesh(value: Any) -> bool:
    # A DeviceMesh exists only once its module was imported: looked up, not imported here.
    mesh_type = getattr(sys.modules.get("torch.distributed.device_mesh"), "DeviceMesh", None)
    return mesh_type is not None and isinstance(value, mesh_type)


class AgreementError(ValueError):
    """Raised on every rank when the ranks disagree or one of them failed at construction."""


def agree(comm: Comm, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Runs ``build()`` (local validation; returns what must be identical on every rank), then
    compares across ranks. Any exception on any rank, or any difference, is raised on every
    rank with the same message, naming the rank and the first thing that differs."""
    try:
        local, error = build(), None
    except (TypeError, ValueError, RuntimeError, OSError) as exc:
        if not comm.distributed:
            raise
        local, error = None, (type(exc).__name__, str(exc))
    if not comm.distributed:
        return local
    everyone = comm.all_gather_object({"value": local, "error": error})
    for rank, item in enumerate(everyone):
        if item["error"] is not None:
            kind, message = item["error"]
            exc_type = {"TypeError": TypeError, "ValueError": ValueError,
                        "FileNotFoundError": FileNotFoundError, "FileExistsError": FileExistsError,
                        "PermissionError": PermissionError, "TimeoutError": TimeoutError,
                        "StaleSegmentError": RuntimeError}.get(kind, RuntimeError)
            raise exc_type(f"rank {rank}: {message}")
    reference = everyone[0]["value"]
    for rank, item in enumerate(everyone[1:], start=1):
        difference = _first_difference(reference, item["value"], rank)
        if difference is not None:
            raise AgreementError(f"ranks disagree: {difference}")
    return local


def _first_difference(ref: Any, other: Any, rank: int, path: str = "") -> str | None:
    """A description of the first place where rank 0's ``ref`` and ``rank``'s ``other`` differ
    (``settings.tau``, ``layout[3]``, ...)."""
    if ref == other:
        return None
    if isinstance(ref, dict) and isinstance(other, dict):
        for key in list(ref) + [k for k in other if k not in ref]:
            found = _first_difference(ref.get(key), other.get(key), rank,
                                      f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    if isinstance(ref, list) and isinstance(other, list):
        if len(ref) != len(other):
            return f"{path}: rank 0 has {len(ref)} entries, rank {rank} has {len(other)}"
        i = next(i for i, (a, b) in enumerate(zip(ref, other)) if a != b)
        return _first_difference(ref[i], other[i], rank, f"{path}[{i}]")
    return f"{path} is {ref!r} on rank 0 but {other!r} on rank {rank}"


def broadcast_from_first(comm: Comm, tensors: list[torch.Tensor]) -> None:
    """Every rank's ``tensors`` become group rank 0's."""
    if not comm.distributed:
        return
    for t in tensors:
        comm.broadcast(t, 0)



def unresponsive_ranks(comm: Comm, event: str, grace: float) -> list[int]:
    """After a failed collective: which group ranks did not report the same failure within
    ``grace`` seconds. Each rank that fails writes a key to the process group's store (the
    launcher's, which outlives any rank) and watches for the others' keys; nothing touches the
    store while collectives succeed. Returns [] where no store can be reached."""
    try:
        store = dist.distributed_c10d._get_default_store()
        ranks = dist.get_process_group_ranks(comm.group)
    except Exception:  # noqa: BLE001 -- no store, no names: the caller still reports the failure
        return []
    prefix = f"easgd_ext/failed/{'-'.join(map(str, ranks))}/{event}/"
    try:
        store.set(prefix + str(comm.rank), "1")
        deadline = time.monotonic() + grace
        missing = list(range(comm.world_size))
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([prefix + str(r)])]
            if missing:
                time.sleep(0.05)
        return missing
    except Exception:  # noqa: BLE001 -- the store's host may be the rank that died
        return []
