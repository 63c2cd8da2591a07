"""The synchronous center: a float32 replica on every rank, kept identical because every rank
applies the same reduced bytes.

One exchange of a fragment (the whole model by default; see :mod:`.fragments`), all of it
enqueued on the current stream with no host synchronization:

1. zero the fragment's status vector; the rule's send step writes each piece's contribution
   onto its wire and sets ``status[ME_BAD]`` where a stored value is Inf/NaN;
2. a publish step copies that flag into the wire's header and, if it is set, withdraws the
   rank's contribution (zeros);
3. the collectives (:mod:`.wires`): one all-reduce per bucket, the header in the first bucket,
   so after the sum it holds how many ranks flagged; or, for the 8-bit wire, an all-to-all,
   the owners' float32 sums re-quantized, and an all-gather, the count in every header;
4. once everything has arrived, the apply steps read that count on the device and decide
   there: skip the fragment's exchange (``on_nonfinite="skip"``/``"raise"``), or apply the
   healthy ranks' sum and reset the flagged rank to the center (``"reset"``). A float16 sum
   that overflowed leaves those elements alone on every rank alike and sets
   ``status[OVERFLOW]``.

With ``delay=k`` a fragment sent at clock ``t`` is completed and applied at ``t + k``: its
collectives run while the loop computes (with NCCL the compute stream waits for them only at
``t + k``: a quantized wire's owner reduce and all-gather run on a side stream that waits for
the all-to-all; with Gloo the host waits then, if they are not done). Everything is built once here
(views, wire slices, launches), so an exchange costs a few native calls and its collectives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, ClassVar

import torch

from .. import _dist
from ..algorithms import Algorithm, SyncRule
from ..dtensor_params import replica_groups, smallest_layout
from ..flat_params import ALIGN_ELEMENTS, ParamGroup, check_saved, is_dtensor
from ..settings import (DEFAULT_BUCKET_CAP_MB, DEFAULT_EXCHANGE_TIMEOUT, DEFAULT_ON_FAILURE,
                        FAILURE_POLL_SECONDS, POLICY_CODES, check_bucket_cap_mb, check_comm_dtype,
                        check_delay, check_exchange_timeout, check_fragments, check_gloo_chunk_bytes,
                        check_on_failure, dtype_name, quant_bits)
from ..stats import outcome_of
from .base import Center, CenterSpec, ExchangeRecord, ExchangeSettings
from .fragments import FragmentPlan, due, plan_fragments
from .wires import FloatWire, QuantizedWire, Wire


class ExchangeError(RuntimeError):
    """A synchronous exchange could not complete: another rank died, froze (no progress within
    ``exchange_timeout``) or stopped exchanging. ``clock`` is the exchange's, ``silent_ranks``
    the group ranks that did not report the failure themselves within a few seconds (``None``:
    unknown, the process group's store did not answer)."""

    def __init__(self, message: str, clock: int, silent_ranks: list[int] | None) -> None:
        super().__init__(message)
        self.clock = clock
        self.silent_ranks = silent_ranks


@dataclass
class InFlight:
    """A fragment's exchange between its send and its apply."""
    fragment: int
    sent_at: int
    due_at: int
    works: list[Any] = field(default_factory=list)
    gathered: bool = False  # the wire's second phase (Wire.gather) has started
    wait_seconds: float = 0.0  # the host's wait for its collectives (Gloo), as stats names it


@dataclass(frozen=True)
class Replicated(CenterSpec):
    """The center of ``mode="sync"``: a float32 replica on every rank of the process group,
    exchanged by collectives (an all-reduce per bucket; an all-to-all and an all-gather on a
    quantized wire). ``center=Replicated(comm_dtype=torch.int8, fragments=8, delay=1)`` is the
    averagers' ``comm_dtype=torch.int8, fragments=8, delay=1``; the arguments are documented
    there (:class:`~easgd_ext.ElasticAverager`).

    ``gloo_chunk_bytes``: the quantized wire's piece per peer over Gloo (``None``:
    ``EASGD_EXT_GLOO_CHUNK_BYTES``, else 64 KiB; about 1 MiB suits a 1 Gbit/s link); every
    rank must choose the same."""

    comm_dtype: torch.dtype | str | None = None
    fragments: int = 1
    delay: int = 0
    bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB
    exchange_timeout: float = DEFAULT_EXCHANGE_TIMEOUT
    on_failure: str = DEFAULT_ON_FAILURE
    gloo_chunk_bytes: int | None = None

    mode: ClassVar[str] = "sync"

    def checked(self, comm: _dist.Comm, params: list[torch.Tensor],
                settings: ExchangeSettings) -> Replicated:
        sharded = is_dtensor(params[0])
        comm_dtype = check_comm_dtype(self.comm_dtype)
        bits = quant_bits(comm_dtype)
        if sharded and bits:
            raise ValueError(
                f"comm_dtype={comm_dtype} with DTensor parameters (a sharded model): the "
                "quantized wire's blocks of 256 values would straddle the local shards; use "
                "comm_dtype=torch.bfloat16 (half the bytes of float32)")
        if self.gloo_chunk_bytes is not None and not bits:
            raise ValueError(f"gloo_chunk_bytes applies to the quantized wires (comm_dtype="
                             f"torch.int8, torch.int4 or torch.int2), not comm_dtype={comm_dtype}")
        fragments = check_fragments(self.fragments)
        delay = check_delay(self.delay, settings.tau)
        if sharded:
            _check_sharded_fragments(params, fragments)
        bucket_cap_mb = check_bucket_cap_mb(self.bucket_cap_mb)  # None: the default
        exchange_timeout = check_exchange_timeout(self.exchange_timeout)
        chunk = check_gloo_chunk_bytes(self.gloo_chunk_bytes) if bits else None
        on_failure = check_on_failure(self.on_failure)
        if on_failure == "continue" and comm.distributed and not comm.host_waits(params[0].device):
            raise ValueError(
                "on_failure='continue' over NCCL is not supported yet: NCCL's collectives fail "
                "on the device, out of the host's sight; use a Gloo group for the averager "
                "(CUDA tensors are staged through the host) or on_failure='raise'")
        if sharded and on_failure == "continue":
            raise ValueError(
                "on_failure='continue' with DTensor parameters (a sharded model) is not "
                "supported yet: a replica that loses one shard rank must leave whole; use "
                "on_failure='raise' and resume from a checkpoint")
        # gloo_chunk_bytes: the pieces must be cut alike on every rank (see agreed)
        return replace(self, comm_dtype=comm_dtype, fragments=fragments, delay=delay,
                       bucket_cap_mb=bucket_cap_mb, exchange_timeout=exchange_timeout,
                       on_failure=on_failure, gloo_chunk_bytes=chunk)

    def workers(self, comm: _dist.Comm) -> int:
        return comm.world_size

    def settings(self) -> dict[str, Any]:
        return {"comm_dtype": dtype_name(self.comm_dtype), "fragments": self.fragments,
                "delay": self.delay}

    def agreed(self) -> dict[str, Any]:
        return {"gloo_chunk_bytes": self.gloo_chunk_bytes, "on_failure": self.on_failure}

    def check_rule(self, algorithm: Algorithm, averager: str) -> None:
        if self.delay and not algorithm.sync.supports_delay:
            raise ValueError(f"delay={self.delay}: {averager} cannot apply a sum steps after its "
                             "send (its pull would discard the steps taken since); use delay=0, "
                             "or ElasticAverager or DiLoCoAverager, whose pulls keep them")
        if quant_bits(self.comm_dtype) and not algorithm.sync.quantizable:
            raise ValueError(f"comm_dtype={self.comm_dtype}: {averager} has no quantized wire "
                             f"({algorithm.sync.no_int8}); use torch.bfloat16")

    def build(self, comm: _dist.Comm, groups: list[ParamGroup], params: list[torch.Tensor],
              algorithm: Algorithm, settings: ExchangeSettings) -> ReplicatedCenter:
        return ReplicatedCenter(comm, groups, params, algorithm, self, settings)


def _check_sharded_fragments(params: list[torch.Tensor], fragments: int) -> None:
    """Every rank of a replica must cut its shards into the same number of fragments (each
    fragment's verdict is shared with the replica's other ranks): the smallest rank's layout,
    worked out from the global shapes, must hold ``fragments`` runs."""
    runs = smallest_layout(params) // ALIGN_ELEMENTS
    if runs == 0:
        raise ValueError("DTensor parameters: a rank of the replica holds no element of the model "
                         "(every local shard empty); shard over fewer ranks")
    if fragments > runs:
        raise ValueError(f"fragments={fragments} with DTensor parameters: the smallest rank's "
                         f"local shards hold only {runs} runs of {ALIGN_ELEMENTS} elements; use "
                         f"fragments <= {runs}")


class ReplicatedCenter(Center):
    """The center of ``mode="sync"``: replicated on every rank, exchanged by collectives."""

    def __init__(self, comm: _dist.Comm, groups: list[ParamGroup], params: list[torch.Tensor],
                 algorithm: Algorithm, spec: Replicated, settings: ExchangeSettings) -> None:
        self._comm = comm
        self._groups = groups
        self._timeout = timedelta(seconds=spec.exchange_timeout)
        # on_failure="continue": the averager re-forms the group; a rank whose collective
        # hangs on a peer that failed elsewhere learns it from the store within a poll.
        self._survives = spec.on_failure == "continue" and comm.distributed
        self._skips_on_bad = settings.on_nonfinite != "reset"
        self.workers = comm.world_size
        self.tau, self.delay = settings.tau, spec.delay
        rule: SyncRule = algorithm.sync
        bits = quant_bits(spec.comm_dtype)
        policy = POLICY_CODES[settings.on_nonfinite]
        # Saved beside the center: the rule's own (an outer momentum) and the 8-bit residuals.
        self._residuals: dict[str, list[torch.Tensor]] = {
            **{name: [] for name in algorithm.center_buffers}, "residual": [], "server_residual": []}
        for g in groups:
            if algorithm.has_center:
                g.buffers["center"] = g.read_x().to(torch.float32, copy=True)
            for name in algorithm.center_buffers:
                g.buffers[name] = torch.zeros(g.numel, device=g.device)
                self._residuals[name].append(g.buffers[name])
            algorithm.init_buffers(g)
            if bits:  # what the quantized wire has not delivered yet, fed back into the next send
                g.buffers["residual"] = torch.zeros(g.numel, device=g.device)
                self._residuals["residual"].append(g.buffers["residual"])
        self.plans: list[FragmentPlan] = plan_fragments(groups, spec.fragments, self.tau)
        # Gloo (CPU tensors, or CUDA tensors staged through the host): the host waits for the
        # collectives, with a timeout. NCCL only enqueues: the stream waits, the host does not.
        self._cuda = groups[0].device.type == "cuda"
        self._host_waits = comm.host_waits(groups[0].device)
        chunk = spec.gloo_chunk_bytes if self._host_waits else None
        torch_path = settings.kernels == "torch"
        # DTensor parameters: the other ranks of this replica share the non-finite verdict.
        verdict_groups = replica_groups(params) if is_dtensor(params[0]) else []
        self.wires: list[Wire] = [
            QuantizedWire(p, rule, comm, policy, self.delay > 0, self._residuals, bits, chunk,
                          torch_path) if bits else
            FloatWire(p, rule, comm, spec.comm_dtype, int(spec.bucket_cap_mb * 2**20), policy,
                      self.delay > 0, torch_path, verdict_groups)
            for p in self.plans]
        self._in_flight: list[InFlight] = []
        self._send_phases = {p.offset % self.tau for p in self.plans}
        self._host_status = [{d: s.numpy() for d, s in w.status.items() if d.type == "cpu"}
                             for w in self.wires]
        # The last exchanges' collectives, kept until the next ones. Gloo's worker thread drops
        # its reference to a finished collective a moment after wait() returns; if that were the
        # last reference, the thread would release the tensors' Python objects itself, and at
        # interpreter shutdown that kills the process (SIGABRT, "terminate called without an
        # active exception") after a job that finished. Held here, the last reference is ours.
        self._works: list[Any] = []
        self._side: torch.cuda.Stream | None = None  # made on the first delayed NCCL exchange

    # ---- the schedule --------------------------------------------------------------------------------
    def due(self, clock: int) -> bool:
        """Whether step ``clock`` has anything to do (send, move on or complete a fragment)."""
        return clock % self.tau in self._send_phases or any(
            f.due_at <= clock or (not f.gathered and f.sent_at + 1 == clock) for f in self._in_flight)

    def advance(self, clock: int) -> list[ExchangeRecord]:
        """Step ``clock``: completes the fragments due now (sent ``delay`` steps ago), moves on
        8-bit exchanges sent one step ago, then sends the fragments due now (completing them at
        once without a delay). Raises :class:`ExchangeError` where a collective failed: those
        fragments are dropped with nothing of them applied."""
        records = self._complete([f for f in self._in_flight if f.due_at <= clock])
        if self._host_waits:
            # The host runs the 8-bit exchange's middle step one step after the send (its
            # collective has had a step to arrive): at the same clock on every rank, so the
            # collectives stay in the same order everywhere.
            for f in self._in_flight:
                if not f.gathered and f.sent_at + 1 == clock:
                    self._gather(f)
        for plan in self.plans:
            if due(plan.offset, clock, self.tau):
                self._start(plan.index, clock, clock + self.delay)
        return records + self._complete([f for f in self._in_flight if f.due_at <= clock])

    def exchange(self, clock: int) -> list[ExchangeRecord]:
        """Every fragment now, applied before returning (what is in flight first)."""
        records = self.flush(clock)
        for plan in self.plans:
            self._start(plan.index, clock, clock)
        return records + self._complete(list(self._in_flight))

    def flush(self, clock: int) -> list[ExchangeRecord]:
        """Completes and applies every fragment in flight now."""
        return self._complete(list(self._in_flight))

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def bytes_schedule(self) -> list[int]:
        """Bytes this rank sends at each step of a ``tau`` window (steps 1..tau): the peak is
        what the network must carry in one step."""
        out = [0] * self.tau
        for plan, wire in zip(self.plans, self.wires):
            out[(plan.offset - 1) % self.tau] += wire.bytes_sent
        return out

    # ---- one fragment's exchange -------------------------------------------------------------------
    def local_pass(self) -> None:
        """Every fragment's :meth:`Wire.local_pass`: the exchange's kernels without its
        collectives, for benchmarks (it moves the parameters: time with it only)."""
        for wire in self.wires:
            wire.local_pass()

    def _capturing(self) -> bool:
        return self._cuda and not self._host_waits and torch.cuda.is_current_stream_capturing()

    def _start(self, fragment: int, clock: int, due_at: int) -> None:
        f = InFlight(fragment, clock, due_at)
        try:
            f.works = self.wires[fragment].start(self._comm, self._capturing(),
                                                 lambda work: self._wait_work(work, f))
        except ExchangeError:
            self._in_flight = []  # the group is broken: nothing in flight will arrive
            raise
        self._in_flight.append(f)
        if not self._host_waits:  # NCCL: the middle step is stream-ordered, enqueued at once
            self._gather(f)

    def _gather(self, f: InFlight, counted: bool = True) -> None:
        wire = self.wires[f.fragment]
        if type(wire).gather is Wire.gather:
            f.gathered = True
            return
        side = self._side_stream() if f.due_at > f.sent_at and not self._capturing() else None
        if side is None:
            self._wait(f, counted)
            f.works = wire.gather(self._comm, self._capturing(), lambda work: None)
        else:
            # NCCL with a delay: the owner's reduce waits for the all-to-all on a stream of its
            # own, and the all-gather follows it there, so the compute stream waits for neither
            # until the fragment completes (at t + delay, waiting for the all-gather's works,
            # which come after the reduce). The buffers are the wire's own, alive throughout.
            side.wait_stream(torch.cuda.current_stream(side.device))
            with torch.cuda.stream(side):
                self._wait(f, counted)
                f.works = wire.gather(self._comm, False, lambda work: None)
        f.gathered = True

    def _side_stream(self) -> "torch.cuda.Stream | None":
        """NCCL: the stream a delayed quantized exchange's middle step runs on (None elsewhere)."""
        if not self._cuda or self._host_waits:
            return None
        if self._side is None:
            self._side = torch.cuda.Stream(device=self._groups[0].device)
        return self._side

    def _complete(self, due_now: list[InFlight]) -> list[ExchangeRecord]:
        records = []
        for f in due_now:
            try:
                if not f.gathered:
                    self._gather(f)
                self._wait(f)
            except ExchangeError:
                self._in_flight = []  # the group is broken: nothing in flight will arrive
                raise
            self._in_flight.remove(f)
            wire = self.wires[f.fragment]
            wire.finish()
            records.append(self._record(f, wire))
        return records

    def _wait(self, f: InFlight, counted: bool = True) -> None:
        works, f.works = f.works, []
        self._works = works or self._works
        for work in works:
            self._wait_work(work, f, counted)

    def _wait_work(self, work: Any, f: InFlight, counted: bool = True) -> None:
        """Waits for one collective of ``f``: the host, within the exchange timeout, where it
        waits at all (the time counts as the fragment's wait unless ``counted`` is false: a
        checkpoint's); with NCCL the current stream, not the host."""
        if not self._host_waits:
            work.wait()
            return
        start = time.perf_counter()
        try:
            if self._survives:
                self._wait_watching_peers(work, start)
            else:
                work.wait(self._timeout)  # at most exchange_timeout
        except RuntimeError as exc:
            raise self._failure(f.sent_at, exc) from exc
        if counted:
            f.wait_seconds += time.perf_counter() - start

    def _wait_watching_peers(self, work: Any, start: float) -> None:
        """``work.wait`` within the exchange timeout, in slices: between them, whether another
        rank has already found the exchange failed (a ring's far side sees a dead peer only
        through its neighbours, which then wait for nothing)."""
        deadline = start + self._timeout.total_seconds()
        while True:
            left = deadline - time.perf_counter()
            try:
                work.wait(timedelta(seconds=max(1e-3, min(FAILURE_POLL_SECONDS, left))))
                return
            except RuntimeError:
                if work.is_completed() or time.perf_counter() >= deadline:
                    raise  # it failed (or the timeout passed)
            if _dist.peers_reforming(self._comm):
                raise RuntimeError("another rank found this exchange failed")

    def _record(self, f: InFlight, wire: Wire) -> ExchangeRecord:
        # One device decides for the record (a skip covers each device's groups alike).
        device, status = next(iter(wire.status.items()))
        if device.type == "cpu":
            host = self._host_status[f.fragment][device]
            return ExchangeRecord(f.sent_at, wire.bytes_sent, wait_seconds=f.wait_seconds,
                                  outcome=outcome_of(f.sent_at, host, self._skips_on_bad))
        # A copy, in stream order after this fragment's apply: the wire's own vector is zeroed
        # by its next send (a flushed fragment re-sent by exchange()) before the record is read.
        return ExchangeRecord(f.sent_at, wire.bytes_sent, wait_seconds=f.wait_seconds, status=status.clone())

    def _failure(self, clock: int, exc: Exception) -> ExchangeError:
        if self._survives:  # who is left is for the survivors' agreement to find out
            silent, who = None, "the averager goes on with the ranks that report it"
        else:
            silent = _dist.unresponsive_ranks(self._comm, f"exchange-{clock}",
                                              grace=min(5.0, self._timeout.total_seconds()))
            who = _dist.describe_silent(silent)  # silent is None: the store did not answer
        return ExchangeError(
            f"the exchange at clock {clock} failed on rank {self._comm.rank} of "
            f"{self._comm.world_size}: {who}; nothing was applied, so this worker's "
            f"parameters and its center are as before the exchange ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})", clock, silent)

    # ---- the center, for evaluation and checkpoints -----------------------------------------------
    def read(self) -> list[torch.Tensor]:
        """This rank's replica, one float32 buffer per group (views: read, do not keep)."""
        return [g.buffers["center"] for g in self._groups]

    def write(self, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for g, v in zip(self._groups, values):
                g.buffers["center"].copy_(v)

    def save(self) -> dict[str, Any]:
        """Checkpoint: every rank keeps (and saves) its own replica, the 8-bit wire's residuals
        and, for each fragment in flight, its arrived sum and what the send kept (the sums are
        waited for, not applied: a resumed run applies them at the same clock)."""
        # The sums first: moving an 8-bit exchange on updates its owner's residual.
        for f in self._in_flight:
            if not f.gathered:
                self._gather(f, counted=False)
            self._wait(f, counted=False)
        out: dict[str, Any] = {"center": [c.detach().cpu().clone() for c in self.read()]}
        for name, tensors in self._residuals.items():
            if tensors:
                out[name] = [t.detach().cpu().clone() for t in tensors]
        if self._in_flight:
            out["in_flight"] = [
                {"fragment": f.fragment, "sent_at": f.sent_at, "due_at": f.due_at,
                 "buffers": [t.detach().cpu().clone() for t in self._flight_buffers(f.fragment)]}
                for f in self._in_flight]
        return out

    def load(self, buffers: dict[str, Any]) -> None:
        check_saved("center", buffers.get("center"), self.read())
        for name, tensors in self._residuals.items():
            if tensors:
                check_saved(name, buffers.get(name), tensors)
        flights = buffers.get("in_flight", [])
        if not isinstance(flights, list):
            raise ValueError("state buffer 'in_flight' must be a list")
        restored = []
        for item in flights:
            fragment = item.get("fragment") if isinstance(item, dict) else None
            if not isinstance(fragment, int) or not 0 <= fragment < len(self.wires):
                raise ValueError(f"state has an exchange in flight of fragment {fragment!r}, this "
                                 f"averager has {len(self.wires)} fragments")
            check_saved(f"in_flight[{fragment}]", item.get("buffers"), self._flight_buffers(fragment))
            restored.append(item)
        self.write(buffers["center"])
        with torch.no_grad():
            for name, tensors in self._residuals.items():
                for t, saved in zip(tensors, buffers.get(name, [])):
                    t.copy_(saved)
            self._in_flight = []
            for item in restored:
                for t, saved in zip(self._flight_buffers(item["fragment"]), item["buffers"]):
                    t.copy_(saved)
                self._in_flight.append(InFlight(item["fragment"], int(item["sent_at"]),
                                                int(item["due_at"]), [], True))

    def _flight_buffers(self, fragment: int) -> list[torch.Tensor]:
        """What a fragment in flight holds between its send and its apply."""
        wire = self.wires[fragment]
        if isinstance(wire, FloatWire):
            return [t for pair in wire.buffers for t in pair if t is not None] + list(wire.status.values())
        return [t for b in wire.pieces for t in (b["send"], b["gathered"], b.get("keep")) if t is not None] + list(
            wire.status.values())

    def close(self) -> None:
        pass
