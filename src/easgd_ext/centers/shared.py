"""The asynchronous center on one machine: a :class:`~easgd_ext.SharedCenter` in named shared
memory. A worker's exchange is one native call per flat group: the chunks of its range, each
under its robust lock, through the algorithm's kernel; CUDA parameters go through a staging
ring on the device with the copies in both directions overlapped (the segment pinned with
cudaHostRegister). Nobody waits for another worker except on a chunk it is updating.
"""

from __future__ import annotations

import socket
from typing import Any

import torch
import torch.distributed as dist

from .. import _dist
from .._native import num_threads, stream_of, tensor_ref
from ..algorithms import Algorithm
from ..flat_params import FlatGroup, check_saved
from ..settings import POLICY_CODES
from ..shared_center import SharedCenter, unique_name
from ..stats import Outcome, warn_user

STAGING_SLOTS = 4  # chunks in flight per CUDA exchange: copy in, kernel, copy out overlapped


def attach_given(center: object, params: list[torch.Tensor], comm: _dist.Comm) -> SharedCenter | None:
    """The center a user gave (checked against the parameters), or None: make one (under
    torch.distributed a name is made, or found, by rank 0: see :func:`create_or_attach`)."""
    if center is None or isinstance(center, str) and comm.distributed:
        return None
    if isinstance(center, str):
        return SharedCenter.attach(center, like=params)
    if isinstance(center, SharedCenter):
        center.check_layout(params)
        return center
    raise TypeError(f"center must be a SharedCenter, a segment name or None, got {type(center).__name__}")


def create_or_attach(comm: _dist.Comm, params: list[torch.Tensor],
                     name: str | None = None) -> SharedCenter:
    """A center for this job: a private one for a single process, or, under torch.distributed,
    one that rank 0 creates and the other ranks (on the same machine) attach: under a fresh name,
    or under ``name`` as a persistent center that rank 0 attaches to if it exists already (a job
    restarted by its launcher continues from its center)."""
    if not comm.distributed:
        return SharedCenter.create(unique_name(), like=params, workers=1)
    host = socket.gethostname()
    box: list[Any] = [None]
    created = None
    if comm.rank == 0:
        try:
            if name is None:
                created = SharedCenter.create(unique_name(), like=params, workers=comm.world_size)
            else:
                created = SharedCenter.open_or_create(name, like=params, workers=comm.world_size)
            box = [(created.name, None, host)]
        except (OSError, ValueError, RuntimeError) as exc:
            box = [(None, f"{type(exc).__name__}: {exc}", host)]
    # not dist.broadcast_object_list: its temporaries, left to Gloo's thread, abort the process
    # at exit (SIGABRT) if the job ends soon after; see _dist._collective
    name, error, host0 = _dist.broadcast_object(comm, box[0])
    attached: list[SharedCenter] = []

    def attach() -> dict[str, Any]:
        if error is not None:
            raise RuntimeError(f"could not create the shared center: {error}")
        if host != host0:
            raise ValueError(f"mode='async' without servers keeps the center in shared memory "
                             f"on one machine, but this rank runs on {host} and rank 0 on "
                             f"{host0}; pass servers=[...] for a sharded center across machines")
        if created is None:
            try:
                attached.append(SharedCenter.attach(name, like=params))
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"rank 0 created shared center '{name}' on host {host0}, but it is not in "
                    "this rank's shared memory: are all ranks on one machine (containers "
                    "sharing a hostname)? Pass servers=[...] for a sharded center across "
                    "machines") from None
        return {}

    _dist.agree(comm, attach)
    return created if created is not None else attached[0]


