"""Asynchronous mode of :class:`~easgd_ext.ElasticAverager` and
:class:`~easgd_ext.DownpourAverager`: each worker exchanges with the center on its own clock and
never waits for another worker, except for the lock of a chunk another one is updating.

Two places for the center:

* one machine: a :class:`~easgd_ext.SharedCenter` in shared memory. CPU parameters exchange in
  one native call that walks the chunks under their locks; CUDA parameters pipeline each chunk
  (copy in on one stream, fused kernel, copy back on another) with the segment pinned;
* several machines: a :class:`~easgd_ext.sharded_center.ShardedCenter` on server ranks.

Build them with ``mode="async"``; the classes here are what such an averager is.
"""

from __future__ import annotations

import socket
import warnings
from collections import deque
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from . import _dist, ops
from ._native import native
from .averager import SyncAverager, _Timer, check_tau
from .elastic import ElasticAverager
from .baselines import DownpourAverager
from .flat_params import FlatGroup, collect_parameters, layout_of
from .shared_center import SharedCenter, unique_name
from .sharded_center import ShardedCenter, check_servers

DEFAULT_LOCK_TIMEOUT = 300.0
CUDA_CHUNKS_IN_FLIGHT = 4


def check_lock_timeout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"lock_timeout must be a number of seconds, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"lock_timeout must be positive (seconds), got {value}")
    return float(value)


def chunk_plan(offset: int, n: int, chunk_numel: int, worker: int,
               workers: int) -> list[tuple[int, int, int]]:
    """The chunks of center[offset, offset + n) in the order worker ``worker`` of ``workers``
    visits them, as (chunk, start, end) with start/end relative to ``offset``: the native
    exchange's own order (it starts ``worker / workers`` of the way round and wraps once)."""
    return [tuple(span) for span in native.chunk_plan(offset, n, chunk_numel, worker, workers)]


