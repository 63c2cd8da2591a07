"""ElasticAverager: Elastic Averaging SGD (EASGD) and, with a Nesterov-momentum local
optimizer, EAMSGD (Zhang, Choromanska and LeCun, 2015)."""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Iterable

import torch

from . import _dist, ops
from .averager import SyncAverager
from .flat_params import FlatGroup

DEFAULT_BETA = 0.9


def elastic_rates(world_size: int, beta: object, alpha: object,
                  allow_unstable: bool) -> tuple[float, float]:
    """``(alpha, beta)`` with ``beta = p * alpha``: either may be given (beta defaults to the
    paper's 0.9). Checks the stability condition of synchronous EASGD, ``0 < beta < 1``."""
    for name, value in (("beta", beta), ("alpha", alpha)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise TypeError(f"{name} must be a real number or None, got {type(value).__name__}")
    if not isinstance(allow_unstable, bool):
        raise TypeError(f"allow_unstable must be a bool, got {type(allow_unstable).__name__}")
    if alpha is None:
        beta = DEFAULT_BETA if beta is None else float(beta)
        alpha = beta / world_size
    elif beta is None:
        alpha = float(alpha)
        beta = alpha * world_size
    elif not math.isclose(float(alpha) * world_size, float(beta), rel_tol=1e-9):
        raise ValueError(f"alpha={alpha} and beta={beta} disagree: beta must equal p * alpha "
                         f"with p={world_size} workers; give only one of them")
    alpha, beta = float(alpha), float(beta)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha (the moving rate) must be positive and finite, got {alpha}")
    if not allow_unstable and not beta < 1:
        raise ValueError(
            f"beta = p * alpha = {world_size} * {alpha:g} = {beta:g} breaks the stability "
            "condition of synchronous EASGD, 0 < beta < 1 (the center overshoots the average of "
            "the workers); lower alpha or beta (the paper uses beta = 0.9), or pass "
            "allow_unstable=True to run anyway")
    return alpha, beta


def _mode_argument(init: Any, args: tuple, kwargs: dict) -> Any:
    """The ``mode`` a constructor call asks for (``"sync"`` when the call does not bind: the
    constructor then raises the usual TypeError)."""
    try:
        bound = inspect.signature(init).bind(None, *args, **kwargs)
    except TypeError:
        return "sync"
    return bound.arguments.get("mode", "sync")


def check_mode(mode: object, center: object, servers: object) -> None:
    if mode not in ("sync", "async"):
        raise ValueError(f"mode must be 'sync' or 'async', got {mode!r}")
    if mode == "sync" and (center is not None or servers is not None):
        raise ValueError("center= and servers= place the center of mode='async'; "
                         "mode='sync' replicates it on every rank")


class ElasticAverager(SyncAverager):
    """Elastic averaging for any training loop: every ``tau`` local steps each worker is pulled
    towards a center variable, and the center towards the workers.

    Synchronous mode (``mode="sync"``), over all ``p`` ranks of the process group::

        d_i = alpha (x_i - center);   x_i -= d_i;   center += sum_i d_i

    The center is replicated on every rank (float32, on the parameters' device) and the
    replicas stay bit-identical, because every rank adds the same all-reduced sum. An exchange
    is one fused kernel, a bucketed all-reduce of ``d`` (in ``comm_dtype``: bfloat16 halves the
    bytes of float32 parameters), and one fused kernel per bucket as it arrives.

    **EAMSGD** is this averager with Nesterov momentum in the local steps:
    ``torch.optim.SGD(params, lr, momentum=0.9, nesterov=True)`` (the paper's delta).

    Args:
        params: the model's parameters (``model.parameters()``). They are re-pointed as views of
            flat buffers, one per (device, dtype); the ``Parameter`` objects, their gradients and
            any optimizer holding them keep working. Build the averager after moving or casting
            the model. Every rank must pass the same layout (count, shapes, dtypes).
        tau: local steps between exchanges (``step()`` exchanges when its clock is a multiple).
        beta: ``p * alpha``; defaults to 0.9 (the paper's choice). Must be in (0, 1).
        alpha: the moving rate; give ``alpha`` or ``beta``, not both (or both, consistent).
        mode: ``"sync"`` (all workers exchange together over an all-reduce) or ``"async"``
            (each worker exchanges with a shared center on its own clock; see below).
        process_group: the group to average over (default: the default group; a single process
            needs no torch.distributed at all).
        comm_dtype: dtype of ``d`` on the wire: ``None`` (the parameters' dtype),
            ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``.
        bucket_cap_mb: all-reduce bucket size; buckets let the apply kernel of one bucket run
            while later buckets are still in flight.
        allow_unstable: accept ``beta >= 1``.
        center: ``mode="async"`` on one machine: a :class:`~easgd_ext.SharedCenter` or the name
            of one. Default: a single process makes a private one; under torch.distributed
            rank 0 creates one under a fresh name and the other ranks attach to it.
        servers: ``mode="async"`` across machines: the ranks that hold the center, sharded; they
            call :meth:`serve` while the other ranks train.
        lock_timeout: ``mode="async"``: seconds to wait for a chunk lock before raising
            ``TimeoutError`` (a live worker stuck while holding it).

    Asynchronous mode (``mode="async"``), worker ``i`` alone whenever its clock says so::

        e = alpha (x_i - center);   x_i -= e;   center += e

    where ``p`` in ``alpha = beta / p`` is the number of workers (the shared center's
    ``workers``, or the ranks that are not servers). Each exchange locks one chunk of the
    center at a time, so workers never wait for each other except on a chunk being updated;
    a worker that dies holding a lock does not block the others. Call :meth:`close` (or use
    the averager as a context manager) when a worker is done.

    A non-finite ``d`` on any rank (a diverged worker) skips the exchange on every rank, leaving
    every worker and every center replica as they were; it is counted in
    ``stats.skipped_exchanges`` and warned about.
    """

    algorithm = "easgd"
    state_buffers = ("center",)

    def __new__(cls, *args: Any, **kwargs: Any) -> "ElasticAverager":
        if cls is ElasticAverager and _mode_argument(cls.__init__, args, kwargs) == "async":
            from .async_averager import AsyncElasticAverager
            return super().__new__(AsyncElasticAverager)
        return super().__new__(cls)

    def __init__(self, params: Iterable[torch.Tensor], tau: int = 10, beta: float | None = None,
                 alpha: float | None = None, mode: str = "sync", process_group: Any = None,
                 comm_dtype: torch.dtype | str | None = None, bucket_cap_mb: float = 25.0,
                 allow_unstable: bool = False, center: Any = None, servers: Any = None,
                 lock_timeout: float = 300.0) -> None:
        comm = _dist.resolve(process_group)

        def check_settings() -> dict[str, Any]:
            check_mode(mode, center, servers)
            self.alpha, self.beta = elastic_rates(comm.world_size, beta, alpha, allow_unstable)
            return {"mode": mode, "alpha": self.alpha, "beta": self.beta}

        super().__init__(params, comm, tau, comm_dtype, bucket_cap_mb, check_settings)
        self.mode = mode

    def _init_buffers(self, group: FlatGroup) -> None:
        group.buffers["center"] = group.flat.to(torch.float32, copy=True)

    def _prepare(self, group: FlatGroup, start: int, end: int) -> None:
        ops.elastic_difference(group.flat[start:end], group.buffers["center"][start:end],
                               group.buffers["wire"][start:end], self.alpha)

    def _apply(self, group: FlatGroup, start: int, end: int) -> None:
        ops.sync_apply(group.flat[start:end], group.buffers["center"][start:end],
                       group.buffers["wire"][start:end], self.alpha)
