"""What a worker learns about its exchanges, and when.

On CUDA an exchange returns as soon as its work is enqueued, so what it did (was any rank's
contribution non-finite? was this rank reset? did a float16 sum overflow? how long did it
take?) is read later: each exchange leaves a small status vector on the device, copied into
pinned host memory behind an event. :class:`ExchangeLog` reads a record once its event has
completed (at the next exchange, without waiting) or when someone asks for ``stats`` (waiting
then). On the CPU the status is host memory and is read at once.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch

# The status vector every exchange leaves (float32, one per device):
ME_BAD, BAD_RANKS, OVERFLOW = 0, 1, 2
STATUS_LEN = 4
RING = 32  # status records in flight on a GPU before an exchange waits for the oldest


@dataclass
class ExchangeStats:
    """Counters of one worker's exchanges.

    ``exchanges``: exchanges that were applied (with ``fragments=F``, each fragment's exchange
    counts once: F per ``tau`` steps). ``skipped_exchanges``: exchanges that changed nothing
    because some rank's contribution was not finite (``on_nonfinite="skip"`` or ``"raise"``).
    ``resets``: exchanges in which this worker's parameters were not finite and were reset to
    the center (``on_nonfinite="reset"``). ``overflowed_exchanges``: exchanges in which a
    float16 sum overflowed (those elements were left as they were). ``bytes_sent`` is what this
    rank put on the network, by the collectives' standard algorithms: a ring all-reduce sends
    ``2 (p - 1) / p`` of its payload, the 8-bit wire ``p - 1`` records in its all-to-all and its
    own record to ``p - 1`` ranks in its all-gather (0 for a single process); in asynchronous
    mode, what a worker sends to the sharded center's servers (0 with the shared-memory center:
    no network). ``comm_seconds`` is the total time the exchange steps took (kernels,
    collectives and waits: what communication costs the loop; with ``delay``, the send and the
    apply steps, not the collective running meanwhile); on CUDA it is measured with events,
    without synchronizing the device. ``wait_seconds``, part of it, is the time the host waited
    for collectives still running (synchronous mode over Gloo; 0 with NCCL, where the stream
    waits instead, and in asynchronous mode): the rest is the kernels and the launches.
    ``failures_survived``: synchronous exchanges that failed because ranks died, froze or left,
    after which this rank went on with the survivors (``on_failure="continue"``);
    ``workers_joined``: processes admitted into the group while it ran (an elastic job, see
    :func:`easgd_ext.init_process_group`).
    """
    exchanges: int = 0
    skipped_exchanges: int = 0
    resets: int = 0
    overflowed_exchanges: int = 0
    bytes_sent: int = 0
    comm_seconds: float = 0.0
    last_exchange_seconds: float = 0.0
    wait_seconds: float = 0.0
    failures_survived: int = 0
    workers_joined: int = 0


@dataclass
class Outcome:
    """What one exchange did, as this rank learns it."""
    clock: int
    bad_ranks: int = 0        # ranks whose contribution was not finite
    me_bad: bool = False      # this rank's was not
    overflow: bool = False    # a float16 sum overflowed somewhere
    applied: bool = True      # anything was applied at all


class NonFiniteError(RuntimeError):
    """``on_nonfinite="raise"``: an exchange met a non-finite contribution and changed nothing."""


class _Timer:
    """Wall time on the CPU; CUDA events on the GPU, read only when someone asks. The events go
    on the current stream of the parameters' device (not of the current device: with parameters
    on cuda:1 and device 0 current, that is where the exchange runs)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.device = device
            with torch.cuda.device(device):
                self.start_event = torch.cuda.Event(enable_timing=True)
                self.end_event = torch.cuda.Event(enable_timing=True)
            self.start_event.record(torch.cuda.current_stream(device))
        else:
            self.start = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self.end_event.record(torch.cuda.current_stream(self.device))
        else:
            self.seconds = time.perf_counter() - self.start

    def ready(self) -> bool:
        return not self.cuda or self.end_event.query()

    def elapsed(self) -> float:
        if self.cuda:
            self.end_event.synchronize()
            return self.start_event.elapsed_time(self.end_event) / 1e3
        return self.seconds


@dataclass
class _Item:
    """One exchange record waiting to be read."""
    clock: int
    status: Any                   # numpy view of the pinned host copy, or None: outcome known
    done: torch.cuda.Event | None
    outcome: Outcome | None       # known at once (CPU tensors, asynchronous centers)
    bytes_sent: int
    wait_seconds: float


@dataclass
class _Pending:
    """One step's (or exchange()'s) work: its time and the records it completed."""
    timer: _Timer
    items: list[_Item]


