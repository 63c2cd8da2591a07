"""What every synchronous averager shares: the clock, flat buffers, the bucketed all-reduce
with its skip-on-non-finite rule, statistics, the center swap for evaluation, checkpoints.

A subclass names its algorithm, the buffers it keeps, and two fused kernels: ``_prepare``
fills the wire buffer from the parameters (reading, never writing, the parameters), and
``_apply`` consumes the all-reduced wire for one bucket. Because nothing a worker trains with
is written before the all-reduce, an exchange can be skipped cleanly on every rank.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch
import torch.distributed as dist

from . import _dist, ops
from .flat_params import FlatGroup, bucket_ranges, collect_parameters, flatten, layout_of

STATE_FORMAT = 1
COMM_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class ExchangeStats:
    """Counters of one worker's exchanges.

    ``bytes_sent`` is the payload this rank hands to its all-reduces (a ring all-reduce puts
    about ``2 (p - 1) / p`` times that on the wire); in asynchronous mode, what a worker sends
    to the sharded center's servers (0 with the shared-memory center: no network). ``comm_seconds`` is the total time spent
    in exchanges (kernels, all-reduce and waits: what communication costs the loop); on CUDA it
    is measured with events, without synchronizing the device.
    """
    exchanges: int = 0
    skipped_exchanges: int = 0
    bytes_sent: int = 0
    comm_seconds: float = 0.0
    last_exchange_seconds: float = 0.0


def check_tau(tau: object) -> int:
    if isinstance(tau, bool) or not isinstance(tau, int):
        raise TypeError(f"tau must be an int (local steps between exchanges), got {type(tau).__name__}")
    if tau < 1:
        raise ValueError(f"tau must be >= 1 (local steps between exchanges), got {tau}")
    return tau


def check_comm_dtype(comm_dtype: object) -> torch.dtype | None:
    if comm_dtype is None or isinstance(comm_dtype, torch.dtype) and comm_dtype in COMM_DTYPES.values():
        return comm_dtype
    if isinstance(comm_dtype, str) and comm_dtype in COMM_DTYPES:
        return COMM_DTYPES[comm_dtype]
    raise ValueError(f"comm_dtype must be None (the parameters' dtype), torch.float32, "
                     f"torch.bfloat16 or torch.float16, got {comm_dtype!r}")


def check_bucket_cap_mb(bucket_cap_mb: object) -> float:
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)):
        raise TypeError(f"bucket_cap_mb must be a number, got {type(bucket_cap_mb).__name__}")
    if not 0 < bucket_cap_mb < float("inf"):
        raise ValueError(f"bucket_cap_mb must be positive and finite, got {bucket_cap_mb}")
    return float(bucket_cap_mb)


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


class _Timer:
    """Wall time on the CPU; CUDA events on the GPU, read only when someone asks."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.end_event = torch.cuda.Event(enable_timing=True)
            self.start_event.record()
        else:
            self.start = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self.end_event.record()
        else:
            self.seconds = time.perf_counter() - self.start

    def elapsed(self) -> float:
        if self.cuda:
            self.end_event.synchronize()
            return self.start_event.elapsed_time(self.end_event) / 1e3
        return self.seconds


