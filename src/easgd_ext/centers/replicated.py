"""The synchronous center: a float32 replica on every rank, kept identical because every rank
adds the same all-reduced sum.

One exchange, all of it enqueued on the current stream with no host synchronization:

1. zero the status vector; the algorithm's send kernel writes each group's contribution into
   its wire buffer and sets ``status[ME_BAD]`` where a stored value is Inf/NaN;
2. ``publish_flag`` copies that flag into the wire's header element and, if it is set, zeroes
   the rank's contribution;
3. one all-reduce per bucket; the header travels in the first bucket, so after the sum it holds
   how many ranks flagged: one collective per bucket, never a separate one for the flag;
4. once every bucket has arrived, the apply kernels read that count on the device and decide
   there: skip the whole exchange (``on_nonfinite="skip"``/``"raise"``), or apply the healthy
   ranks' sum and reset the flagged rank to the center (``"reset"``). A float16 sum that overflowed leaves those elements alone
   on every rank alike (they all see the same sum) and sets ``status[OVERFLOW]``.

Everything the kernels need is built once here (views, wire slices, launches), so an exchange
costs a few native calls and one collective per bucket.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .. import _dist
from .._native import native, num_threads, stream_of, tensor_ref
from ..algorithms import Algorithm
from ..flat_params import ALIGN_ELEMENTS, FlatGroup, bucket_ranges, check_saved
from ..settings import POLICY_CODES
from ..stats import BAD_RANKS, ME_BAD, OVERFLOW, STATUS_LEN

HEADER = ALIGN_ELEMENTS  # wire elements before the data: the flag, padded to keep alignment


class ExchangeError(RuntimeError):
    """A synchronous exchange could not complete: another rank died, froze (no progress within
    ``exchange_timeout``) or stopped exchanging. ``clock`` is the exchange's, ``silent_ranks``
    the group ranks that did not report the failure themselves within a few seconds (``None``:
    unknown, the process group's store did not answer)."""

    def __init__(self, message: str, clock: int, silent_ranks: list[int] | None) -> None:
        super().__init__(message)
        self.clock = clock
        self.silent_ranks = silent_ranks


class ReplicatedCenter:
    """The center of ``mode="sync"``: replicated on every rank, exchanged by all-reduce."""

    transport = "all-reduce"

    def __init__(self, comm: _dist.Comm, groups: list[FlatGroup], algorithm: Algorithm,
                 comm_dtype: torch.dtype | None, bucket_bytes: int, on_nonfinite: str,
                 exchange_timeout: float) -> None:
        self._comm = comm
        self._groups = groups
        self._timeout = timedelta(seconds=exchange_timeout)
        self.workers = comm.world_size
        policy = POLICY_CODES[on_nonfinite]
        # One status vector per device (zeroed by each exchange's first launch there); a numpy
        # view of the CPU ones lets the log read them without a tensor method.
        self._status: dict[torch.device, torch.Tensor] = {}
        for g in groups:
            if algorithm.has_center:
                g.buffers["center"] = g.flat.to(torch.float32, copy=True)
            algorithm.init_buffers(g)
            self._status.setdefault(g.device, torch.zeros(STATUS_LEN, device=g.device))
        self.host_status = {d: s.numpy() for d, s in self._status.items() if d.type == "cpu"}

        zero, send, publish, apply = [], [], [], []
        self._buckets: list[torch.Tensor] = []  # wire slices, one all-reduce each
        self._bytes = 0
        for device, status in self._status.items():
            zero.append((device, native.prepare.zero(tensor_ref("status", status))))
        for g in groups:
            status = self._status[g.device]
            wire = torch.zeros(HEADER + g.flat.numel(), dtype=comm_dtype or g.dtype, device=g.device)
            g.buffers["wire"] = wire
            data, header = wire[HEADER:], wire[:1]
            me_bad = status[ME_BAD:ME_BAD + 1]
            send.append((g.device, algorithm.send(g, data, me_bad)))
            publish.append((g.device, native.prepare.publish_flag(
                tensor_ref("wire", data), tensor_ref("header", header), tensor_ref("me_bad", me_bad))))
            guard = {"bad_ranks": tensor_ref("bad_ranks", header),
                     "me_bad": tensor_ref("me_bad", me_bad), "policy": policy,
                     "world": comm.world_size,
                     "verdict": tensor_ref("verdict", status[BAD_RANKS:BAD_RANKS + 1]),
                     "nonfinite": tensor_ref("overflow", status[OVERFLOW:OVERFLOW + 1])}
            # Buckets cover the header and the data; each applies the data it carries.
            for s, e in bucket_ranges(wire.numel(), bucket_bytes // wire.element_size()):
                self._buckets.append(wire[s:e])
                lo, hi = max(s, HEADER) - HEADER, e - HEADER
                if hi > lo:
                    apply.append((g.device, algorithm.apply(g, lo, hi, data[lo:hi], guard)))
            self._bytes += wire.nbytes
        self._prepare = _by_device(zero + send + publish)
        self._apply_all = _by_device(apply)
        # Gloo (CPU tensors, or CUDA tensors staged through the host): the host waits for the
        # collectives, with a timeout. NCCL only enqueues: the stream waits, the host does not.
        self._host_waits = comm.distributed and (
            groups[0].device.type == "cpu" or dist.get_backend(comm.group) == "gloo")
        # The last exchange's collectives, kept until the next one. Gloo's worker thread drops
        # its reference to a finished collective a moment after wait() returns; if that were the
        # last reference, the thread would release the tensors' Python objects itself, and at
        # interpreter shutdown that kills the process (SIGABRT, "terminate called without an
        # active exception") after a job that finished. Held here, the last reference is ours.
        self._works: list[Any] = []

    # ---- the exchange -------------------------------------------------------------------------------
    @property
    def status(self) -> dict[torch.device, torch.Tensor]:
        """Per device, the status vector the last exchange left (ME_BAD, BAD_RANKS, OVERFLOW)."""
        return self._status

    def exchange(self, clock: int) -> None:
        """One exchange (collective: every rank calls it). Returns once the work is enqueued
        (CUDA with NCCL) or done (CPU); what it did is in ``status``. Every bucket arrives
        before anything is applied, so an exchange that fails (a rank died, froze or stopped
        exchanging) raises :class:`ExchangeError` with the parameters and the center as they
        were."""
        threads = num_threads()
        for device, launches in self._prepare:
            native.run(launches, stream_of(device), threads)
        comm = self._comm
        if comm.distributed:
            if not self._host_waits and torch.cuda.is_current_stream_capturing():
                for w in self._buckets:  # captured into the graph with the kernels
                    dist.all_reduce(w, group=comm.group)
            else:
                self._works = [dist.all_reduce(w, group=comm.group, async_op=True)
                               for w in self._buckets]
                for work in self._works:
                    if self._host_waits:
                        self._wait(work, clock)  # at most exchange_timeout
                    else:
                        work.wait()  # NCCL: makes the current stream wait, not the host
        for device, launches in self._apply_all:
            native.run(launches, stream_of(device), threads)

    def _wait(self, work: Any, clock: int) -> None:
        try:
            work.wait(self._timeout)
        except RuntimeError as exc:
            silent = _dist.unresponsive_ranks(self._comm, f"exchange-{clock}",
                                              grace=min(5.0, self._timeout.total_seconds()))
            who = _dist.describe_silent(silent)  # silent is None: the store did not answer
            raise ExchangeError(
                f"the exchange at clock {clock} failed on rank {self._comm.rank} of "
                f"{self._comm.world_size}: {who}; nothing was applied, so this worker's "
                f"parameters and its center are as before the exchange ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})", clock, silent) from exc

    def bytes_per_exchange(self) -> int:
        """Payload this rank hands to the network per exchange (0 without one)."""
        return self._bytes if self._comm.distributed else 0

    # ---- the center, for evaluation and checkpoints -----------------------------------------------
    def read(self) -> list[torch.Tensor]:
        """This rank's replica, one float32 buffer per group (views: read, do not keep)."""
        return [g.buffers["center"] for g in self._groups]

    def write(self, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for g, v in zip(self._groups, values):
                g.buffers["center"].copy_(v)

    def save(self) -> dict[str, list[torch.Tensor]]:
        """Checkpoint: every rank keeps (and saves) its own replica."""
        return {"center": [c.detach().cpu().clone() for c in self.read()]}

    def load(self, buffers: dict[str, Any]) -> None:
        check_saved("center", buffers.get("center"), self.read())
        self.write(buffers["center"])

    def close(self) -> None:
        pass


def _by_device(launches: list[tuple[torch.device, Any]]) -> list[tuple[torch.device, list[Any]]]:
    """Consecutive launches on one device merged into one native call."""
    runs: list[tuple[torch.device, list[Any]]] = []
    for device, launch in launches:
        if runs and runs[-1][0] == device:
            runs[-1][1].append(launch)
        else:
            runs.append((device, [launch]))
    return runs

