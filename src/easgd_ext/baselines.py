"""The baselines EASGD is compared with, behind the same interface as
:class:`~easgd_ext.ElasticAverager` so a training script switches algorithm by name."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from . import _dist, ops
from .averager import SyncAverager
from .elastic import _mode_argument, check_mode
from .flat_params import FlatGroup


class _Baseline(SyncAverager):
    """The constructor the baselines share: ElasticAverager's arguments without beta/alpha."""

    has_async_mode = False

    def __init__(self, params: Iterable[torch.Tensor], tau: int = 10, mode: str = "sync",
                 process_group: Any = None, comm_dtype: torch.dtype | str | None = None,
                 bucket_cap_mb: float = 25.0, center: Any = None, servers: Any = None,
                 lock_timeout: float = 300.0) -> None:
        def check_settings() -> dict[str, Any]:
            if mode == "async" and not self.has_async_mode:
                raise ValueError(f"{type(self).__name__} has no mode='async': averaging all "
                                 "workers is synchronous by definition")
            check_mode(mode, center, servers)
            return {"mode": mode}

        super().__init__(params, _dist.resolve(process_group), tau, comm_dtype, bucket_cap_mb,
                         check_settings)
        self.mode = mode


class DownpourAverager(_Baseline):
    """DOWNPOUR (Dean et al., 2012). Synchronous form (``mode="sync"``): every ``tau`` local steps each worker
    pushes its change since the last pull, ``v_i = x_i - x_i(last pull)``; the center (a
    float32 replica on every rank) takes ``center += sum_i v_i`` and every worker pulls
    ``x_i = center``.

    Arguments and methods are those of :class:`~easgd_ext.ElasticAverager` without
    ``beta``/``alpha``. A non-finite ``v`` on any rank skips the exchange on every rank.

    Asynchronous form (``mode="async"``, the paper's baseline), worker ``i`` alone:
    ``center += x_i - x_i(last pull); x_i = center``, against the same shared or sharded
    centers as asynchronous EASGD (``center=``, ``servers=``, ``lock_timeout=``).
    """

    algorithm = "downpour"
    state_buffers = ("center", "x_last")
    has_async_mode = True

    def __new__(cls, *args: Any, **kwargs: Any) -> "DownpourAverager":
        if cls is DownpourAverager and _mode_argument(cls.__init__, args, kwargs) == "async":
            from .async_averager import AsyncDownpourAverager
            return super().__new__(AsyncDownpourAverager)
        return super().__new__(cls)

    def _init_buffers(self, group: FlatGroup) -> None:
        group.buffers["center"] = group.flat.to(torch.float32, copy=True)
        group.buffers["x_last"] = group.flat.clone()

    def _prepare(self, group: FlatGroup, start: int, end: int) -> None:
        b = group.buffers
        ops.downpour_push(group.flat[start:end], b["x_last"][start:end], b["wire"][start:end])

    def _apply(self, group: FlatGroup, start: int, end: int) -> None:
        b = group.buffers
        ops.downpour_pull(b["center"][start:end], b["wire"][start:end], group.flat[start:end],
                          b["x_last"][start:end])


class PeriodicAverager(_Baseline):
    """Periodic model averaging (what PyTorch ships as ``PeriodicModelAverager``): every
    ``tau`` local steps, ``x_i = mean_j x_j``.

    Arguments and methods are those of :class:`~easgd_ext.ElasticAverager` without
    ``beta``/``alpha``. Unlike PyTorch's averager it does not average on the very first call
    (its clock counts completed steps, like the others here), it all-reduces one flat buffer per
    dtype instead of concatenating and copying back, and a non-finite value on any rank skips
    the averaging on every rank instead of spreading to all of them. With ``comm_dtype`` below
    the parameters' precision the averaged parameters are rounded to it. There is no separate
    center: :meth:`center_parameters` leaves the model as it is (the workers are equal right
    after each averaging).
    """

    algorithm = "average"

    def _prepare(self, group: FlatGroup, start: int, end: int) -> None:
        # Through a separate wire buffer, so a skipped averaging leaves the parameters alone.
        ops.average_apply(group.buffers["wire"][start:end], group.flat[start:end], 1.0)

    def _apply(self, group: FlatGroup, start: int, end: int) -> None:
        ops.average_apply(group.flat[start:end], group.buffers["wire"][start:end],
                          1.0 / self.world_size)