class SyncAverager:
    """Base of :class:`ElasticAverager`, :class:`DownpourAverager` and :class:`PeriodicAverager`
    in synchronous mode. Not used directly."""

    algorithm: ClassVar[str] = ""
    state_buffers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Iterable[torch.Tensor], comm: _dist.Comm, tau: object,
                 comm_dtype: object, bucket_cap_mb: object,
                 check_settings: Callable[[], dict[str, Any]]) -> None:
        self._comm = comm

        def build() -> dict[str, Any]:
            settings = {"tau": check_tau(tau),
                        "comm_dtype": dtype_name(check_comm_dtype(comm_dtype)),
                        **check_settings()}
            self._bucket_bytes = int(check_bucket_cap_mb(bucket_cap_mb) * 2**20)
            self._params = collect_parameters(params)
            return {"algorithm": self.algorithm, "settings": settings,
                    "bucket_cap_mb": bucket_cap_mb, "layout": layout_of(self._params)}

        self._start(comm, _dist.agree(comm, build))
        self.comm_dtype: torch.dtype | None = check_comm_dtype(self._settings["comm_dtype"])
        for g in self._groups:
            wire_dtype = self.comm_dtype or g.dtype
            g.buffers["wire"] = torch.empty(g.flat.numel(), dtype=wire_dtype, device=g.device)
            self._init_buffers(g)
        self._buckets = [bucket_ranges(g.flat.numel(), self._bucket_bytes // g.buffers["wire"].element_size())
                         for g in self._groups]
        # A float16 sum of finite values can overflow; other wire dtypes have float32's range.
        self._check_reduced = any(g.buffers["wire"].dtype == torch.float16 for g in self._groups)

    def _start(self, comm: _dist.Comm, agreed: dict[str, Any]) -> None:
        """What every averager holds once the ranks agree: settings, clock, statistics, and the
        parameters in flat buffers holding rank 0's values (workers and center start equal)."""
        self._settings: dict[str, Any] = agreed["settings"]
        self._layout: list[str] = agreed["layout"]
        self.tau: int = self._settings["tau"]
        self.clock = 0
        self._stats = ExchangeStats()
        self._pending: list[_Timer] = []
        self._in_center = False
        self._groups: list[FlatGroup] = flatten(self._params)
        _dist.broadcast_from_first(comm, [g.flat for g in self._groups])

    # ---- what subclasses provide -------------------------------------------------------------
    def _init_buffers(self, group: FlatGroup) -> None:
        """Allocate and initialize the algorithm's buffers (called after the broadcast)."""

    def _prepare(self, group: FlatGroup, start: int, end: int) -> None:
        raise NotImplementedError

    def _apply(self, group: FlatGroup, start: int, end: int) -> None:
        raise NotImplementedError

    def _center_of(self, group: FlatGroup) -> torch.Tensor | None:
        return group.buffers.get("center")

    def _centers(self) -> list[torch.Tensor | None]:
        """The center, one tensor per group (``None`` entries: no center)."""
        return [self._center_of(g) for g in self._groups]

    def _state_tensors(self, name: str) -> list[torch.Tensor]:
        return [g.buffers[name] for g in self._groups]

    def _load_state_tensors(self, name: str, saved: list[torch.Tensor]) -> None:
        for s, g in zip(saved, self._groups):
            g.buffers[name].copy_(s)

    def _bytes_per_exchange(self, skipped: bool) -> int:
        """Payload this rank handed to the network in this exchange (0 without one; a skipped
        synchronous exchange still all-reduced its buckets)."""
        if not self._comm.distributed:
            return 0
        return 4 + sum(g.buffers["wire"].nbytes for g in self._groups)

    # ---- the loop-facing surface ---------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self._comm.world_size

    @property
    def stats(self) -> ExchangeStats:
        """Counters so far (reading them waits for the GPU timing of finished exchanges)."""
        for timer in self._pending:
            seconds = timer.elapsed()
            self._stats.comm_seconds += seconds
            self._stats.last_exchange_seconds = seconds
        self._pending.clear()
        return self._stats

    def step(self) -> bool:
        """Call once after every local optimizer step: advances the clock and exchanges when it
        reaches a multiple of ``tau``. Returns whether an exchange took place (``False`` also
        when a due exchange was skipped for a non-finite value)."""
        self.clock += 1
        return self.exchange() if self.clock % self.tau == 0 else False

    def exchange(self) -> bool:
        """Exchange now, whatever the clock says (for loops that count ``tau`` themselves).
        Collective: every rank of the group must call it. Returns ``False`` if the exchange was
        skipped on every rank because some rank's contribution was not finite."""
        if self._in_center:
            raise RuntimeError("exchange() inside center_parameters(): the model holds the "
                               "center; leave the with-block first")
        timer = _Timer(self._groups[0].device)
        works: list[tuple[FlatGroup, int, int, Any]] = []
        group = self._comm.group
        finite: list[torch.Tensor] = []
        # Each bucket goes on the wire as soon as its difference is written and checked, so
        # the first buckets travel while the later ones are computed. The check must come
        # before the launch: the all-reduce overwrites the wire in place.
        for g, ranges in zip(self._groups, self._buckets):
            g.repoint()
            for s, e in ranges:
                self._prepare(g, s, e)
                finite.append(self._finite(g.buffers["wire"][s:e]))
                if self._comm.distributed:
                    works.append((g, s, e, dist.all_reduce(g.buffers["wire"][s:e], group=group,
                                                           async_op=True)))
        flag = (~torch.stack(finite).all()).to(torch.float32).reshape(1)
        locally_bad = flag.clone()  # the all-reduce overwrites flag; the warning wants ours
        if self._comm.distributed:
            dist.all_reduce(flag, group=group)
        bad_ranks = int(flag.item())
        if bad_ranks == 0 and self._check_reduced:
            for *_, work in works:
                work.wait()
            if not bool(self._wire_finite()):
                self._skip("the float16 sum over ranks overflowed (try comm_dtype=torch.bfloat16)",
                           works, timer)
                return False
        if bad_ranks:
            here = "yes" if locally_bad.item() else "no"
            self._skip(f"non-finite values on {bad_ranks} of {self.world_size} ranks "
                       f"(this rank: {here})", works, timer)
            return False
        if works:
            for g, s, e, work in works:
                work.wait()
                self._apply(g, s, e)
        else:
            for g in self._groups:
                self._apply(g, 0, g.flat.numel())
        self._finish(timer, skipped=False)
        return True

    def center_state(self) -> list[torch.Tensor]:
        """This rank's replica of the center: one float32 flat buffer per (device, dtype) group of
        parameters, in order of first appearance (empty for :class:`PeriodicAverager`). Read
        them; to evaluate the center use :meth:`center_parameters`."""
        centers = self._centers()
        return [] if centers[0] is None else [c.detach() for c in centers]

    @contextlib.contextmanager
    def center_parameters(self) -> Iterator[None]:
        """Within the block the model's parameters hold this rank's replica of the center (rounded
        to the parameters' dtype), e.g. for evaluation; on leaving, the worker's own values come
        back exactly. Local: no communication, so it may be used on one rank only."""
        centers = self._centers()
        if self._in_center:
            raise RuntimeError("center_parameters() is already active")
        stash = []
        with torch.no_grad():
            for g, c in zip(self._groups, centers):
                g.repoint()
                stash.append(g.flat.clone())
                if c is not None:
                    g.flat.copy_(c)
        self._in_center = True
        try:
            yield
        finally:
            self._in_center = False
            with torch.no_grad():
                for g, saved in zip(self._groups, stash):
                    g.repoint()
                    g.flat.copy_(saved)

    # ---- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Clock, statistics, settings and the algorithm's buffers (the center replica, ...), on
        the CPU. With the model's and optimizer's own state dicts, enough to resume exactly."""
        return {
            "algorithm": self.algorithm, "format": STATE_FORMAT, "world_size": self.world_size,
            "clock": self.clock, "settings": dict(self._settings), "layout": list(self._layout),
            "stats": asdict(self.stats),
            "buffers": {name: [t.detach().cpu().clone() for t in self._state_tensors(name)]
                        for name in self.state_buffers},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` saved. Build the averager first (it broadcasts rank
        0's parameters), then load the model's, optimizer's and this state, in any order."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        missing = {"algorithm", "format", "world_size", "clock", "settings", "layout", "stats",
                   "buffers"} - state.keys()
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}; is it from state_dict()?")
        expected = {"algorithm": self.algorithm, "format": STATE_FORMAT,
                    "world_size": self.world_size, "layout": self._layout}
        for key, want in expected.items():
            if state[key] != want:
                raise ValueError(f"state {key} is {_short(state[key])}, this averager has {_short(want)}")
        for key, want in self._settings.items():
            if state["settings"].get(key) != want:
                raise ValueError(f"state was saved with {key}={state['settings'].get(key)!r}, this "
                                 f"averager has {key}={want!r}")
        buffers = state["buffers"]
        for name in self.state_buffers:
            saved = buffers.get(name)
            if saved is None or len(saved) != len(self._groups) or any(
                    s.shape != g.flat.shape for s, g in zip(saved, self._groups)):
                raise ValueError(f"state buffer {name!r} does not match this averager's layout")
        with torch.no_grad():
            for name in self.state_buffers:
                self._load_state_tensors(name, buffers[name])
        self.clock = int(state["clock"])
        self._pending.clear()
        self._stats = ExchangeStats(**state["stats"])

    # ---- internals --------------------------------------------------------------------------------
    def _finite(self, wire: torch.Tensor) -> torch.Tensor:
        """A 0-dim bool on the first group's device: no Inf or NaN in ``wire`` (on CUDA computed
        on the device, without synchronizing)."""
        device = self._groups[0].device
        if wire.is_cuda:
            return torch.isfinite(wire).all().to(device)
        return torch.tensor(ops.count_nonfinite(wire) == 0, device=device)

    def _wire_finite(self) -> torch.Tensor:
        return torch.stack([self._finite(g.buffers["wire"]) for g in self._groups]).all()

    def _skip(self, why: str, works: list, timer: _Timer) -> None:
        for *_, work in works:
            work.wait()
        self._finish(timer, skipped=True)
        warnings.warn(f"{type(self).__name__}: skipped exchange at clock {self.clock}: {why}; "
                      "parameters and center are left as they were", RuntimeWarning, stacklevel=3)

    def _finish(self, timer: _Timer, skipped: bool) -> None:
        timer.stop()
        self._pending.append(timer)
        if skipped:
            self._stats.skipped_exchanges += 1
        else:
            self._stats.exchanges += 1
        self._stats.bytes_sent += self._bytes_per_exchange(skipped)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