class ExchangeLog:
    """The exchanges in flight and the counters of those read back. ``on_outcome`` decides
    what an outcome means for the user (warnings, errors, resetting an optimizer)."""

    def __init__(self, on_outcome: Callable[[Outcome], None], skips_on_bad: bool) -> None:
        self.stats = ExchangeStats()
        # A bound method is held weakly: the averager owns this log, and a cycle would keep it
        # (and its process group) alive until a garbage collection, at exit if no earlier.
        self._on_outcome_ref = (weakref.WeakMethod(on_outcome) if hasattr(on_outcome, "__self__")
                                else lambda: on_outcome)
        self.skips_on_bad = skips_on_bad  # a non-finite contribution stops the whole exchange
        self._pending: deque[_Pending] = deque()
        self._host_status: torch.Tensor | None = None  # pinned ring, made on first CUDA use
        self._slot = 0
        self._slots_in_use = 0

    def start(self, device: torch.device) -> _Timer:
        self.poll()  # read whatever has finished meanwhile, never waiting
        return _Timer(device)

    def finish(self, records: list[Any], timer: _Timer) -> None:
        """Records a step's exchanges from their
        :class:`~easgd_ext.centers.base.ExchangeRecord`s: an outcome known at once is reported
        now; a CUDA status vector is copied to pinned memory behind an event and read when that
        event has completed. The step's time counts even where nothing completed (a delayed
        exchange's send)."""
        timer.stop()
        cuda = sum(r.outcome is None and r.status is not None for r in records)
        while self._pending and self._slots_in_use + cuda > RING:
            self._resolve(self._pending.popleft())  # the oldest waits: its slots are reused
        items = []
        for r in records:
            host, done = None, None
            if r.outcome is None and r.status is not None:
                host, done = self._copy_status(r.status)
            items.append(_Item(r.clock, host, done, r.outcome, r.bytes_sent, r.wait_seconds))
        self._pending.append(_Pending(timer, items))
        self.poll()  # what is known already (CPU, asynchronous mode) is reported now

    def poll(self) -> None:
        while self._pending and self._ready(self._pending[0]):
            self._resolve(self._pending.popleft())

    def drain(self) -> ExchangeStats:
        """Waits for every exchange in flight and returns the counters."""
        while self._pending:
            self._resolve(self._pending.popleft())
        return self.stats

    def reset(self, stats: ExchangeStats) -> None:
        self._pending.clear()
        self._slots_in_use = 0
        self.stats = stats

    # ---- internals --------------------------------------------------------------------------------
    def _copy_status(self, status: torch.Tensor) -> tuple[Any, torch.cuda.Event]:
        if self._host_status is None:
            self._host_status = torch.zeros((RING + 1, STATUS_LEN), pin_memory=True)
            self._host_view = self._host_status.numpy()
        slot = self._slot
        self._slot = (self._slot + 1) % (RING + 1)  # RING + 1 slots: the oldest is read first
        self._slots_in_use += 1
        # On the status's own device's stream, after the steps that wrote it (whatever device
        # is current), and the event with it: what is read then has arrived.
        with torch.cuda.device(status.device):
            stream = torch.cuda.current_stream(status.device)
            self._host_status[slot].copy_(status, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        return self._host_view[slot], done

    @staticmethod
    def _ready(p: _Pending) -> bool:
        return p.timer.ready() and all(i.done is None or i.done.query() for i in p.items)

    def _resolve(self, p: _Pending) -> None:
        seconds = p.timer.elapsed()
        s = self.stats
        s.comm_seconds += seconds
        if p.items:
            s.last_exchange_seconds = seconds
        for item in p.items:
            if item.done is not None:
                item.done.synchronize()
                self._slots_in_use -= 1
            outcome = item.outcome if item.outcome is not None else outcome_of(
                item.clock, item.status, self.skips_on_bad)
            s.bytes_sent += item.bytes_sent
            s.wait_seconds += item.wait_seconds
            if outcome.applied:
                s.exchanges += 1
            else:
                s.skipped_exchanges += 1
            s.resets += int(outcome.applied and outcome.me_bad)
            s.overflowed_exchanges += int(outcome.overflow)
            on_outcome = self._on_outcome_ref()
            if on_outcome is not None:
                on_outcome(outcome)


def outcome_of(clock: int, status: Any, skips_on_bad: bool) -> Outcome:
    """An :class:`Outcome` from a status vector in host memory (a numpy view). With a skipping
    policy an exchange with a bad rank applied nothing; the resetting one applied the healthy
    ranks' part and reset the bad ones."""
    me_bad, bad, overflow = float(status[ME_BAD]), float(status[BAD_RANKS]), float(status[OVERFLOW])
    return Outcome(clock, bad_ranks=int(bad), me_bad=me_bad != 0, overflow=overflow != 0,
                   applied=bad == 0 or not skips_on_bad)


class Throttle:
    """Warns the 1st, 2nd, 4th, 8th, ... time something happens, so a recurring problem is
    reported without flooding a long run's log."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> bool:
        self.count += 1
        return self.count & (self.count - 1) == 0


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def ring_allreduce_bytes(payload: int, world: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``payload`` bytes: ``2 (p - 1) / p`` of it
    (reduce-scatter, then all-gather); 0 alone. The one formula every byte count here uses."""
    return 2 * (world - 1) * payload // world if world > 1 else 0


def warn_user(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` pointing at the first frame outside easgd_ext and torch: the user's
    ``avg.step()`` or ``opt.step()`` line, not a line of this package."""
    frame = sys._getframe(1)
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
            (_PACKAGE_DIR, _TORCH_DIR)):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
