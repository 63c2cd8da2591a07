"""The center of asynchronous EASGD/DOWNPOUR across machines: sharded over server ranks, reached
with torch.distributed point-to-point messages, as the paper's parameter server was.

Each flat parameter buffer is cut into one contiguous, aligned shard per server. A worker's
exchange sends a request header and its slice of every buffer to every server at once, then
receives the replies; a server answers requests in the order they arrive, from any worker
(any-source receive), so nobody waits for anybody but the server of a shard.

Messages (tags keep them apart; the data always follow their header from the same sender):

==========  ================================  =========================================
request     worker -> server, data             server -> worker
==========  ================================  =========================================
EXCHANGE    the algorithm's payload            its reply (EASGD: x slice after ``x -= e``,
            (EASGD: x; DOWNPOUR: x - x_last)   having done ``c += e``; DOWNPOUR: ``c += v``, c)
READ        -                                  the center slice (float32)
WRITE       float32 center slice               -
DONE        -                                  - (the server returns once all workers are done)
==========  ================================  =========================================

The traffic goes over Gloo (a Gloo group over the same ranks is made when the given group is
NCCL: NCCL has no any-source receive); CUDA parameters are staged through host memory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.distributed as dist

from .._dist import Comm
from .._native import native, num_threads, stream_of
from ..algorithms import Algorithm
from ..flat_params import ALIGN_ELEMENTS, FlatGroup, check_saved
from ..settings import DEFAULT_LOCK_TIMEOUT, check_lock_timeout
from ..stats import Outcome
from .base import Center, CenterSpec, ExchangeRecord, ExchangeSettings

OP_EXCHANGE, OP_READ, OP_WRITE, OP_DONE = 1, 2, 3, 4
TAG_REQUEST, TAG_DATA, TAG_REPLY = 0x4EA1, 0x4EA2, 0x4EA3


def shard_ranges(numel: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous [start, end) ranges covering ``numel``, aligned, as even as the
    alignment allows (trailing shards may be empty for tiny buffers)."""
    blocks = -(-numel // ALIGN_ELEMENTS)
    out, start = [], 0
    for j in range(shards):
        take = blocks // shards + (1 if j < blocks % shards else 0)
        end = min(numel, start + take * ALIGN_ELEMENTS)
        out.append((start, end))
        start = end
    return out


def check_servers(servers: object, world_size: int) -> list[int]:
    """Server ranks: a non-empty list of distinct ranks of the group, leaving at least one
    worker."""
    if isinstance(servers, (str, bytes)) or not hasattr(servers, "__iter__"):
        raise TypeError(f"servers must be a list of ranks, got {type(servers).__name__}")
    ranks = list(servers)  # type: ignore[call-overload]
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int):
            raise TypeError(f"servers must hold int ranks, got {r!r}")
        if not 0 <= r < world_size:
            raise ValueError(f"server rank {r} is not in the group of {world_size} ranks")
    if not ranks or len(set(ranks)) != len(ranks):
        raise ValueError(f"servers must be a non-empty list of distinct ranks, got {ranks}")
    if len(ranks) >= world_size:
        raise ValueError(f"servers={ranks} leaves no worker among {world_size} ranks")
    return sorted(ranks)


@dataclass(frozen=True)
class Servers(CenterSpec):
    """The center of ``mode="async"`` across machines: sharded over the server ``ranks`` of the
    process group, which call :meth:`~easgd_ext.ElasticAverager.serve` while the other ranks
    train and exchange with it by point-to-point messages. ``lock_timeout`` is checked and
    reported (the averager's ``lock_timeout``) but not used: a server answers its requests one
    at a time and holds no chunk locks."""

    ranks: Sequence[int]
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT

    mode: ClassVar[str] = "async"

    def checked(self, comm: Comm, params: list[torch.Tensor], settings: ExchangeSettings) -> Servers:
        lock_timeout = check_lock_timeout(self.lock_timeout)  # None: the default
        if not comm.distributed:
            raise ValueError("servers= needs torch.distributed: the center lives on server ranks "
                             "of the process group")
        return replace(self, ranks=check_servers(self.ranks, comm.world_size), lock_timeout=lock_timeout)

    def workers(self, comm: Comm) -> int:
        return comm.world_size - len(self.ranks)

    def settings(self) -> dict[str, Any]:
        return {"servers": list(self.ranks)}

    def build(self, comm: Comm, groups: list[FlatGroup], params: list[torch.Tensor],
              algorithm: Algorithm, settings: ExchangeSettings) -> ShardedCenter:
        return ShardedCenter(comm, groups, params, algorithm, self, settings)