class _AsyncMode(SyncAverager):
    """What asynchronous EASGD and DOWNPOUR share; ``kind`` picks the update."""

    kind = ""

    def _init_async(self, params: Iterable[torch.Tensor], process_group: Any, tau: object,
                    comm_dtype: object, center: object, servers: object, lock_timeout: object,
                    check_settings: Callable[[int], dict[str, Any]]) -> None:
        comm = _dist.resolve(process_group)
        self._comm = comm
        self._center: SharedCenter | None = None
        self._sharded: ShardedCenter | None = None
        self._copy_streams: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}
        self._closed = False

        def build() -> dict[str, Any]:
            if comm_dtype is not None:
                raise ValueError("comm_dtype applies to mode='sync'; in mode='async' the "
                                 "parameters travel in their own dtype")
            if center is not None and not isinstance(center, (str, SharedCenter)):
                raise TypeError(f"center must be a SharedCenter, a segment name or None, got "
                                f"{type(center).__name__}")
            if center is not None and servers is not None:
                raise ValueError("give center= (a shared-memory center on one machine) or "
                                 "servers= (a sharded center across machines), not both")
            server_ranks = None
            if servers is not None:
                if not comm.distributed:
                    raise ValueError("servers= needs torch.distributed: the center lives on "
                                     "server ranks of the process group")
                server_ranks = check_servers(servers, comm.world_size)
            where = center.name if isinstance(center, SharedCenter) else center
            settings = {"tau": check_tau(tau), "lock_timeout": check_lock_timeout(lock_timeout),
                        "servers": server_ranks, "center": where}
            self._params = collect_parameters(params)
            if isinstance(center, str):
                self._center = SharedCenter.attach(center, like=self._params)
            elif isinstance(center, SharedCenter):
                center.check_layout(self._params)
                self._center = center
            if server_ranks is not None:
                workers = comm.world_size - len(server_ranks)
            elif self._center is not None:
                workers = self._center.workers
            else:
                workers = comm.world_size
            settings.update(check_settings(workers))
            return {"algorithm": self.algorithm, "settings": settings,
                    "layout": layout_of(self._params)}

        self._start(comm, _dist.agree(comm, build))
        self.comm_dtype = None
        self.lock_timeout: float = self._settings["lock_timeout"]
        servers_ = self._settings["servers"]
        if servers_ is not None:
            self._sharded = ShardedCenter(comm, self._groups, servers_, self.kind, self._alpha())
        else:
            if self._center is None:
                self._center = self._create_center()
            self._offsets = self._center.check_layout(self._params)
            self.worker_id: int = self._center.segment.register_worker()
            # Every worker starts from the center (the paper's x_i = x~ at t = 0).
            start = self._center.snapshot()
            with torch.no_grad():
                for g, offset in zip(self._groups, self._offsets):
                    g.flat.copy_(start[offset:offset + g.flat.numel()])
            if any(g.device.type == "cuda" for g in self._groups):
                self._setup_cuda()
        for g in self._groups:
            self._init_async_buffers(g)

    # ---- construction helpers ---------------------------------------------------------------------
    def _create_center(self) -> SharedCenter:
        """No center given: a private one for a single process, or, under torch.distributed, one
        that rank 0 creates under a fresh name and the other ranks (on the same machine) attach."""
        comm = self._comm
        if not comm.distributed:
            return SharedCenter.create(unique_name(), like=self._params, workers=1)
        host = socket.gethostname()
        box: list[Any] = [None]
        created = None
        if comm.rank == 0:
            try:
                created = SharedCenter.create(unique_name(), like=self._params, workers=comm.world_size)
                box = [(created.name, None, host)]
            except (OSError, ValueError, RuntimeError) as exc:
                box = [(None, f"{type(exc).__name__}: {exc}", host)]
        dist.broadcast_object_list(box, src=comm.global_rank(0), group=comm.group)
        name, error, host0 = box[0]
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
                    attached.append(SharedCenter.attach(name, like=self._params))
                except FileNotFoundError:
                    raise FileNotFoundError(
                        f"rank 0 created shared center '{name}' on host {host0}, but it is not in "
                        "this rank's shared memory: are all ranks on one machine (containers "
                        "sharing a hostname)? Pass servers=[...] for a sharded center across "
                        "machines") from None
            return {}

        _dist.agree(comm, attach)
        return created if created is not None else attached[0]

    def _setup_cuda(self) -> None:
        assert self._center is not None
        if not self._center.pin_for_cuda():
            warnings.warn("the shared center could not be pinned (easgd_ext built without CUDA?): "
                          "GPU exchanges copy through pageable memory and are slower",
                          RuntimeWarning, stacklevel=4)
        for g in self._groups:
            if g.device.type == "cuda":
                g.buffers["center_device"] = torch.empty(g.flat.numel(), dtype=torch.float32,
                                                         device=g.device)
                # copy-in and copy-back streams, per device
                self._copy_streams.setdefault(g.device, (torch.cuda.Stream(g.device),
                                                         torch.cuda.Stream(g.device)))

    def _init_async_buffers(self, group: FlatGroup) -> None:
        """Per-algorithm worker buffers (DOWNPOUR's x_last)."""

    def _alpha(self) -> float:
        return 0.0

    # ---- the loop-facing surface --------------------------------------------------------------------
    @property
    def is_server(self) -> bool:
        """Whether this rank serves a shard of the center (``servers=``): it calls :meth:`serve`."""
        return self._sharded is not None and self._sharded.is_server

    @property
    def center(self) -> SharedCenter | None:
        """The shared-memory center (``None`` with ``servers=``)."""
        return self._center

    def serve(self, on_request: Callable[[str, int], None] | None = None) -> dict[str, int]:
        """On a server rank: answers the workers' requests until every worker has called
        :meth:`close`; returns how many exchanges, reads and writes it served."""
        if not self.is_server:
            raise RuntimeError("serve() is for server ranks (servers=[...]); this rank is a worker")
        assert self._sharded is not None
        return self._sharded.serve(on_request)

    def step(self) -> bool:
        """Call once after every local optimizer step: advances this worker's clock and exchanges
        with the center when it reaches a multiple of ``tau`` (never waiting for other workers)."""
        self._not_on_a_server()
        return super().step()

    def _not_on_a_server(self) -> None:
        if self.is_server:
            raise RuntimeError(f"rank {self._comm.rank} is a server of the sharded center: it "
                               "calls serve(), not step() or exchange()")

    def exchange(self) -> bool:
        """Exchange with the center now (not collective: only this worker takes part). Returns
        ``False`` if this worker's parameters were not finite: the exchange is then skipped and
        the center is left alone."""
        self._not_on_a_server()
        if self._closed:
            raise RuntimeError("exchange() after close()")
        if self._in_center:
            raise RuntimeError("exchange() inside center_parameters(): the model holds the "
                               "center; leave the with-block first")
        timer = _Timer(self._groups[0].device)
        for g in self._groups:
            g.repoint()
        if sum(ops.count_nonfinite(g.flat) for g in self._groups):
            self._finish(timer, skipped=True)
            warnings.warn(f"{type(self).__name__}: skipped exchange at clock {self.clock}: "
                          "non-finite values in this worker's parameters; they and the center "
                          "are left as they were", RuntimeWarning, stacklevel=2)
            return False
        if self._sharded is not None:
            last = [g.buffers["x_last"] for g in self._groups] if self.kind == "downpour" else None
            wire = [g.buffers["wire"] for g in self._groups] if self.kind == "downpour" else None
            self._sharded.exchange(self.clock, last, wire)
        else:
            recovered = 0
            for g, offset in zip(self._groups, self._offsets):
                if g.device.type == "cuda":
                    recovered += self._exchange_cuda(g, offset)
                else:
                    recovered += self._exchange_cpu(g, offset)
            self._center.segment.record_exchange(self.worker_id, self.clock)  # type: ignore[union-attr]
            if recovered:
                warnings.warn(f"{type(self).__name__}: recovered {recovered} chunk lock(s) of shared "
                              f"center '{self.center.name}' held by a worker that died",  # type: ignore[union-attr]
                              RuntimeWarning, stacklevel=2)
        self._finish(timer, skipped=False)
        return True

    def close(self) -> None:
        """This worker is done: marks its slot finished (shared center) or tells the servers
        (sharded center). Idempotent; also called on leaving a ``with`` block."""
        if self._closed:
            return
        self._closed = True
        if self._sharded is not None:
            self._sharded.close()
        elif self._center is not None and self._center._segment is not None:
            self._center.segment.finish_worker(self.worker_id)

    def __enter__(self) -> "_AsyncMode":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transports -----------------------------------------------------------------------------------
    def _exchange_cpu(self, g: FlatGroup, offset: int) -> int:
        last = g.buffers.get("x_last")
        return self._center.segment.exchange(  # type: ignore[union-attr]
            self.worker_id, self.kind, ops._tensor_ref("x", g.flat),
            None if last is None else ops._tensor_ref("x_last", last), offset, self._alpha(),
            torch.get_num_threads(), self.lock_timeout)

    def _exchange_cuda(self, g: FlatGroup, offset: int) -> int:
        """Per chunk: lock; copy the center chunk in (copy_in stream); fused update of x and the
        device copy (current stream); copy it back (copy_out stream); unlock once the copy back
        is done. Up to CUDA_CHUNKS_IN_FLIGHT chunks are in flight, so copies in both directions
        overlap with each other and with the kernels. Locks are taken in increasing chunk order
        (the window is drained at the wrap-around), so two workers can never deadlock."""
        center = self._center
        assert center is not None
        seg = center.segment
        n = g.flat.numel()
        host = center.tensor[offset:offset + n]
        device_center = g.buffers["center_device"]
        copy_in, copy_out = self._copy_streams[g.device]
        compute = torch.cuda.current_stream(g.device)
        in_flight: deque[tuple[int, torch.cuda.Event]] = deque()
        recovered = 0

        def retire(keep: int) -> None:
            while len(in_flight) > keep:
                chunk, done = in_flight.popleft()
                done.synchronize()
                seg.set_dirty(chunk, False)
                seg.unlock(chunk)

        try:
            previous = -1
            for k, lo, hi in chunk_plan(offset, n, center.chunk_numel, self.worker_id, center.workers):
                if k < previous:
                    retire(0)
                previous = k
                recovered += seg.lock(k, self.lock_timeout) != 0
                with torch.cuda.stream(copy_in):
                    device_center[lo:hi].copy_(host[lo:hi], non_blocking=True)
                    arrived = torch.cuda.Event()
                    arrived.record()
                compute.wait_event(arrived)
                if self.kind == "easgd":
                    ops.async_exchange(g.flat[lo:hi], device_center[lo:hi], self._alpha())
                else:
                    ops.downpour_async_exchange(g.flat[lo:hi], g.buffers["x_last"][lo:hi],
                                                device_center[lo:hi])
                updated = torch.cuda.Event()
                updated.record(compute)
                seg.set_dirty(k, True)
                with torch.cuda.stream(copy_out):
                    copy_out.wait_event(updated)
                    host[lo:hi].copy_(device_center[lo:hi], non_blocking=True)
                    done = torch.cuda.Event()
                    done.record()
                in_flight.append((k, done))
                retire(CUDA_CHUNKS_IN_FLIGHT)
        finally:
            retire(0)
        return recovered

    # ---- the center, for evaluation and checkpoints ---------------------------------------------------
    def _centers(self) -> list[torch.Tensor | None]:
        if self._sharded is not None:
            if self._sharded.is_server:
                raise RuntimeError("a server rank holds one shard of the center; read the center "
                                   "on a worker")
            values = self._sharded.read()
        else:
            snapshot = self._center.snapshot()  # type: ignore[union-attr]
            values = [snapshot[o:o + g.flat.numel()] for g, o in zip(self._groups, self._offsets)]
        return [v.to(g.device) for v, g in zip(values, self._groups)]

    def _state_tensors(self, name: str) -> list[torch.Tensor]:
        if name == "center":
            return self._centers()  # type: ignore[return-value]
        return super()._state_tensors(name)

    def _load_state_tensors(self, name: str, saved: list[torch.Tensor]) -> None:
        if name != "center":
            return super()._load_state_tensors(name, saved)
        if self._sharded is not None:
            if not self._sharded.is_server:
                self._sharded.write(saved)
            return
        assert self._center is not None
        whole = self._center.snapshot()
        for s, g, o in zip(saved, self._groups, self._offsets):
            whole[o:o + g.flat.numel()].copy_(s)
        self._center.load_(whole)

    def _bytes_per_exchange(self, skipped: bool) -> int:
        if skipped or self._sharded is None:
            return 0  # the shared center moves no bytes over a network
        return sum(g.flat.nbytes for g in self._groups)


