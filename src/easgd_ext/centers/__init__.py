"""Where the center lives, and how a worker exchanges with it. ``mode=``, ``center=`` and
``servers=`` of the averagers choose one of:

* :class:`ReplicatedCenter` (``mode="sync"``): a replica on every rank, all-reduce;
* :class:`SharedMemoryCenter` (``mode="async"``): named shared memory on one machine;
* :class:`ShardedCenter` (``mode="async", servers=[...]``): shards on server ranks, reached by
  point-to-point messages across machines.

Each offers the same small surface to :class:`~easgd_ext.averager.Averager`:
``exchange(clock)`` (``None`` when the outcome is read later from ``status``, else an
:class:`~easgd_ext.stats.Outcome`), ``read()``/``write(values)`` (the center, one float32 tensor
per flat group), ``bytes_per_exchange()``, ``close()``, and the attributes ``workers`` (p, which
sets the default moving rate) and ``transport``.
"""

from .replicated import ExchangeError, ReplicatedCenter
from .sharded import ShardedCenter, check_servers
from .shared import SharedMemoryCenter

__all__ = ["ReplicatedCenter", "SharedMemoryCenter", "ShardedCenter", "ExchangeError",
           "check_servers"]