class SharedMemoryCenter:
    """The center of ``mode="async"`` on one machine."""

    transport = "shared memory"

    def __init__(self, comm: _dist.Comm, groups: list[FlatGroup], params: list[torch.Tensor],
                 algorithm: Algorithm, center: SharedCenter | str | None, lock_timeout: float,
                 on_nonfinite: str) -> None:
        if isinstance(center, SharedCenter):
            self.center = center
        else:
            self.center = create_or_attach(comm, params, name=center)
        self.workers = self.center.workers
        self._comm = comm
        self._groups = groups
        self._lock_timeout = lock_timeout
        self._policy = POLICY_CODES[on_nonfinite]
        self._offsets = self.center.check_layout(params)
        segment = self.center.segment
        self.worker_id: int = segment.register_worker()
        # Every worker starts from the center (the paper's x_i = x~ at t = 0).
        start = self.center.snapshot()
        with torch.no_grad():
            for g, offset in zip(groups, self._offsets):
                g.flat.copy_(start[offset:offset + g.flat.numel()])
        self._cuda: dict[torch.device, dict[str, Any]] = {}
        if any(g.device.type == "cuda" for g in groups):
            if not self.center.pin_for_cuda():
                warn_user("the shared center could not be pinned (easgd_ext built without "
                          "CUDA?): GPU exchanges copy through pageable memory and are slower")
            for g in groups:
                if g.device.type == "cuda" and g.device not in self._cuda:
                    staging = torch.empty(STAGING_SLOTS * self.center.chunk_numel,
                                          dtype=torch.float32, device=g.device)
                    me_bad = torch.zeros(1, device=g.device)
                    self._cuda[g.device] = {"staging": tensor_ref("staging", staging),
                                            "me_bad": tensor_ref("me_bad", me_bad),
                                            "keep": (staging, me_bad)}
        for g in groups:
            algorithm.init_buffers(g)
        self._rules = [algorithm.chunk_rule(g) for g in groups]
        self._closed = False

    def exchange(self, clock: int) -> Outcome:
        """This worker's exchange with the center (not collective). Returns what it did."""
        if self._closed:
            raise RuntimeError("exchange() after close()")
        segment = self.center.segment
        recovered, bad = 0, False
        threads = num_threads()
        for g, rule, offset in zip(self._groups, self._rules, self._offsets):
            cuda = self._cuda.get(g.device, {})
            got, nonfinite = segment.exchange(
                self.worker_id, rule, offset, num_threads=threads, timeout=self._lock_timeout,
                policy=self._policy, stream=stream_of(g.device), staging=cuda.get("staging"),
                me_bad=cuda.get("me_bad"))
            recovered += got
            bad |= nonfinite
        segment.record_exchange(self.worker_id, clock)
        if recovered:
            warn_user(f"recovered {recovered} chunk lock(s) of shared center '{self.center.name}' "
                      "held by a worker that died")
        return Outcome(clock, int(bad), bad, False, applied=not bad or self._policy == 1)

    def bytes_per_exchange(self) -> int:
        return 0  # shared memory: nothing crosses a network

    def read(self) -> list[torch.Tensor]:
        snapshot = self.center.snapshot()
        return [snapshot[o:o + g.flat.numel()].to(g.device)
                for g, o in zip(self._groups, self._offsets)]

    def write(self, values: list[torch.Tensor]) -> None:
        whole = self.center.snapshot()
        for v, g, o in zip(values, self._groups, self._offsets):
            whole[o:o + g.flat.numel()].copy_(v)
        self.center.load_(whole)

    def save(self) -> dict[str, list[torch.Tensor]]:
        """Checkpoint: the center is the job's, not a worker's: rank 0 keeps it."""
        return {"center": [c.cpu() for c in self.read()]} if self._comm.rank == 0 else {}

    def load(self, buffers: dict[str, Any]) -> None:
        """Rank 0 restores the center; under torch.distributed nobody returns before it has,
        so no worker exchanges with a center still to be restored."""
        if self._comm.rank == 0:
            if "center" not in buffers:
                raise ValueError("this state holds no center: in mode='async' rank 0 saves the "
                                 "shared center and loads it back; load rank 0's own state here")
            check_saved("center", buffers["center"], [g.flat for g in self._groups])
            self.write(buffers["center"])
        if self._comm.distributed:
            dist.barrier(group=self._comm.group)

    def close(self) -> None:
        """This worker is done: its slot is marked finished. Idempotent."""
        if not self._closed:
            self._closed = True
            if not self.center.closed:
                self.center.segment.finish_worker(self.worker_id)
