"""Where the center lives, and how a worker exchanges with it (the contract: :mod:`.base`).

Each center is one module holding its :class:`~.base.Center` and the
:class:`~.base.CenterSpec` a user passes as the averagers' ``center=`` argument:

* :class:`Replicated` (``mode="sync"``): a replica on every rank, all-reduce;
* :class:`SharedMemory` (``mode="async"``): named shared memory on one machine;
* :class:`Servers` (``mode="async", servers=[...]``): shards on server ranks, reached by
  point-to-point messages across machines.

The averagers' keyword arguments (``mode``, ``comm_dtype``, ``servers``, ...) are a shorthand
for these specs: :func:`spec_from_arguments`.
"""

from __future__ import annotations

from typing import Any

from ..settings import check_mode, reject_other_mode_arguments
from .base import Center, CenterSpec, ExchangeRecord, ExchangeSettings
from .replicated import ExchangeError, Replicated, ReplicatedCenter
from .sharded import Servers, ShardedCenter, check_servers
from .shared import SharedMemory, SharedMemoryCenter, attach_given

__all__ = ["Center", "CenterSpec", "ExchangeRecord", "ExchangeSettings", "ExchangeError",
           "Replicated", "SharedMemory", "Servers", "ReplicatedCenter", "SharedMemoryCenter",
           "ShardedCenter", "spec_from_arguments", "check_servers", "attach_given"]


def spec_from_arguments(mode: object, center: object, servers: object, lock_timeout: object,
                        sync_arguments: dict[str, Any]) -> CenterSpec:
    """The center the averagers' keyword arguments ask for. ``center`` is a :class:`CenterSpec`
    (then the center's own settings belong inside it), or the shorthand's shared-memory
    segment; ``sync_arguments`` holds the settings of :class:`Replicated`, ``None`` where the
    user left one out."""
    given = {name: value for name, value in sync_arguments.items() if value is not None}
    if isinstance(center, CenterSpec):
        if mode is not None and check_mode(mode) != center.mode:
            raise ValueError(f"mode={mode!r} with center={type(center).__name__}(...), a "
                             f"mode={center.mode!r} center: leave mode out")
        beside = [*given, *(name for name, value in (("servers", servers),
                                                     ("lock_timeout", lock_timeout))
                            if value is not None)]
        if beside:
            raise ValueError(f"{', '.join(beside)} beside center={type(center).__name__}(...): "
                             f"{'it is a setting' if len(beside) == 1 else 'they are settings'} "
                             "of the center; give them inside it")
        return center
    mode = check_mode("sync" if mode is None else mode)
    if mode == "sync":
        reject_other_mode_arguments("sync", {"center": center, "servers": servers,
                                             "lock_timeout": lock_timeout})
        return Replicated(**given)
    reject_other_mode_arguments("async", sync_arguments)
    async_arguments = {} if lock_timeout is None else {"lock_timeout": lock_timeout}
    if center is not None and servers is not None:
        raise ValueError("give center= (a shared-memory center on one machine) or servers= (a "
                         "sharded center across machines), not both")
    if servers is not None:
        return Servers(servers, **async_arguments)  # type: ignore[arg-type]
    return SharedMemory(center, **async_arguments)  # type: ignore[arg-type]
