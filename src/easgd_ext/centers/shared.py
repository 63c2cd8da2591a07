"""The asynchronous center on one machine: a :class:`~easgd_ext.SharedCenter` in named shared
memory. A worker's exchange is one native call per flat group: the chunks of its range, each
under its robust lock, through the algorithm's kernel; CUDA parameters go through a staging
ring on the device with the copies in both directions overlapped (the segment pinned with
cudaHostRegister). Nobody waits for another worker except on a chunk it is updating.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from .. import _dist
from .._native import num_threads, on_device, stream_of, tensor_ref
from ..algorithms import Algorithm
from ..flat_params import FlatGroup, check_saved
from ..settings import DEFAULT_LOCK_TIMEOUT, POLICY_CODES, check_lock_timeout
from ..shared_center import SharedCenter, unique_name
from ..stats import Outcome, warn_user
from .base import Center, CenterSpec, ExchangeRecord, ExchangeSettings

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
    raise TypeError(f"center must be a SharedCenter, a segment name or None (or a CenterSpec: "
                    f"Replicated, SharedMemory, Servers), got {type(center).__name__}")


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
    name, error, host0 = comm.broadcast_object(box[0])
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


@dataclass(frozen=True)
class SharedMemory(CenterSpec):
    """The center of ``mode="async"`` on one machine: named shared memory that each worker
    exchanges with on its own clock. ``segment``: a :class:`~easgd_ext.SharedCenter`, the name
    of one, or ``None`` (a single process makes a private one; under torch.distributed rank 0
    creates one under a fresh name, or under a name given as a string, and the other ranks
    attach to it). ``lock_timeout``: seconds to wait for a chunk lock before raising
    ``TimeoutError`` (a live worker stuck while holding it)."""

    segment: SharedCenter | str | None = None
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT

    mode: ClassVar[str] = "async"

    def checked(self, comm: _dist.Comm, params: list[torch.Tensor],
                settings: ExchangeSettings) -> SharedMemory:
        lock_timeout = check_lock_timeout(self.lock_timeout)  # None: the default
        given = attach_given(self.segment, params, comm)
        return replace(self, segment=given if given is not None else self.segment,
                       lock_timeout=lock_timeout)

    def workers(self, comm: _dist.Comm) -> int:
        return self.segment.workers if isinstance(self.segment, SharedCenter) else comm.world_size

    def settings(self) -> dict[str, Any]:
        return {"center": self.segment.name if isinstance(self.segment, SharedCenter) else self.segment}

    def build(self, comm: _dist.Comm, groups: list[FlatGroup], params: list[torch.Tensor],
              algorithm: Algorithm, settings: ExchangeSettings) -> SharedMemoryCenter:
        return SharedMemoryCenter(comm, groups, params, algorithm, self, settings)


class SharedMemoryCenter(Center):
    """The center of ``mode="async"`` on one machine."""

    def __init__(self, comm: _dist.Comm, groups: list[FlatGroup], params: list[torch.Tensor],
                 algorithm: Algorithm, spec: SharedMemory, settings: ExchangeSettings) -> None:
        if algorithm.asynchronous is None:
            raise ValueError(f"{algorithm.name} has no asynchronous form")
        given = spec.segment
        self.shared = given if isinstance(given, SharedCenter) else create_or_attach(comm, params, name=given)
        self.workers = self.shared.workers
        self._comm = comm
        self._groups = groups
        self._lock_timeout = spec.lock_timeout
        self.tau = settings.tau
        self._policy = POLICY_CODES[settings.on_nonfinite]
        self._offsets = self.shared.check_layout(params)
        segment = self.shared.segment
        self.worker_id = segment.register_worker()
        # Every worker starts from the center (the paper's x_i = x~ at t = 0).
        start = self.shared.snapshot()
        with torch.no_grad():
            for g, offset in zip(groups, self._offsets):
                g.flat.copy_(start[offset:offset + g.flat.numel()])
        self._keep: list[torch.Tensor] = []  # device buffers the prepared exchanges point into
        staging: dict[torch.device, tuple[Any, Any]] = {}
        if any(g.device.type == "cuda" for g in groups):
            first_gpu = next(g.device for g in groups if g.device.type == "cuda")
            with on_device(first_gpu):
                pinned = self.shared.pin_for_cuda(first_gpu)
            if not pinned:
                warn_user("the shared center could not be pinned (easgd_ext built without "
                          "CUDA?): GPU exchanges copy through pageable memory and are slower")
            for g in groups:
                if g.device.type == "cuda" and g.device not in staging:
                    ring = torch.empty(STAGING_SLOTS * self.shared.chunk_numel, dtype=torch.float32,
                                       device=g.device)
                    me_bad = torch.zeros(1, device=g.device)
                    self._keep += [ring, me_bad]
                    staging[g.device] = (tensor_ref("staging", ring), tensor_ref("me_bad", me_bad))
        rule = algorithm.asynchronous
        self._exchanges = []
        for g, offset in zip(groups, self._offsets):
            algorithm.init_buffers(g)
            ring, me_bad = staging.get(g.device, (None, None))
            with on_device(g.device):  # what it prepares on a GPU belongs to that GPU
                self._exchanges.append((g.device, segment.prepare_exchange(
                    self.worker_id, rule.chunk_rule(g), offset, self._policy, ring, me_bad)))
        self._closed = False

    def exchange(self, clock: int) -> list[ExchangeRecord]:
        """This worker's exchange with the center (not collective). Returns what it did."""
        if self._closed:
            raise RuntimeError("exchange() after close()")
        recovered, bad = 0, False
        threads = num_threads()
        for device, prepared in self._exchanges:
            with on_device(device):
                got, nonfinite = prepared.run(threads, self._lock_timeout, stream_of(device))
            recovered += got
            bad |= nonfinite
        self.shared.segment.record_exchange(self.worker_id, clock)
        if recovered:
            warn_user(f"recovered {recovered} chunk lock(s) of shared center '{self.shared.name}' "
                      "held by a worker that died")
        # Shared memory: nothing crosses a network.
        return [ExchangeRecord(clock, 0, outcome=Outcome(
            clock, bad_ranks=int(bad), me_bad=bad, applied=not bad or self._policy == 1))]

    def read(self) -> list[torch.Tensor]:
        snapshot = self.shared.snapshot()
        return [snapshot[o:o + g.flat.numel()].to(g.device)
                for g, o in zip(self._groups, self._offsets)]

    def write(self, values: list[torch.Tensor]) -> None:
        whole = self.shared.snapshot()
        for v, g, o in zip(values, self._groups, self._offsets):
            whole[o:o + g.flat.numel()].copy_(v)
        self.shared.load_(whole)

    @property
    def keeps_center(self) -> bool:
        """Who saves and restores the center, the job's and not a worker's: rank 0 under
        torch.distributed; without it, the process that created the segment (workers that
        attached to a center made elsewhere keep none of it: save it from its creator, or with
        ``SharedCenter.snapshot()``)."""
        return self._comm.rank == 0 if self._comm.distributed else bool(self.shared.owner)

    def save(self) -> dict[str, list[torch.Tensor]]:
        """Checkpoint: only :attr:`keeps_center` saves the center."""
        return {"center": [c.cpu() for c in self.read()]} if self.keeps_center else {}

    def load(self, buffers: dict[str, Any]) -> None:
        """:attr:`keeps_center` restores the center; under torch.distributed nobody returns
        before it has, so no worker exchanges with a center still to be restored."""
        if self.keeps_center:
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
            if not self.shared.closed:
                self.shared.segment.finish_worker(self.worker_id)