class AsyncElasticAverager(_AsyncMode, ElasticAverager):
    """:class:`~easgd_ext.ElasticAverager` with ``mode="async"``:
    ``e = alpha (x - center); x -= e; center += e`` against the shared or sharded center."""

    kind = "easgd"

    def __init__(self, params: Iterable[torch.Tensor], tau: int = 10, beta: float | None = None,
                 alpha: float | None = None, mode: str = "async", process_group: Any = None,
                 comm_dtype: torch.dtype | str | None = None, bucket_cap_mb: float = 25.0,
                 allow_unstable: bool = False, center: SharedCenter | str | None = None,
                 servers: list[int] | None = None,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        from .elastic import elastic_rates

        def check_settings(workers: int) -> dict[str, Any]:
            self.alpha, self.beta = elastic_rates(workers, beta, alpha, allow_unstable)
            return {"mode": "async", "alpha": self.alpha, "beta": self.beta}

        self._init_async(params, process_group, tau, comm_dtype, center, servers, lock_timeout,
                         check_settings)
        self.mode = "async"

    def _alpha(self) -> float:
        return self.alpha


class AsyncDownpourAverager(_AsyncMode, DownpourAverager):
    """:class:`~easgd_ext.DownpourAverager` with ``mode="async"``: push ``x - x_last`` into the
    center and pull the center, one worker at a time."""

    kind = "downpour"

    def __init__(self, params: Iterable[torch.Tensor], tau: int = 10, mode: str = "async",
                 process_group: Any = None, comm_dtype: torch.dtype | str | None = None,
                 bucket_cap_mb: float = 25.0, center: SharedCenter | str | None = None,
                 servers: list[int] | None = None,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self._init_async(params, process_group, tau, comm_dtype, center, servers, lock_timeout,
                         lambda workers: {"mode": "async"})
        self.mode = "async"

    def _init_async_buffers(self, group: FlatGroup) -> None:
        if self._sharded is None:
            group.buffers["x_last"] = group.flat.clone()
        else:  # the sharded center's client works on host copies
            group.buffers["x_last"] = group.flat.detach().to("cpu", copy=True)
            group.buffers["wire"] = torch.empty(group.flat.numel(), dtype=group.dtype)
