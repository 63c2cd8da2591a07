"""The update rules: what EASGD, DOWNPOUR and periodic averaging do in an exchange, as fused
kernels for each kind of center. An algorithm knows nothing of transports; a center asks it
for the kernels it needs:

* replicated center (synchronous, over an all-reduce): :meth:`Algorithm.send` fills the wire
  from the parameters (reading, never writing, what a worker trains with), :meth:`Algorithm.apply`
  consumes one all-reduced bucket, guarded by the exchange's verdict;
* shared-memory center (asynchronous, one machine): :meth:`Algorithm.chunk_rule`, the kernel the
  native exchange applies chunk by chunk under the chunks' locks;
* sharded center (asynchronous, across machines): :meth:`Algorithm.shard_payload`,
  :meth:`Algorithm.serve_shard` and :meth:`Algorithm.take_reply`, the worker's and the
  server's halves of one exchange.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from . import ops
from ._native import native, tensor_ref
from .flat_params import FlatGroup


def _refs(**tensors: torch.Tensor) -> dict[str, Any]:
    return {name: tensor_ref(name, t) for name, t in tensors.items()}


class Algorithm:
    """Base of the update rules. ``name`` travels in checkpoints; ``worker_buffers`` are kept
    per flat group besides the center (and saved with it); ``has_center`` is False where the
    workers themselves are the result (averaging)."""

    name: ClassVar[str] = ""
    worker_buffers: ClassVar[tuple[str, ...]] = ()
    has_center: ClassVar[bool] = True
    supports_async: ClassVar[bool] = True

    def settings(self) -> dict[str, Any]:
        """What must agree across ranks and be restored from checkpoints (rates)."""
        return {}

    def init_buffers(self, group: FlatGroup) -> None:
        """Allocate the per-group worker buffers (called once the parameters are final)."""

    # ---- replicated center ------------------------------------------------------------------------
    def send(self, group: FlatGroup, wire: torch.Tensor, nonfinite: torch.Tensor) -> Any:
        """The launch that writes this worker's contribution into ``wire`` (the data part of
        the wire buffer) and sets ``nonfinite`` if any stored value is Inf/NaN."""
        raise NotImplementedError

    def apply(self, group: FlatGroup, start: int, end: int, reduced: torch.Tensor,
              guard: dict[str, Any]) -> Any:
        """The launch that consumes ``reduced`` (the all-reduced elements [start, end)),
        guarded by the exchange's verdict (``guard``: the native guard arguments)."""
        raise NotImplementedError

    # ---- shared-memory center ---------------------------------------------------------------------
    def chunk_rule(self, group: FlatGroup) -> Any:
        """The native rule the shared center's exchange applies chunk by chunk."""
        raise NotImplementedError

    # ---- sharded center -----------------------------------------------------------------------------
    def shard_payload(self, group: FlatGroup, host_x: torch.Tensor) -> torch.Tensor:
        """What the worker sends to the servers (host memory, this group's whole length)."""
        raise NotImplementedError

    def serve_shard(self, inbox: torch.Tensor, center: torch.Tensor) -> None:
        """Server side: update the center shard from a worker's ``inbox``; ``inbox`` then holds
        the reply."""
        raise NotImplementedError

    def take_reply(self, group: FlatGroup, reply: torch.Tensor) -> None:
        """Worker side: the new parameters (and worker buffers) from the servers' reply."""
        with torch.no_grad():
            group.flat.copy_(reply)


class Elastic(Algorithm):
    """EASGD (and EAMSGD, with a Nesterov-momentum local optimizer) with moving rate ``alpha``."""

    name = "easgd"

    def __init__(self, alpha: float, beta: float) -> None:
        self.alpha, self.beta = alpha, beta

    def settings(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta}

    def send(self, group, wire, nonfinite):
        return native.prepare.elastic_difference(
            **_refs(x=group.flat, center=group.buffers["center"], wire=wire, nonfinite=nonfinite),
            alpha=self.alpha)

    def apply(self, group, start, end, reduced, guard):
        return native.prepare.sync_apply(
            **_refs(x=group.flat[start:end], center=group.buffers["center"][start:end],
                    reduced=reduced), alpha=self.alpha, **guard)

    def chunk_rule(self, group):
        return native.ChunkRule.elastic(tensor_ref("x", group.flat), self.alpha)

    def shard_payload(self, group, host_x):
        return host_x

    def serve_shard(self, inbox, center):
        ops.async_exchange(inbox, center, self.alpha)  # inbox: the worker's new x


class Downpour(Algorithm):
    """DOWNPOUR: push the change since the last pull into the center, pull the center."""

    name = "downpour"
    worker_buffers = ("x_last",)

    def init_buffers(self, group):
        group.buffers["x_last"] = group.flat.clone()

    def send(self, group, wire, nonfinite):
        return native.prepare.downpour_push(
            **_refs(x=group.flat, x_last=group.buffers["x_last"], wire=wire, nonfinite=nonfinite))

    def apply(self, group, start, end, reduced, guard):
        b = group.buffers
        return native.prepare.downpour_pull(
            **_refs(center=b["center"][start:end], reduced=reduced, x=group.flat[start:end],
                    x_last=b["x_last"][start:end]), **guard)

    def chunk_rule(self, group):
        return native.ChunkRule.downpour(tensor_ref("x", group.flat),
                                         tensor_ref("x_last", group.buffers["x_last"]))

    def shard_payload(self, group, host_x):
        # The servers need x - x_last; x_last lives on the worker's device, like x.
        return host_x - group.buffers["x_last"].to("cpu")

    def serve_shard(self, inbox, center):
        center.add_(inbox.to(torch.float32))  # c += v; the reply is the new center
        inbox.copy_(center)

    def take_reply(self, group, reply):
        with torch.no_grad():
            group.flat.copy_(reply)
            group.buffers["x_last"].copy_(group.flat)


class Averaging(Algorithm):
    """Periodic model averaging: every worker becomes the mean of all workers."""

    name = "average"
    has_center = False
    supports_async = False

    def send(self, group, wire, nonfinite):
        return native.prepare.average_send(**_refs(x=group.flat, wire=wire, nonfinite=nonfinite))

    def apply(self, group, start, end, reduced, guard):
        return native.prepare.average_apply(**_refs(x=group.flat[start:end], reduced=reduced),
                                            scale=1.0 / max(1, guard["world"]), **guard)
