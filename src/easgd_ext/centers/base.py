"""The contract between the averager and the place its center lives.

Words, as the code uses them: *the center* is the center variable x~ (float32 values, one
buffer per flat group: ``group.buffers["center"]`` where it is replicated); a :class:`Center`
is where those values live and how a worker exchanges with them (replicated on every rank,
in shared memory, sharded over server ranks); a :class:`~easgd_ext.SharedCenter` is the handle
of one named shared-memory segment (``Center.shared``); the averagers' ``center=`` argument
names such a segment.

The averager calls a center only through :class:`Center`: no ``isinstance``, no reaching into
attributes. A new center is one module with a :class:`Center` subclass plus one line in
:data:`CENTERS` (``centers/__init__.py``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from .. import _dist
from ..algorithms import Algorithm
from ..flat_params import FlatGroup
from ..stats import Outcome


@dataclass
class ExchangeRecord:
    """What one exchange did, as the center reports it. Where the outcome is known at once (CPU
    tensors, asynchronous centers) it is ``outcome``; on a GPU it is decided on the device, and
    ``status`` is the status vector to read once the exchange has finished (lazily: the
    averager's log copies it to pinned memory behind an event)."""
    clock: int
    bytes_sent: int = 0                     # what this rank put on the network
    waited_seconds: float = 0.0             # the host's wait for collectives still running
    outcome: Outcome | None = None
    status: torch.Tensor | None = None


@dataclass
class CenterConfig:
    """Everything a center may need besides the process group, the flat groups and the rule;
    each center reads its own fields (the averager has checked them)."""
    on_nonfinite: str = "reset"
    tau: int = 10
    # replicated (mode="sync")
    comm_dtype: torch.dtype | None = None            # torch.int8: the 8-bit wire
    fragments: int = 1
    delay: int = 0
    bucket_bytes: int = 25 * 2**20
    exchange_timeout: float = 300.0
    gloo_chunk_bytes: int = 64 * 1024  # the quantized wire's piece per peer over Gloo
    on_failure: str = "raise"  # "continue": a failed exchange is survived (the averager re-forms)
    # DTensor parameters: the groups connecting this replica's other ranks (the other shards);
    # an exchange's non-finite flag is shared with them before it is published, so a replica
    # is decided as a whole.
    verdict_groups: list[Any] = field(default_factory=list)
    # shared memory (mode="async", one machine)
    shared: Any = None                      # a SharedCenter, a name, or None: make one
    lock_timeout: float = 300.0
    # sharded (mode="async", servers=[...])
    servers: list[int] = field(default_factory=list)
    # kernels: "fused" (native), or "torch" (every rule's torch-level path, for tests)
    kernels: str = "fused"


class Center(abc.ABC):
    """Where the center lives, and one worker's exchanges with it."""

    kind: ClassVar[str] = ""
    workers: int                            # p: the workers that exchange with the center
    is_server: bool = False                 # this rank holds a shard and calls serve()
    worker_id: int | None = None            # this worker's slot in a shared-memory center
    shared: Any = None                      # the SharedCenter handle, where there is one

    @abc.abstractmethod
    def __init__(self, comm: _dist.Comm, groups: list[FlatGroup], params: list[torch.Tensor],
                 algorithm: Algorithm, config: CenterConfig) -> None: ...

    tau: int = 10
    in_flight: int = 0                      # exchanges sent and not applied yet

    @abc.abstractmethod
    def exchange(self, clock: int) -> list[ExchangeRecord]:
        """This worker's exchange now, whatever the clock says, applied before returning
        (collective for the replicated center); one record per part exchanged."""

    def due(self, clock: int) -> bool:
        """Whether :meth:`advance` has anything to do at step ``clock``."""
        return clock % self.tau == 0

    def advance(self, clock: int) -> list[ExchangeRecord]:
        """Step ``clock``'s exchanges, as the schedule says (called only where :meth:`due`);
        the records of those that completed."""
        return self.exchange(clock)

    def flush(self, clock: int) -> list[ExchangeRecord]:
        """Completes (and applies) every exchange in flight now."""
        return []

    def bytes_schedule(self) -> list[int]:
        """Bytes this rank sends at each step of a ``tau`` window ([] where it is not known
        ahead: asynchronous centers)."""
        return []

    @abc.abstractmethod
    def read(self) -> list[torch.Tensor]:
        """The center, one float32 tensor per flat group (views where it is local: read them,
        do not keep them)."""

    @abc.abstractmethod
    def write(self, values: list[torch.Tensor]) -> None:
        """Overwrites the center."""

    @abc.abstractmethod
    def save(self) -> dict[str, list[torch.Tensor]]:
        """What this rank keeps of the center in a checkpoint (CPU tensors, by key)."""

    @abc.abstractmethod
    def load(self, buffers: dict[str, Any]) -> None:
        """Restores what :meth:`save` returned on this rank."""

    def close(self) -> None:
        """This worker is done with the center. Idempotent."""

    def serve(self, on_request: Callable[[str, int], None] | None = None) -> dict[str, int]:
        """On a server rank: answer the workers until they are done."""
        raise RuntimeError("serve() is for server ranks (servers=[...]); this rank is a worker")
