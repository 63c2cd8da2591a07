"""Where the center lives, and how a worker exchanges with it (the contract: :mod:`.base`).

* :class:`ReplicatedCenter` (``mode="sync"``): a replica on every rank, all-reduce;
* :class:`SharedMemoryCenter` (``mode="async"``): named shared memory on one machine;
* :class:`ShardedCenter` (``mode="async", servers=[...]``): shards on server ranks, reached by
  point-to-point messages across machines.

:func:`make_center` builds one by its ``kind``; a new center is a module with a
:class:`~.base.Center` subclass and one line in :data:`CENTERS`.
"""

from __future__ import annotations

import torch

from .. import _dist
from ..algorithms import Algorithm
from ..flat_params import FlatGroup
from .base import Center, CenterConfig, ExchangeRecord
from .replicated import ExchangeError, ReplicatedCenter
from .sharded import ShardedCenter, check_servers
from .shared import SharedMemoryCenter, attach_given

CENTERS: dict[str, type[Center]] = {
    ReplicatedCenter.kind: ReplicatedCenter,
    SharedMemoryCenter.kind: SharedMemoryCenter,
    ShardedCenter.kind: ShardedCenter,
}

__all__ = ["Center", "CenterConfig", "ExchangeRecord", "ExchangeError", "CENTERS", "make_center",
           "kind_for", "check_servers", "attach_given"]


def kind_for(mode: str, servers: object) -> str:
    """Which center the averagers' arguments ask for."""
    if mode == "sync":
        return ReplicatedCenter.kind
    return ShardedCenter.kind if servers is not None else SharedMemoryCenter.kind


def make_center(kind: str, comm: _dist.Comm, groups: list[FlatGroup], params: list[torch.Tensor],
                algorithm: Algorithm, config: CenterConfig) -> Center:
    """The center of ``kind`` (a key of :data:`CENTERS`) for these flat groups and rule."""
    return CENTERS[kind](comm, groups, params, algorithm, config)
