"""The contract between the averager and the place its center lives.

Words, as the code uses them: *the center* is the center variable x~ (float32 values, one
buffer per flat group: ``group.buffers["center"]`` where it is replicated); a :class:`Center`
is where those values live and how a worker exchanges with them (replicated on every rank,
in shared memory, sharded over server ranks); a :class:`~easgd_ext.SharedCenter` is the handle
of one named shared-memory segment (``Center.shared``); the averagers' ``center=`` argument
names such a segment.

The averager calls a center only through :class:`Center`: no ``isinstance``, no reaching into
attributes; it builds one through the :class:`CenterSpec` its ``center=`` argument was given. A
new center is one module with a :class:`Center` and its :class:`CenterSpec`; a user passes the
spec, and a line in ``easgd_ext/__init__.py`` makes it a public name.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from .. import _dist
from ..algorithms import Algorithm
from ..flat_params import ParamGroup
from ..stats import Outcome


@dataclass
class ExchangeRecord:
    """What one exchange did, as the center reports it. Where the outcome is known at once (CPU
    tensors, asynchronous centers) it is ``outcome``; on a GPU it is decided on the device, and
    ``status`` is the status vector to read once the exchange has finished (lazily: the
    averager's log copies it to pinned memory behind an event)."""
    clock: int
    bytes_sent: int = 0                     # what this rank put on the network
    wait_seconds: float = 0.0             # the host's wait for collectives still running
    outcome: Outcome | None = None
    status: torch.Tensor | None = None


@dataclass(frozen=True)
class ExchangeSettings:
    """What every center takes from the averager besides its own :class:`CenterSpec`."""
    tau: int                 # local steps between a worker's exchanges
    on_nonfinite: str        # "reset", "skip" or "raise"
    kernels: str = "fused"   # "fused" (native), or "torch" (every rule's torch-level path, for tests)


class CenterSpec(abc.ABC):
    """Which center an averager exchanges with, and that center's own settings: what the
    averagers' ``center=`` argument takes (:class:`~easgd_ext.Replicated`,
    :class:`~easgd_ext.SharedMemory`, :class:`~easgd_ext.Servers`, or a spec of your own).

    A spec is a frozen dataclass of what the user chose. The averager calls :meth:`checked`
    on every rank while it builds (its errors are raised on every rank alike), then
    :meth:`build` with the checked copy: a new center is one module holding its
    :class:`Center` and its spec, and nothing else changes."""

    mode: ClassVar[str] = "sync"            # what the averager's ``mode`` reports: "sync" or "async"
    # What the averager shows of the center's settings, and on_failure/exchange_timeout are
    # what its survival of a failed exchange obeys: a spec that has them overrides these, a
    # spec wrapping another forwards them.
    comm_dtype: Any = None
    lock_timeout: Any = None
    exchange_timeout: Any = None
    on_failure: str = "raise"

    @abc.abstractmethod
    def checked(self, comm: _dist.Comm, params: list[torch.Tensor],
                settings: ExchangeSettings) -> "CenterSpec":
        """A copy with every setting checked and normalized (``TypeError``/``ValueError``
        naming the argument and what was wrong), for these parameters and this group."""

    @abc.abstractmethod
    def workers(self, comm: _dist.Comm) -> int:
        """p: the workers that exchange with this center (on a checked spec)."""

    def settings(self) -> dict[str, Any]:
        """What a state dict saves of this center's settings (and every rank must agree on)."""
        return {}

    def agreed(self) -> dict[str, Any]:
        """What every rank must agree on without it being saved (a resumed job may choose
        it otherwise)."""
        return {}

    def check_rule(self, algorithm: Algorithm, averager: str) -> None:
        """Raises ``ValueError`` where this center cannot run ``algorithm`` (of the averager
        class named ``averager``) with these settings."""

    @abc.abstractmethod
    def build(self, comm: _dist.Comm, groups: list[ParamGroup], params: list[torch.Tensor],
              algorithm: Algorithm, settings: ExchangeSettings) -> "Center":
        """The center for these flat groups and rule (on a checked spec)."""


class Center(abc.ABC):
    """Where the center lives, and one worker's exchanges with it."""

    workers: int                            # p: the workers that exchange with the center
    is_server: bool = False                 # this rank holds a shard and calls serve()
    worker_id: int | None = None            # this worker's slot in a shared-memory center
    shared: Any = None                      # the SharedCenter handle, where there is one

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
