"""The averager: the one object a training loop calls. It owns the clock, the flat parameter
buffers, ``step()``/``exchange()``, the statistics, the center swap for evaluation and the
checkpoints; an :mod:`~easgd_ext.algorithms` rule says what an exchange computes, and a center
from :mod:`~easgd_ext.centers` says where the center lives and how the bytes move.
:class:`ElasticAverager`, :class:`DownpourAverager` and :class:`PeriodicAverager` only choose
the algorithm and name its arguments.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import asdict
from typing import Any, Callable, Iterable, Iterator

import torch

from . import _dist, elastic
from .algorithms import Algorithm, Averaging, DiLoCo, Downpour, Elastic, ElasticOuter
from .checkpoint import DCPState
from .centers import Center, CenterSpec, ExchangeError, ExchangeSettings, spec_from_arguments
from .dtensor_params import check_params as check_dtensor_params, shard_groups, shards_of
from .flat_params import ParamGroup, check_saved, collect_parameters, flatten, is_dtensor, layout_of
from .state import check_counter, check_finite_buffers, check_stats
from .settings import (DEFAULT_EXCHANGE_TIMEOUT, DEFAULT_ON_FAILURE, DEFAULT_ON_NONFINITE,
                       DEFAULT_TAU, FAILURE_SETTLE_SECONDS, check_mode, check_on_nonfinite, check_outer, check_tau, check_update_alpha, elastic_rates,
                       kernel_path)
from .shared_center import SharedCenter
from .stats import ExchangeLog, ExchangeStats, NonFiniteError, Outcome, Throttle, warn_user


STATE_FORMAT = 3              # 3: fragments, delay, the 8-bit wire's residuals, exchanges in flight
STATE_FORMATS_READ = (2, 3)
LEGACY_SETTINGS = {"fragments": 1, "delay": 0}  # what format 2 states were saved with


class Averager:
    """Base of :class:`ElasticAverager`, :class:`DownpourAverager`, :class:`PeriodicAverager` and
    :class:`DiLoCoAverager`; build those. ``make_algorithm(p)`` returns the update rule for ``p`` workers."""

    def __init__(self, params: Iterable[torch.Tensor], make_algorithm: Callable[[int], Algorithm], *,
                 tau: int, process_group: Any, on_nonfinite: str, center: Any = None,
                 mode: Any = None, servers: Any = None, lock_timeout: Any = None,
                 sync_only: bool = False, **replicated: Any) -> None:
        """``center``: a :class:`~easgd_ext.centers.CenterSpec`; or the shorthand, ``mode``,
        ``servers``, ``lock_timeout``, the shared-memory segment as ``center`` and the
        :class:`~easgd_ext.Replicated` settings in ``replicated`` (``None``: left out).
        ``sync_only``: the averager takes ``mode="sync"`` centers only."""
        comm = _dist.resolve(process_group)
        self._comm = comm
        chosen: dict[str, Any] = {}

        def build() -> dict[str, Any]:
            if sync_only and center is not None and not (isinstance(center, CenterSpec)
                                                         and center.mode == "sync"):
                raise TypeError(f"center must be a mode='sync' center such as Replicated(...) "
                                f"({type(self).__name__} is synchronous only), got "
                                f"{type(center).__name__}")
            wanted = center.mode if isinstance(center, CenterSpec) else check_mode(
                "sync" if mode is None else mode)
            exchange = ExchangeSettings(tau=check_tau(tau), on_nonfinite=check_on_nonfinite(on_nonfinite),
                                        kernels=kernel_path())
            params_ = collect_parameters(params)
            chosen["sharded"] = sharded = is_dtensor(params_[0])
            if sharded:
                check_dtensor_params(params_, comm, group_given=process_group is not None)
                if wanted == "async":
                    raise ValueError(
                        "mode='async' with DTensor parameters (a sharded model): the "
                        "asynchronous centers exchange whole flat buffers; use mode='sync' (its "
                        "exchange works shard by shard over process_group)")
            spec = spec_from_arguments(mode, center, servers, lock_timeout, replicated)
            settings: dict[str, Any] = {"tau": exchange.tau, "mode": spec.mode,
                                        "on_nonfinite": exchange.on_nonfinite}
            spec = spec.checked(comm, params_, exchange)
            settings.update(spec.settings())
            algorithm = make_algorithm(spec.workers(comm))
            if spec.mode == "async" and algorithm.asynchronous is None:
                raise ValueError(f"{type(self).__name__} has no mode='async': {algorithm.sync_only}")
            spec.check_rule(algorithm, type(self).__name__)
            settings.update(algorithm.settings())
            chosen.update(algorithm=algorithm, params=params_, spec=spec, exchange=exchange)
            # For a sharded model the layout names each local shard (shape, global offset): the
            # ranks of the group must hold the same ones.
            return {"algorithm": algorithm.name, "settings": settings,
                    "layout": shards_of(params_) if sharded else layout_of(params_),
                    **spec.agreed()}

        try:
            agreed = _dist.agree(comm, build)
        except _dist.AgreementError as exc:
            # A layout naming local shards on one rank (see shards_of): not the same shards.
            if str(exc).startswith("ranks disagree: layout[") and ": shard [" in str(exc):
                raise ValueError(
                    "process_group does not match the parameters' mesh: its ranks must hold the "
                    "same local shards of the same DTensor parameters (the replicate "
                    "dimension's group, e.g. process_group=mesh['replicate']), but "
                    f"{str(exc).split(': ', 1)[1]}") from None
            raise
        self._settings: dict[str, Any] = agreed["settings"]
        self._layout: list[str] = agreed["layout"]
        self.algorithm: Algorithm = chosen["algorithm"]
        self.tau: int = self._settings["tau"]
        self.mode: str = self._settings["mode"]
        self.on_nonfinite: str = self._settings["on_nonfinite"]
        self._spec: CenterSpec = chosen["spec"]
        self._exchange_settings: ExchangeSettings = chosen["exchange"]
        self.comm_dtype: torch.dtype | None = self._spec.comm_dtype
        self.lock_timeout: float | None = self._spec.lock_timeout
        self.on_failure: str = self._spec.on_failure
        # An elastic job's default group reconfigures in place (see easgd_ext.elastic).
        self._elastic = (self.on_failure == "continue" and comm.distributed
                         and elastic.covers(comm.group))
        if (self.on_failure == "continue" and comm.distributed and not self._elastic
                and isinstance(comm.group, torch.distributed.ProcessGroup)):
            # Exchanges over a group whose backend gives up after exchange_timeout, so that a
            # collective stuck on a frozen peer does not block the job's end (see the function).
            comm = self._comm = _dist.group_of(_dist.group_ranks(comm), torch.distributed.get_backend(
                comm.group), self._spec.exchange_timeout or DEFAULT_EXCHANGE_TIMEOUT)
        self._make_algorithm = make_algorithm
        self._abandoned: list[Center] = []  # centers of groups left behind after a failure
        self.clock = 0
        self._params: list[torch.Tensor] = chosen["params"]
        self.sharded: bool = chosen["sharded"]
        # Workers and center start from rank 0's parameters (the shared center: from itself).
        # DTensor parameters stay in FSDP's storage: their local shards are laid out in place.
        self._groups = shard_groups(self._params) if self.sharded else flatten(self._params)
        for g in self._groups:
            x = g.read_x()
            _dist.broadcast_from_first(comm, [x])
            g.write_x(x)
        # What an exchange writes in place (autograd's version counters are bumped after it).
        self._written = [t for g in self._groups for t in g.storage_tensors]
        self._center: Center = self._spec.build(comm, self._groups, self._params, self.algorithm,
                                                self._exchange_settings)
        self._log = ExchangeLog(self._on_outcome, skips_on_bad=self.on_nonfinite != "reset")
        self._warned = {"skip": Throttle(), "reset": Throttle(), "others": Throttle(),
                        "overflow": Throttle()}
        self._optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._attached: AttachHandle | None = None
        self._in_center = False
        self._closed = False
        if elastic.joining() and elastic.covers(comm.group):
            self._join_running_job()

    # ---- what the loop sees -------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self._comm.world_size

    @property
    def replica(self) -> int:
        """This rank's replica: its rank in the process group (which has one rank per replica).
        The replicas' models and optimizer states differ (that is what local updates are), so
        a ``torch.distributed.checkpoint`` of them is keyed by it:
        ``{f"replica{avg.replica}": {"model": msd, "optim": osd}, "averager": avg.dcp_state()}``
        (DCP would otherwise keep one replica's copy of each shard: it takes equal keys and
        shards to hold equal values)."""
        return self._comm.rank

    @property
    def workers(self) -> int:
        """p: the workers that exchange with the center (the ranks that are not servers)."""
        return self._center.workers

    @property
    def stats(self) -> ExchangeStats:
        """Counters so far. Reading them waits for the exchanges still running on a GPU."""
        return self._log.drain()

    @property
    def center(self) -> SharedCenter | None:
        """The shared-memory center of ``mode="async"`` on one machine (else ``None``)."""
        return self._center.shared

    @property
    def worker_id(self) -> int | None:
        """This worker's slot in the shared-memory center (else ``None``)."""
        return self._center.worker_id

    @property
    def is_server(self) -> bool:
        """Whether this rank serves a shard of the center (``servers=``): it calls :meth:`serve`."""
        return self._center.is_server

    def flat_parameters(self) -> list[torch.Tensor]:
        """This worker's parameters as the flat buffers they view, one per (device, dtype) group
        in order of first appearance (read them; write through the parameters). For DTensor
        parameters: a copy of this rank's local shards in the same layout as the center's."""
        for g in self._groups:
            g.ensure_views()
        return [g.read_x().detach() for g in self._groups]

    def worker_buffers(self, name: str) -> list[torch.Tensor]:
        """The algorithm's per-group worker state (``"x_last"`` for DOWNPOUR), like
        :meth:`flat_parameters`."""
        if name not in self.algorithm.worker_buffers:
            raise KeyError(f"{type(self).__name__} keeps no {name!r}; it keeps "
                           f"{list(self.algorithm.worker_buffers)}")
        return [g.buffers[name].detach() for g in self._groups]

    def step(self) -> bool:
        """Call once after every local optimizer step (or :meth:`attach` the averager to the
        optimizer): advances the clock and exchanges when it reaches a multiple of ``tau``
        (with ``fragments``: each fragment at its own phase of the ``tau`` steps; with
        ``delay``: its sum applied ``delay`` steps after it was sent). Returns whether this
        step sent or applied anything. Every rank of a synchronous group must call it equally
        often."""
        if self._attached is not None:
            raise RuntimeError(f"{type(self).__name__}.step() on an averager attached to an "
                               "optimizer: it already steps after every optimizer.step(), so "
                               "this would count each step twice; drop avg.step() from the loop "
                               "(or detach: handle.remove())")
        return self._advance_clock()

    def _advance_clock(self) -> bool:
        self._not_on_a_server()
        self.clock += 1
        if self._elastic and self.clock % self.tau == 0:
            self._admit_joiners()
        if not self._center.due(self.clock):
            return False
        try:
            self._run(self._center.advance)
        except ExchangeError as exc:
            self.clock -= 1  # the exchange did not happen: the next step() repeats it
            raise ExchangeError(
                f"{exc}. The clock is back at {self.clock}: the next step() repeats this "
                "step's exchanges (any fragment in flight was dropped, nothing of it applied), "
                "and a checkpoint taken now (model, optimizer, averager) resumes consistently",
                exc.clock, exc.silent_ranks) from exc.__cause__
        return True

    def exchange(self) -> None:
        """Exchange now, whatever the clock says (for loops that count ``tau`` themselves):
        every fragment, applied before it returns (fragments in flight first), whatever the
        ``delay``.

        Synchronous mode: collective (every rank calls it); on CUDA it returns as soon as its
        kernels and collectives are enqueued, with no host synchronization, and can be captured
        in a CUDA graph. What it did (a skipped exchange, a reset worker) is counted in
        :attr:`stats` and warned about once the GPU has finished it. Asynchronous mode: this
        worker alone, with the center; returns when done."""
        self._not_on_a_server()
        self._run(self._center.exchange)

    def flush(self) -> None:
        """Synchronous mode with ``delay``: completes and applies every fragment in flight now
        (collective), e.g. before evaluating the center or at the end of training. :meth:`close`
        does it too."""
        self._not_on_a_server()
        self._run(self._center.flush)

    @property
    def in_flight(self) -> int:
        """Fragments sent and not applied yet (``delay > 0``)."""
        return self._center.in_flight

    def bytes_per_step(self) -> list[int]:
        """Synchronous mode: the bytes this rank puts on the network at each of the ``tau``
        steps of a window (ring all-reduce: ``2 (p - 1) / p`` of the payload; the 8-bit wire:
        ``2 (p - 1)`` records). Its maximum is the peak a streamed exchange (``fragments``)
        lowers; its sum is one whole exchange. Empty in asynchronous mode."""
        return self._center.bytes_schedule()

    def _run(self, work: Callable[[int], list[Any]]) -> None:
        """Runs one of the center's exchange calls at this clock and records what it did."""
        if self._closed:
            raise RuntimeError("exchange() after close()")
        if self._in_center:
            raise RuntimeError("exchange() inside center_parameters(): the model holds the "
                               "center; leave the with-block first")
        for g in self._groups:
            g.ensure_views()
        device = self._groups[0].device
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            self._check_capturable(work)
            work(self.clock)  # captured: the kernels and collectives only
        else:
            timer = self._log.start(device)
            try:
                records = work(self.clock)
            except ExchangeError as exc:
                if self.on_failure != "continue":
                    raise
                self._go_on_without_the_failed(exc)
                return
            self._log.finish(records, timer)
            if self.on_nonfinite == "raise":
                self._log.drain()  # the verdict now, on every rank alike (a wait on CUDA)
        # The kernels wrote the parameters behind autograd's back: a backward that saved them
        # must fail loudly, as after any in-place update.
        torch.autograd.graph.increment_version(self._written)

    def _go_on_without_the_failed(self, exc: ExchangeError) -> None:
        """``on_failure="continue"``: the ranks that report the failure agree on who is left
        (through the process group's store), form a group of their own, rebuild the exchange
        for p - k workers (the rule's rates as its constructor derives them for p - k: beta
        given, alpha = beta / (p - k); alpha given, beta = (p - k) alpha) and take the center,
        the rule's center buffers and the clock of the most advanced survivor. The failed
        exchange is dropped (its fragments in flight with it; nothing of them was applied);
        each worker keeps its own parameters and its wire's residual; the owners' residuals of
        a quantized wire start again from zero (the chunks they owned have moved)."""
        limit = self._spec.exchange_timeout or DEFAULT_EXCHANGE_TIMEOUT
        survivors = _dist.agree_on_survivors(self._comm, self.clock,
                                             settle=min(limit, FAILURE_SETTLE_SECONDS), limit=limit)
        me = self._comm.global_rank(self._comm.rank)
        if survivors is None:
            raise ExchangeError(f"{exc}; on_failure='continue' could not go on: the process "
                                "group's store did not answer (its host may be the rank that "
                                "failed: under env:// that is rank 0; torchrun's store lives in "
                                "its agent and outlives the ranks)", exc.clock, exc.silent_ranks) from exc
        if me not in survivors.ranks:
            raise ExchangeError(f"{exc}; this rank reported the failure after the others had "
                                f"agreed to go on without it (ranks {survivors.ranks})",
                                exc.clock, exc.silent_ranks) from exc
        if len(survivors.ranks) < 2:
            raise ExchangeError(f"{exc}; no other rank is left to exchange with", exc.clock,
                                exc.silent_ranks) from exc
        lost = [r for r in _dist.group_ranks(self._comm) if r not in survivors.ranks]
        if self._elastic:  # the same group, reconfigured over the survivors
            elastic.reconfigure(elastic.state().generation + 1, survivors.ranks.index(me),
                                len(survivors.ranks))
            comm = _dist.resolve(torch.distributed.group.WORLD)
        else:
            comm = _dist.group_of(survivors.ranks, torch.distributed.get_backend(self._comm.group), limit)
        self._regroup(comm, survivors.ranks.index(survivors.source), survivors.clock)
        self._log.stats.failures_survived += 1
        warn_user(f"{type(self).__name__}: the exchange at clock {exc.clock} failed (rank"
                  f"{'s' * (len(lost) > 1)} {', '.join(map(str, lost))} did not report it: dead, "
                  f"frozen or gone); going on with {comm.world_size} workers (ranks "
                  f"{', '.join(map(str, survivors.ranks))}) from clock {self.clock}; the failed "
                  "exchange was dropped, nothing of it applied")

    def _regroup(self, comm: _dist.Comm, source: int, clock: int) -> None:
        """Goes on over ``comm``, a new membership: the rule and the center rebuilt for its
        size (the rates as the constructor derives them), this worker's parameters, buffers
        and residual kept, the center and the rule's center buffers taken from group rank
        ``source``, the clock set to ``clock``."""
        kept = {name: [g.buffers[name].clone() for g in self._groups]
                for name in ("center", "residual", *self.algorithm.center_buffers,
                             *self.algorithm.worker_buffers)
                if all(name in g.buffers for g in self._groups)}
        self._abandoned.append(self._center)  # Gloo's threads may still hold its tensors
        self._comm = comm
        self.algorithm = self._make_algorithm(comm.world_size)
        self._settings.update(self.algorithm.settings())
        self._center = self._spec.build(comm, self._groups, self._params, self.algorithm,
                                        self._exchange_settings)
        with torch.no_grad():
            for name, tensors in kept.items():
                for g, t in zip(self._groups, tensors):
                    g.buffers[name].copy_(t)
            shared = [g.buffers[name] for name in ("center", *self.algorithm.center_buffers)
                      for g in self._groups if name in g.buffers]
            for t in shared:  # a collective that completed on some ranks was applied there
                comm.broadcast(t, source)
        self.clock = clock

    # ---- an elastic job: admitting processes that join (see easgd_ext.elastic) ------------------------
    def _admit_joiners(self) -> None:
        """At a window's start: the first member plans the admission of the processes waiting
        to join two windows ahead (every member has then seen the plan: each completed an
        exchange the first member entered after writing it); at the planned clock every
        member lands the fragments in flight, admits the joiners that are ready, rebuilds the
        exchange for the larger group and hands them the center and the settings."""
        plan = elastic.planned_admission()
        if plan is None:
            if self._comm.rank == 0:
                tickets = elastic.pending_tickets()
                if tickets:
                    elastic.plan_admission(tickets, self.clock + 2 * self.tau)
            return
        if plan["clock"] != self.clock:
            return
        generation = elastic.state().generation
        self._run(self._center.flush)  # a joiner cannot complete the members' collectives
        if elastic.state().generation != generation:
            return  # a member failed meanwhile: the next generation plans the admission anew
        before = self._comm.world_size
        try:
            joined = elastic.admit(plan["tickets"], self.clock, self._comm.rank, before)
        except Exception as exc:  # noqa: BLE001 -- a member or the store gone meanwhile
            raise ExchangeError(f"the admission of joining processes at clock {self.clock} "
                                f"failed ({type(exc).__name__}: {exc}): the group could not be "
                                "reconfigured (a member failed during it?)", self.clock, None) from exc
        if not joined:
            return
        comm = _dist.resolve(torch.distributed.group.WORLD)
        self._regroup(comm, 0, self.clock)
        comm.broadcast_object(self._joining_terms())
        self._log.stats.workers_joined += len(joined)
        warn_user(f"{type(self).__name__}: {len(joined)} process{'es' * (len(joined) > 1)} "
                  f"joined at clock {self.clock}; going on with {comm.world_size} workers")

    def _joining_terms(self) -> dict[str, Any]:
        """What a joiner must have built alike (its settings, layout and rule)."""
        return {"settings": self._settings, "layout": self._layout,
                "algorithm": self.algorithm.name, **self._spec.agreed()}

    def _join_running_job(self) -> None:
        """A process started with ``init_process_group(elastic=True, join=True)``: waits for
        the running averagers' admission, takes the center, starts its worker from it and
        takes part in the exchange at the clock it was admitted at."""
        if not self._elastic or self.mode != "sync" or self.sharded:
            raise ValueError(
                f"this process joins a running job (init_process_group(join=True)): build its "
                f"{type(self).__name__} as the job's are, synchronous over the default group "
                f"with on_failure='continue' (got mode={self.mode!r}, on_failure="
                f"{self.on_failure!r}{', DTensor parameters' if self.sharded else ''})")
        admitted = elastic.admit_request()
        if admitted is None:
            raise ExchangeError(f"no running job admitted this process within "
                                f"{elastic.JOIN_WAIT_SECONDS:.0f} s "
                                "(are its averagers built with on_failure='continue' on a group "
                                "from init_process_group(elastic=True)? is it stepping?)",
                                self.clock, None)
        clock, _ = admitted
        comm = _dist.resolve(torch.distributed.group.WORLD)
        self._regroup(comm, 0, clock - 1)
        terms = comm.broadcast_object(None)
        difference = _dist.first_difference(terms, self._joining_terms(), comm.rank)
        if difference is not None:
            said = difference.replace(f" on rank {comm.rank}", " here").replace(" on rank 0", " in the job")
            raise ValueError(f"this process cannot join: the running job's averagers differ "
                             f"from its own: {said}")
        with torch.no_grad():  # the new worker starts from the center
            for g in self._groups:
                if "center" in g.buffers:
                    g.write_x(g.buffers["center"])
                    for name in self.algorithm.worker_buffers:
                        g.buffers[name].copy_(g.buffers["center"])
        self._log.stats.workers_joined += 1
        self._advance_clock()  # the exchange the members take right after admitting it

    @property
    def flat_groups(self) -> list[ParamGroup]:
        """The flat groups the parameters are laid out in (one per device and dtype; for DTensor
        parameters, their local shards): the layout the center and its buffers follow."""
        return self._groups

    @property
    def process_group(self) -> Any:
        """The process group the exchanges use now: the one given (or the default one), or,
        after ``on_failure="continue"`` went on without failed ranks, the survivors' own (the
        default group still holds the failed ranks: use this one for the job's own collectives
        among the survivors). ``None`` in a single process."""
        return self._comm.group

    def _check_capturable(self, work: Callable[[int], list[Any]]) -> None:
        """What a CUDA graph cannot hold is refused before anything is captured."""
        name = type(self).__name__
        if self.mode == "async":
            raise RuntimeError(f"{name}(mode='async') cannot be captured in a CUDA graph: its "
                               "exchange takes locks and copies on the host; capture the "
                               "synchronous exchange only")
        device = self._groups[0].device
        if self._comm.host_waits(device):
            raise RuntimeError(f"{name} over {self._comm.backend_for(device)} "
                               "cannot be captured in a CUDA graph: the host waits for its "
                               "collectives; capture it in an NCCL group")
        if self._settings.get("delay") or self._center.in_flight or work != self._center.exchange:
            raise RuntimeError(f"{name}: only exchange() with nothing in flight can be captured "
                               "in a CUDA graph (a delayed exchange spans several steps: its "
                               "collectives cannot be waited for inside one graph)")

    def attach(self, optimizer: torch.optim.Optimizer) -> "AttachHandle":
        """Calls :meth:`step` after every ``optimizer.step()`` (a step post-hook), so the loop
        needs no line of its own (and may not have one: :meth:`step` is then an error, as it
        would count every step twice). Where this worker is reset to the center after diverging,
        the optimizer's state for these parameters (momentum...) is cleared too. One optimizer
        at a time; returns the handle whose ``remove()`` detaches."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self._attached is not None:
            raise RuntimeError(f"{type(self).__name__} is already attached to an optimizer: it "
                               "steps after that optimizer's step(); a second hook would count "
                               "every step twice (remove the first handle to attach another)")
        self._optimizers.add(optimizer)
        me = weakref.ref(self)  # the optimizer must not keep a dropped averager alive

        def after_step(*_: object) -> None:
            averager = me()
            if averager is not None:
                averager._advance_clock()

        self._attached = AttachHandle(self, optimizer.register_step_post_hook(after_step))
        return self._attached

    def serve(self, on_request: Callable[[str, int], None] | None = None) -> dict[str, int]:
        """On a server rank (``servers=``): answers the workers' requests until every worker has
        called :meth:`close`; returns how many exchanges, reads and writes it served."""
        return self._center.serve(on_request)

    def close(self) -> None:
        """This worker is done: marks its slot finished (shared center) or tells the servers
        (sharded center). Idempotent; also called on leaving a ``with`` block."""
        if not self._closed:
            if self._center.in_flight:
                self.flush()  # what was sent is applied: nothing in flight is lost
            self._closed = True
            self._center.close()

    def __enter__(self) -> "Averager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the center ---------------------------------------------------------------------------------
    def center_state(self) -> list[torch.Tensor]:
        """The center as this rank sees it: one float32 flat buffer per (device, dtype) group of
        parameters, in order of first appearance (empty for :class:`PeriodicAverager`). Read
        them; to evaluate the center use :meth:`center_parameters`."""
        if not self.algorithm.has_center:
            return []
        if self.is_server:
            raise RuntimeError("a server rank holds one shard of the center; read the center "
                               "on a worker")
        return [c.detach() for c in self._center.read()]

    @contextlib.contextmanager
    def center_parameters(self) -> Iterator[None]:
        """Within the block the model's parameters hold the center (rounded to the parameters'
        dtype), e.g. for evaluation; on leaving, the worker's own values come back exactly.
        Local in sync mode (no communication, so it may be used on one rank only)."""
        if self._in_center:
            raise RuntimeError("center_parameters() is already active")
        centers = self.center_state() or [None] * len(self._groups)
        stash = []
        with torch.no_grad():
            for g, c in zip(self._groups, centers):
                g.ensure_views()
                stash.append(g.read_x().clone())
                if c is not None:
                    g.write_x(c)
        torch.autograd.graph.increment_version(self._written)
        self._in_center = True
        try:
            yield
        finally:
            self._in_center = False
            with torch.no_grad():
                for g, saved in zip(self._groups, stash):
                    g.ensure_views()
                    g.write_x(saved)
            torch.autograd.graph.increment_version(self._written)

    # ---- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's part of a checkpoint, on the CPU: clock, statistics, settings, the
        algorithm's worker buffers, and what this rank keeps of the center: its replica (sync),
        the whole center on rank 0 only (shared memory: one center for the job), its shards on a
        server (sharded). Every rank saves its own; with the model's and optimizer's state
        dicts, enough to resume exactly."""
        buffers = {} if self.is_server else {
            name: [g.buffers[name].detach().cpu().clone() for g in self._groups]
            for name in self.algorithm.worker_buffers}
        if self.algorithm.has_center:
            buffers.update(self._center.save())
        return {
            "algorithm": self.algorithm.name, "format": STATE_FORMAT, "world_size": self.world_size,
            "rank": self._comm.rank, "clock": self.clock, "settings": dict(self._settings),
            "layout": list(self._layout), "stats": asdict(self.stats), "buffers": buffers,
        }

    def dcp_state(self) -> "DCPState":
        """This averager's part of a ``torch.distributed.checkpoint`` checkpoint, a ``Stateful``
        to put beside the model's and the optimizer's state, which are keyed by :attr:`replica`
        (the replicas' models differ)::

            state = {f"replica{avg.replica}": {"model": msd, "optim": osd},
                     "averager": avg.dcp_state()}
            dcp.save(state, checkpoint_id=path)      # dcp.load(state, ...) in a fresh job

        Sharded: the center is saved once per shard (as DTensors with the parameters'
        placements for a sharded model), each rank's own buffers under its rank. Resumes
        exactly on the same topology; another replicate degree or sharding is refused.
        Synchronous mode; collective (every rank calls ``dcp.save``)."""
        return DCPState(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` saved on this rank. Build the averager first (it
        broadcasts rank 0's parameters), then load the model's, optimizer's and this state, in
        any order. Asynchronous mode: every rank calls it (rank 0 restores the shared center, and
        nobody goes on before it has); servers load before :meth:`serve`."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        missing = {"algorithm", "format", "world_size", "clock", "settings", "layout", "stats",
                   "buffers"} - state.keys()
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}; is it from state_dict()?")
        if state["format"] not in STATE_FORMATS_READ:
            raise ValueError(f"state format is {_short(state['format'])}, this averager reads "
                             f"{sorted(STATE_FORMATS_READ)}")
        expected = {"algorithm": self.algorithm.name, "world_size": self.world_size,
                    "layout": self._layout}
        for key, want in expected.items():
            if state[key] != want:
                raise ValueError(f"state {key} is {_short(state[key])}, this averager has {_short(want)}")
        if not isinstance(state["settings"], dict):
            raise ValueError("state settings must be a dict; is it from state_dict()?")
        for key, want in self._settings.items():
            saved = state["settings"].get(key, LEGACY_SETTINGS.get(key))
            if key != "center" and saved != want:
                raise ValueError(f"state was saved with {key}={saved!r}, this averager has "
                                 f"{key}={want!r}")
        if state.get("rank", self._comm.rank) != self._comm.rank:
            raise ValueError(f"state was saved by rank {state['rank']}, this is rank "
                             f"{self._comm.rank}: every rank loads the state it saved (worker "
                             "buffers, residuals and exchanges in flight are the rank's own)")
        clock = check_counter("clock", state["clock"])
        stats = check_stats(state["stats"])
        buffers = state["buffers"]
        if not isinstance(buffers, dict):
            raise ValueError(f"state buffers must be a dict, got {type(buffers).__name__}")
        check_finite_buffers(buffers)
        names = [] if self.is_server else list(self.algorithm.worker_buffers)
        for name in names:
            check_saved(name, buffers.get(name), [g.buffers[name] for g in self._groups])
        with torch.no_grad():
            for name in names:
                for s, g in zip(buffers[name], self._groups):
                    g.buffers[name].copy_(s)
            if self.algorithm.has_center:
                self._center.load(buffers)
        self.clock = clock
        self._log.reset(stats)

    # ---- internals ------------------------------------------------------------------------------------
    def _not_on_a_server(self) -> None:
        if self.is_server:
            raise RuntimeError(f"rank {self._comm.rank} is a server of the sharded center: it "
                               "calls serve(), not step() or exchange()")

    def _on_outcome(self, o: Outcome) -> None:
        """What an exchange's outcome means for the user, once it is known: an error, a
        warning (throttled, on one rank where every rank knows the same), a cleared optimizer."""
        name = type(self).__name__
        ranks = f"{o.bad_ranks} of {self.workers} workers"
        if not o.applied:
            where = "this worker's parameters" if self.mode == "async" else (
                f"values on {ranks} (this rank: {'yes' if o.me_bad else 'no'})")
            message = (f"{name}: the exchange at clock {o.clock} was skipped: non-finite {where}; "
                       "parameters and center are left as they were")
            if self.on_nonfinite == "raise":
                raise NonFiniteError(message)
            if (o.me_bad or self._comm.rank == 0 or self.mode == "async") and self._warned["skip"]():
                warn_user(message + f" ({self._warned['skip'].count} so far; with "
                          "on_nonfinite='skip' averaging stops while any worker is not finite)")
        elif o.me_bad:
            for opt in self._optimizers:
                for p in self._params:
                    opt.state.pop(p, None)
            if self._warned["reset"]():
                cleared = ("its state in the attached optimizer was cleared" if self._optimizers
                           else "clear its optimizer's state too (momentum may hold them): "
                                "opt.state.clear(), or use avg.attach(opt), which does it")
                warn_user(f"{name}: this worker's parameters were not finite at the exchange at "
                          f"clock {o.clock}: they were reset to the center; {cleared} "
                          f"({self._warned['reset'].count} so far)")
        elif o.bad_ranks and self._comm.rank == 0 and self._warned["others"]():
            warn_user(f"{name}: {ranks} had non-finite parameters at the exchange at clock "
                      f"{o.clock} and were reset to the center; the others averaged on "
                      f"({self._warned['others'].count} so far)")
        if o.overflow and self._comm.rank == 0 and self._warned["overflow"]():
            warn_user(f"{name}: the float16 sum over ranks overflowed in the exchange at clock "
                      f"{o.clock}; those elements were left as they were (try "
                      f"comm_dtype=torch.bfloat16) ({self._warned['overflow'].count} so far)")


class AttachHandle:
    """What :meth:`Averager.attach` returns: ``remove()`` detaches the averager from the
    optimizer (after which :meth:`Averager.step` is the way to step it again)."""

    def __init__(self, averager: Averager, hook: Any) -> None:
        self._averager = weakref.ref(averager)
        self._hook = hook

    def remove(self) -> None:
        self._hook.remove()
        averager = self._averager()
        if averager is not None and averager._attached is self:
            averager._attached = None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class ElasticAverager(Averager):
    """Elastic averaging for any training loop: every ``tau`` local steps each worker is pulled
    towards a center variable, and the center towards the workers.

    Synchronous mode (``mode="sync"``), over all ``p`` ranks of the process group::

        d_i = alpha (x_i - center);   x_i -= d_i;   center += sum_i d_i

    The center is replicated on every rank (float32, on the parameters' device) and the
    replicas stay bit-identical, because every rank adds the same all-reduced sum. An exchange
    is one fused kernel, a bucketed all-reduce of ``d`` (in ``comm_dtype``: bfloat16 halves the
    bytes of float32 parameters), and one fused kernel per bucket, all enqueued without a host
    synchronization.

    Asynchronous mode (``mode="async"``), worker ``i`` alone whenever its clock says so::

        e = alpha (x_i - center);   x_i -= e;   center += e

    against a center in shared memory (one machine) or sharded over server ranks (``servers=``).

    **EAMSGD** is this averager with Nesterov momentum in the local steps:
    ``torch.optim.SGD(params, lr, momentum=0.9, nesterov=True)`` (the paper's delta).

    Args:
        params: the model's parameters (``model.parameters()``). They are re-pointed as views of
            flat buffers, one per (device, dtype); the ``Parameter`` objects, their gradients and
            any optimizer holding them keep working. Build the averager after moving or casting
            the model. Every rank must pass the same layout (count, shapes, dtypes). The DTensor
            parameters of a ``fully_shard``-ed model stay in FSDP's storage: each rank exchanges
            its local shards (see ``process_group``).
        tau: local steps between exchanges (``step()`` exchanges when its clock is a multiple).
        beta: ``p * alpha``; defaults to 0.9 (the paper's choice). Must be in (0, 1).
        alpha: the moving rate; give ``alpha`` or ``beta``, not both (or both, consistent).
        mode: ``"sync"`` (all workers exchange together over an all-reduce; the default) or
            ``"async"`` (each worker exchanges with the center on its own clock). Leave it out
            when ``center`` is a spec: the spec says.
        process_group: the group to average over (default: the default group; a single process
            needs no torch.distributed at all). For DTensor parameters: the ranks that hold the
            same shards in the other replicas, the device mesh's replicate dimension
            (``mesh["replicate"]``, a one-dimensional ``DeviceMesh``, or its group).
        comm_dtype: sync: dtype of ``d`` on the wire: ``None`` (the parameters' dtype),
            ``torch.float32``, ``torch.bfloat16``, ``torch.float16``, or a quantized wire,
            ``torch.int8``, ``torch.int4`` or ``torch.int2`` (levels -127..127, -7..7 or
            -1..1, two or four packed in a byte): blocks of 256 values scaled by their absolute
            maximum, with error feedback (what a worker's bits did not carry is added to its
            next send; the owner of each chunk of the sum keeps its own), exchanged by an
            all-to-all and an all-gather: about 3.9x, 7.5x or 14x fewer bytes than float32 at
            any world size. ``bucket_cap_mb`` applies to float wires.
        bucket_cap_mb: sync: all-reduce bucket size (default 25); on CPU tensors a bucket is
            applied as soon as it arrives while later ones are in flight.
        allow_unstable: accept ``beta >= 1``.
        center: where the center lives, with that center's settings:
            :class:`~easgd_ext.Replicated` (sync), :class:`~easgd_ext.SharedMemory` (async, one
            machine) or :class:`~easgd_ext.Servers` (async, server ranks), e.g.
            ``center=Replicated(comm_dtype=torch.int8, fragments=8, delay=1)``. The keyword
            arguments below (``comm_dtype``, ``fragments``, ``servers``, ...) are the shorthand
            for these and are errors beside a spec. In the shorthand, ``center`` is the
            shared-memory segment of ``mode="async"`` on one machine: a
            :class:`~easgd_ext.SharedCenter` or the name of one. Default: a single process
            makes a private one; under torch.distributed rank 0 creates one under a fresh name
            and the other ranks attach to it.
        servers: async across machines: the ranks that hold the center, sharded; they call
            :meth:`serve` while the other ranks train.
        lock_timeout: async: seconds to wait for a chunk lock before raising ``TimeoutError``
            (a live worker stuck while holding it); default 300.
        on_nonfinite: what a non-finite contribution does (a diverged worker, Inf/NaN in its
            parameters): ``"reset"`` (default) resets that worker to the center while the others
            average on; ``"skip"`` skips the exchange on every rank; ``"raise"`` skips it and
            raises :class:`~easgd_ext.NonFiniteError` on every rank. Decided on the device.
        exchange_timeout: sync, CPU tensors: seconds to wait for the other ranks in an exchange
            before raising (default 300).
        on_failure: sync, over Gloo: what an exchange that fails because ranks died, froze past
            ``exchange_timeout`` or stopped exchanging does. ``"raise"`` (default):
            :class:`~easgd_ext.ExchangeError` on every survivor, nothing applied (resume from a
            checkpoint). ``"continue"``: the survivors agree on who is left through the
            process group's store (which must outlive the ranks: torchrun's does; under
            env:// rank 0 hosts it), form a group of their own (:attr:`process_group`), drop
            the failed exchange and go on with ``p - k`` workers (the rule's rates rescaled as
            the constructor derives them: ``beta`` given, ``alpha = beta / (p - k)``; ``alpha``
            given, ``beta = (p - k) alpha``), counted in ``stats.failures_survived`` and warned
            about. A rank that reports the failure more than 2 s after the others agreed is
            counted out and raises.
        fragments: sync: cut the model into this many contiguous fragments (runs of layers),
            each exchanged every ``tau`` steps at its own phase of them: the bytes of one step
            drop to about ``1 / fragments`` of a whole exchange (default 1: all at once).
        delay: sync: apply a fragment's sum this many steps after its send, ``0 <= delay <
            tau``: its collectives run behind the next steps' compute, and the worker loses then
            exactly the ``d`` it sent (default 0). ``state_dict()`` waits for the sums in flight
            and saves them (a resumed run applies them at the same step); ``center_parameters()``
            shows the center as applied so far; :meth:`flush` and :meth:`close` apply what is in
            flight now.
        outer_lr, outer_momentum, nesterov: sync: an outer optimizer on the center. The sum of
            the elastic differences ``g = sum_i d_i`` moves the center by an outer (Nesterov)
            momentum step: ``m = outer_momentum m + g``; ``center += outer_lr (g +
            outer_momentum m)`` with ``nesterov``, else ``outer_lr m``; the workers are pulled
            by ``alpha`` as in EASGD. The defaults (1, 0, False) are EASGD itself; the family's
            other corner, a full pull to the new center, is :class:`DiLoCoAverager`. The
            momentum is float32 beside the center and saved in ``state_dict()``.

    Arguments that do not apply to the chosen mode are errors.
    """

    def __init__(self, params: Iterable[torch.Tensor], tau: int = DEFAULT_TAU,
                 beta: float | None = None, alpha: float | None = None, mode: str | None = None,
                 process_group: Any = None, comm_dtype: torch.dtype | str | None = None,
                 bucket_cap_mb: float | None = None, allow_unstable: bool = False,
                 center: CenterSpec | SharedCenter | str | None = None,
                 servers: list[int] | None = None, lock_timeout: float | None = None, *,
                 on_nonfinite: str = DEFAULT_ON_NONFINITE, exchange_timeout: float | None = None,
                 fragments: int = 1, delay: int = 0, outer_lr: float = 1.0,
                 outer_momentum: float = 0.0, nesterov: bool = False,
                 on_failure: str = DEFAULT_ON_FAILURE) -> None:
        outer = check_outer(outer_lr, outer_momentum, nesterov)

        def make(workers: int) -> Algorithm:
            rates = elastic_rates(workers, beta, alpha, allow_unstable)
            return Elastic(*rates) if outer is None else ElasticOuter(*rates, *outer)

        super().__init__(params, make, tau=tau, process_group=process_group,
                         on_nonfinite=on_nonfinite, center=center, mode=mode, servers=servers,
                         lock_timeout=lock_timeout, **_replicated_arguments(
                             comm_dtype, bucket_cap_mb, exchange_timeout, fragments, delay, on_failure))

    @property
    def alpha(self) -> float:
        return self.algorithm.alpha  # type: ignore[attr-defined]

    @property
    def beta(self) -> float:
        return self.algorithm.beta  # type: ignore[attr-defined]


class DownpourAverager(Averager):
    """DOWNPOUR (Dean et al., 2012). Every ``tau`` local steps each worker pushes its change
    since the last pull, ``v_i = x_i - x_i(last pull)``, into the center and pulls it:
    synchronously ``center += sum_i v_i; x_i = center`` (a float32 replica on every rank), or
    asynchronously (``mode="async"``, the paper's baseline) one worker at a time against the
    same shared or sharded centers as asynchronous EASGD.

    Arguments and methods are those of :class:`~easgd_ext.ElasticAverager` without
    ``beta``/``alpha``/``allow_unstable``; ``delay`` must be 0 (a delayed pull would discard
    the steps taken since the push).
    """

    def __init__(self, params: Iterable[torch.Tensor], tau: int = DEFAULT_TAU,
                 mode: str | None = None, process_group: Any = None,
                 comm_dtype: torch.dtype | str | None = None, bucket_cap_mb: float | None = None,
                 center: CenterSpec | SharedCenter | str | None = None,
                 servers: list[int] | None = None, lock_timeout: float | None = None, *,
                 on_nonfinite: str = DEFAULT_ON_NONFINITE,
                 exchange_timeout: float | None = None, fragments: int = 1,
                 delay: int = 0, on_failure: str = DEFAULT_ON_FAILURE) -> None:
        super().__init__(params, lambda workers: Downpour(), tau=tau, process_group=process_group,
                         on_nonfinite=on_nonfinite, center=center, mode=mode, servers=servers,
                         lock_timeout=lock_timeout, **_replicated_arguments(
                             comm_dtype, bucket_cap_mb, exchange_timeout, fragments, delay, on_failure))


class PeriodicAverager(Averager):
    """Periodic model averaging (what PyTorch ships as ``PeriodicModelAverager``): every
    ``tau`` local steps, ``x_i = mean_j x_j``.

    Arguments and methods are those of :class:`~easgd_ext.ElasticAverager` without
    ``beta``/``alpha`` and the asynchronous ones (``center`` takes a ``mode="sync"`` spec,
    :class:`~easgd_ext.Replicated`); ``delay`` must be 0 and ``comm_dtype`` a float (8 bits
    cannot carry the parameters themselves). Unlike PyTorch's averager it does not average
    on the very first call (its clock counts completed steps, like the others here), it
    all-reduces one flat buffer per dtype instead of concatenating and copying back, and a
    non-finite worker does not spread to the others: by default it takes the mean of the
    healthy ones. With ``comm_dtype`` below the parameters' precision the averaged parameters
    are rounded to it. There is no separate center: :meth:`center_parameters` leaves the model
    as it is (the workers are equal right after each averaging).
    """

    def __init__(self, params: Iterable[torch.Tensor], tau: int = DEFAULT_TAU,
                 mode: str | None = None, process_group: Any = None,
                 comm_dtype: torch.dtype | str | None = None, bucket_cap_mb: float | None = None,
                 *, on_nonfinite: str = DEFAULT_ON_NONFINITE, exchange_timeout: float | None = None,
                 fragments: int = 1, delay: int = 0, on_failure: str = DEFAULT_ON_FAILURE,
                 center: CenterSpec | None = None) -> None:
        super().__init__(params, lambda workers: Averaging(), tau=tau, process_group=process_group,
                         on_nonfinite=on_nonfinite, center=center, sync_only=True, mode=mode,
                         **_replicated_arguments(comm_dtype, bucket_cap_mb, exchange_timeout,
                                                 fragments, delay, on_failure))


class DiLoCoAverager(Averager):
    """DiLoCo (Douillard et al., 2023, "DiLoCo: Distributed Low-Communication Training of
    Language Models"): every ``tau`` local steps, the pseudo-gradient ``delta = center -
    mean_i x_i`` (one all-reduce per bucket, of ``x_i - center``), an outer SGD step with
    (Nesterov) momentum on the center, ``m = outer_momentum m + delta; center -= outer_lr
    (delta + outer_momentum m)`` (``outer_lr m`` without ``nesterov``), and every worker reset
    to the new center. The paper's settings are the defaults: ``outer_lr=0.7``,
    ``outer_momentum=0.9``, Nesterov, an inner AdamW, ``tau = 500``.

    It is the corner of :class:`ElasticAverager`'s outer-optimizer family where the workers are
    pulled all the way to the new center (the same fused kernels; with
    ``fragment_update_alpha`` part of the way, below). Synchronous only. Every wire:
    float, bfloat16/float16, and int8/int4/int2 with error feedback. Other arguments are those
    of :class:`ElasticAverager` (``center`` takes a ``mode="sync"`` spec, :class:`Replicated`); a worker that diverged sends nothing and the mean is over the
    others (``on_nonfinite="reset"``). The momentum is float32 beside the center and saved in
    ``state_dict()``.

    Streaming DiLoCo (Douillard et al., 2025): ``fragments=F`` sends one fragment of the model
    every ``tau / F`` steps; ``delay=k`` (``0 <= k < tau``) applies a fragment's outer step k
    steps after its send, its collective overlapping the k local steps in between.
    ``fragment_update_alpha=a`` (``0 <= a <= 1``) mixes the worker in: at the apply, with ``x``
    the worker now, ``x_sent`` what it sent and ``c_new`` the new center,
    ``x <- a x + (1 - a) (c_new + x - x_sent)``. Without a delay (``x = x_sent``) that is
    torchft's ``fragment_update_alpha`` exactly (``a = 0``: every worker reset to the center).
    With a delay ours differs: the progress ``x - x_sent`` made during the k steps is kept,
    where torchft (``fragment_sync_delay``) mixes ``a x + (1 - a) c_new`` and so discards it at
    ``a = 0``.
    """

    def __init__(self, params: Iterable[torch.Tensor], tau: int = DEFAULT_TAU, outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, nesterov: bool = True, mode: str | None = None,
                 process_group: Any = None, comm_dtype: torch.dtype | str | None = None,
                 bucket_cap_mb: float | None = None, *, on_nonfinite: str = DEFAULT_ON_NONFINITE,
                 exchange_timeout: float | None = None, fragments: int = 1,
                 delay: int = 0, fragment_update_alpha: float = 0.0,
                 on_failure: str = DEFAULT_ON_FAILURE, center: CenterSpec | None = None) -> None:
        lr, mu, nesterov_ = check_outer(outer_lr, outer_momentum, nesterov) or (outer_lr, outer_momentum, nesterov)
        mix = check_update_alpha(fragment_update_alpha)
        super().__init__(params, lambda workers: DiLoCo(workers, lr, mu, nesterov_, mix), tau=tau,
                         process_group=process_group, on_nonfinite=on_nonfinite,
                         center=center, sync_only=True, mode=mode,
                         **_replicated_arguments(comm_dtype, bucket_cap_mb, exchange_timeout,
                                                 fragments, delay, on_failure))


def _replicated_arguments(comm_dtype: Any, bucket_cap_mb: Any, exchange_timeout: Any, fragments: Any,
                          delay: Any, on_failure: Any) -> dict[str, Any]:
    """The shorthand's :class:`~easgd_ext.Replicated` settings, ``None`` where left at the default."""
    def left_out(value: Any, default: Any) -> bool:  # the default itself (True is not 1)
        return type(value) is type(default) and value == default

    return {"comm_dtype": comm_dtype, "bucket_cap_mb": bucket_cap_mb,
            "exchange_timeout": exchange_timeout,
            "fragments": None if left_out(fragments, 1) else fragments,
            "delay": None if left_out(delay, 0) else delay,
            "on_failure": None if left_out(on_failure, DEFAULT_ON_FAILURE) else on_failure}