class ShardedCenter(Center):
    """The center of ``mode="async", servers=[...]``: one rank's end of it, a server's shards or
    a worker's client."""

    def __init__(self, comm: Comm, groups: list[FlatGroup], params: list[torch.Tensor],
                 algorithm: Algorithm, spec: Servers, settings: ExchangeSettings) -> None:
        if algorithm.asynchronous is None:
            raise ValueError(f"{algorithm.name} has no asynchronous form")
        self.rule = algorithm.asynchronous
        servers = list(spec.ranks)
        self._reset = settings.on_nonfinite == "reset"
        self.tau = settings.tau
        self.servers = servers
        self.workers = comm.world_size - len(servers)
        self.is_server = comm.rank in servers
        # Control and data go over Gloo, the backend with any-source receives.
        self._group = comm.group
        if dist.get_backend(comm.group) != "gloo":
            self._group = dist.new_group([comm.global_rank(r) for r in range(comm.world_size)],
                                         backend="gloo")
        self._global = comm.global_rank
        self._groups = groups
        self._shards = [shard_ranges(g.flat.numel(), len(servers)) for g in groups]
        self._closed = False
        self._last: list[Any] = []
        if self.is_server:
            me = servers.index(comm.rank)
            mine = [shards[me] for shards in self._shards]
            self.shards = [g.flat[s:e].detach().to("cpu", torch.float32, copy=True)
                           for g, (s, e) in zip(groups, mine)]
            self._inbox = [torch.empty(e - s, dtype=g.dtype) for g, (s, e) in zip(groups, mine)]
            # The rule's server kernel over each (inbox, shard), prepared once.
            self._serve = [self.rule.serve(box, shard) if shard.numel() else None
                           for box, shard in zip(self._inbox, self.shards)]
            self.requests: dict[str, int] = {"exchange": 0, "read": 0, "write": 0}
            self._header = torch.zeros(2, dtype=torch.int64)
        else:
            self._payload_steps = []
            for g in groups:
                algorithm.init_buffers(g)
            # What goes out (the rule's payload, or x itself), staged in host memory for Gloo,
            # and the replies (a buffer of their own: they arrive while the request is sent).
            self._host, self._payload = [], []
            for g in groups:
                out = torch.empty_like(g.flat)
                step = self.rule.payload(g, out)
                source = out if step is not None else g.flat
                self._payload_steps.append((g.device, step))
                self._payload.append(source)
                self._host.append(source if g.device.type == "cpu" else torch.empty(
                    g.flat.numel(), dtype=g.dtype))
            self._reply = [torch.empty(g.flat.numel(), dtype=g.dtype) for g in groups]

    # ---- server side ------------------------------------------------------------------------------
    def serve(self, on_request: Callable[[str, int], None] | None = None) -> dict[str, int]:
        """Answers requests until every worker has sent DONE; returns request counts.
        ``on_request(op, worker_rank)`` is called after each (e.g. to update a progress bar)."""
        if not self.is_server:
            return super().serve(on_request)  # the contract's error for a worker
        header = self._header
        done: set[int] = set()
        names = {OP_EXCHANGE: "exchange", OP_READ: "read", OP_WRITE: "write", OP_DONE: "done"}
        while len(done) < self.workers:
            src = dist.recv(header, src=None, group=self._group, tag=TAG_REQUEST)
            op = int(header[0])
            if op == OP_EXCHANGE:
                self._serve_exchange(src)
            elif op == OP_READ:
                for c in self.shards:
                    if c.numel():
                        self._wait(dist.isend(c, dst=src, group=self._group, tag=TAG_REPLY))
            elif op == OP_WRITE:
                for c in self.shards:
                    if c.numel():
                        self._wait(dist.irecv(c, src=src, group=self._group, tag=TAG_DATA))
            elif op == OP_DONE:
                done.add(src)
            else:
                raise RuntimeError(f"server got unknown request {op} from rank {src}")
            if op != OP_DONE:
                self.requests[names[op]] += 1
            if on_request is not None:
                on_request(names.get(op, "?"), src)
        return dict(self.requests)

    def _serve_exchange(self, src: int) -> None:
        threads = num_threads()
        for box, launch in zip(self._inbox, self._serve):
            if launch is None:
                continue
            self._wait(dist.irecv(box, src=src, group=self._group, tag=TAG_DATA))
            native.run([launch], 0, threads)
            self._wait(dist.isend(box, dst=src, group=self._group, tag=TAG_REPLY))

    def _wait(self, work: Any) -> None:
        work.wait()
        self._last = [work]  # ours is the last reference (see _transact)

    # ---- worker side ------------------------------------------------------------------------------
    def _transact(self, op: int, clock: int = 0, send: list[torch.Tensor] | None = None,
                  receive: list[torch.Tensor] | None = None) -> None:
        """Posts the request header, the data and the receives for the replies, to and from every
        server at once, then waits for all of them. Posting everything first matters: Gloo moves
        a message only once its receive is posted, so a worker that waited for one server before
        posting to the next could wait in a cycle with another worker and both servers."""
        headers = [torch.tensor([op, clock], dtype=torch.int64) for _ in self.servers]
        works = [dist.isend(h, dst=self._global(s), group=self._group, tag=TAG_REQUEST)
                 for h, s in zip(headers, self.servers)]
        if send is not None:
            works += [dist.isend(t, dst=dst, group=self._group, tag=TAG_DATA)
                      for dst, t in self._each_slice(send)]
        if receive is not None:
            works += [dist.irecv(t, src=src, group=self._group, tag=TAG_REPLY)
                      for src, t in self._each_slice(receive)]
        for w in works:
            w.wait()
        # Kept until the next transaction: the last reference to a finished message's tensors
        # must be ours, not Gloo's thread's (which at interpreter exit aborts the process).
        self._last = works

    def _each_slice(self, buffers: list[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
        """(server global rank, that server's slice of each buffer), non-empty slices only."""
        out = []
        for j, server in enumerate(self.servers):
            for buf, shards in zip(buffers, self._shards):
                s, e = shards[j]
                if e > s:
                    out.append((self._global(server), buf[s:e]))
        return out

    def exchange(self, clock: int) -> list[ExchangeRecord]:
        """One exchange with every shard: the algorithm's payload goes out, the new
        parameters come back. Non-finite parameters skip it (the center is left alone)."""
        if self._closed:
            raise RuntimeError("exchange() after close()")
        threads = num_threads()
        for (device, step), payload, host in zip(self._payload_steps, self._payload, self._host):
            if step is not None:
                native.run([step], stream_of(device), threads)
            if host is not payload:
                host.copy_(payload)
        # A non-finite payload is not sent (host memory here: no device sync).
        if any(not torch.isfinite(h).all() for h in self._host):
            if self._reset:  # restart from the center, which this worker leaves alone
                for g, c in zip(self._groups, self.read()):
                    self.rule.take_reply(g, c.to(g.dtype))
            return [ExchangeRecord(clock, 0, outcome=Outcome(
                clock, bad_ranks=1, me_bad=True, applied=self._reset))]
        self._transact(OP_EXCHANGE, clock, send=self._host, receive=self._reply)
        for g, reply in zip(self._groups, self._reply):
            self.rule.take_reply(g, reply)
        return [ExchangeRecord(clock, sum(h.nbytes for h in self._host), outcome=Outcome(clock))]

    def read(self) -> list[torch.Tensor]:
        """The whole center (float32, on the CPU), assembled from every server."""
        out = [torch.empty(g.flat.numel(), dtype=torch.float32) for g in self._groups]
        self._transact(OP_READ, receive=out)
        return out

    def write(self, centers: list[torch.Tensor]) -> None:
        """Overwrites the center on every server (e.g. from a checkpoint)."""
        self._transact(OP_WRITE, send=[c.detach().to("cpu", torch.float32).contiguous()
                                       for c in centers])

    def close(self) -> None:
        """Tells every server this worker is done (once)."""
        if not self.is_server and not self._closed:
            self._closed = True
            self._transact(OP_DONE)

    def save(self) -> dict[str, list[torch.Tensor]]:
        """Checkpoint: each server keeps (and saves) its own shards; workers keep none."""
        return {"center_shards": [c.clone() for c in self.shards]} if self.is_server else {}

    def load(self, buffers: dict[str, Any]) -> None:
        if self.is_server:
            check_saved("center_shards", buffers.get("center_shards"), self.shards)
            for c, saved in zip(self.shards, buffers["center_shards"]):
                c.copy_(saved)
