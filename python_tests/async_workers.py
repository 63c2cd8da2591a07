"""What the spawned processes of the asynchronous tests run (importable, so spawn can find it).

Workers "train" without gradients: after joining they perturb their parameters once (a local
step) and then only exchange, so ``sum_i x_i + center`` must stay what it was.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import torch
import torch.distributed as dist

from easgd_ext import DownpourAverager, ElasticAverager, SharedCenter

CHUNK_MB = 16 * 1024 * 4 / 2**20  # 16K-element chunks: many chunks, many lock hand-overs


def model_params(numel: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Two parameters (so the flat buffer has a gap) of random values."""
    g = torch.Generator().manual_seed(seed)
    first = numel // 3
    return [torch.nn.Parameter(torch.randn(first, generator=g).to(dtype)),
            torch.nn.Parameter(torch.randn(numel - first, generator=g).to(dtype))]


def perturb(params: list[torch.Tensor], seed: int) -> None:
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype))


def flat_values(avg: Any) -> torch.Tensor:
    return torch.cat([f.double() for f in avg.flat_parameters()])


def perturb_and_exchange(avg: Any, params: list[torch.Tensor], seed: int,
                         exchanges: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One local "step" (a random perturbation), then ``exchanges`` clock ticks (tau = 1);
    returns the parameters after the perturbation and at the end."""
    perturb(params, seed)
    initial = flat_values(avg)
    for _ in range(exchanges):
        avg.step()
    return initial, flat_values(avg)


def shared_worker(name: str, numel: int, dtype: torch.dtype, seed: int, exchanges: int,
                  algo: str = "easgd", alpha: float = 0.2) -> dict[str, Any]:
    """Attaches to ``name``, perturbs, exchanges ``exchanges`` times; returns its mass."""
    params = model_params(numel, dtype, seed)
    if algo == "easgd":
        avg = ElasticAverager(params, tau=1, mode="async", center=name, alpha=alpha)
    else:
        avg = DownpourAverager(params, tau=1, mode="async", center=name)
    start = flat_values(avg)
    initial, final = perturb_and_exchange(avg, params, seed, exchanges)
    avg.close()
    return {"start": start, "initial": initial, "final": final, "exchanges": avg.stats.exchanges,
            "worker_id": avg.worker_id}


def uniform_chunk_worker(name: str, seed: int, exchanges: int) -> int:
    """Parameters constant on every center chunk, so the center stays constant on every chunk
    after every complete chunk update; exchanges and returns how many it made."""
    center = SharedCenter.attach(name)
    values = torch.empty(center.numel)
    g = torch.Generator().manual_seed(seed)
    for k in range(center.num_chunks):
        s, e = center.chunk_range(k)
        values[s:e] = float(torch.randn(1, generator=g)) * 10
    param = torch.nn.Parameter(torch.zeros(center.numel))
    avg = ElasticAverager([param], tau=1, mode="async", center=center, alpha=0.25)
    done = 0
    for i in range(exchanges):
        with torch.no_grad():  # a new uniform-per-chunk target each time: lots of change
            param.copy_(values * (1 + (i % 7)))
        avg.exchange()
        done += 1
    avg.close()
    return done


def locked_reader(name: str, stop: Any, min_reads: int) -> tuple[int, int]:
    """Reads random chunks under their locks until the test sets ``stop`` (and at least
    ``min_reads`` times); returns (reads, torn reads)."""
    center = SharedCenter.attach(name)
    g = torch.Generator().manual_seed(7)
    reads = torn = 0
    while reads < min_reads or not stop.is_set():
        k = int(torch.randint(center.num_chunks, (1,), generator=g))
        s, e = center.chunk_range(k)
        with center.lock(k):
            chunk = center.tensor[s:e].clone()
        reads += 1
        torn += int(chunk.max() != chunk.min())
    return reads, torn


def victim(name: str, numel: int, seed: int, exchanges: int, chunk: int, dirty: bool,
           report: str, ready: Any) -> None:
    """Exchanges, saves its parameters after its last complete exchange, then takes ``chunk``'s
    lock (and marks it mid-update if ``dirty``) and waits to be killed."""
    params = model_params(numel, torch.float32, seed)
    avg = ElasticAverager(params, tau=1, mode="async", center=name, alpha=0.2)
    perturb(params, seed)
    torch.save(flat_values(avg), report + ".initial")
    for _ in range(exchanges):
        avg.exchange()
    torch.save(flat_values(avg), report)
    avg.center.segment.lock(chunk, 0.0)
    if dirty:
        avg.center.segment.set_dirty(chunk, True)
    ready.set()
    time.sleep(600)


def hold_lock(name: str, chunk: int, ready: Any, release: Any) -> None:
    """Holds ``chunk``'s lock from ``ready`` until the test sets ``release``."""
    center = SharedCenter.attach(name)
    with center.lock(chunk):
        ready.set()
        release.wait(600)


def try_lock(name: str, chunk: int, timeout: float) -> float:
    """Seconds it took to get ``chunk``'s lock."""
    center = SharedCenter.attach(name)
    start = time.monotonic()
    with center.lock(chunk, timeout):
        return time.monotonic() - start


def create_and_die(name: str, numel: int, ready: Any, persistent: bool = False) -> None:
    """Creates a center and waits to be killed or terminated."""
    SharedCenter.create(name, like=[torch.zeros(numel)], workers=2, persistent=persistent)
    ready.set()
    time.sleep(600)


def create_with_own_sigterm_handler(name: str, ready: Any, marker: str) -> None:
    """Creates a center after installing its own SIGTERM handler, which writes ``marker``
    and exits 3: both the user's handler and the cleanup must run."""
    import signal
    import sys

    def handler(signum, frame):
        with open(marker, "w") as f:
            f.write("handled")
        sys.exit(3)

    signal.signal(signal.SIGTERM, handler)
    SharedCenter.create(name, like=[torch.zeros(100)], workers=1)
    ready.set()
    time.sleep(600)


# ---- under torch.distributed (dist_harness.run_ranks) -------------------------------------------
def auto_center(rank: int, world: int, numel: int, exchanges: int, algo: str) -> dict[str, Any]:
    """mode='async' with no center: rank 0 creates one, the others attach."""
    params = model_params(numel, torch.float32, rank)
    cls = ElasticAverager if algo == "easgd" else DownpourAverager
    avg = cls(params, tau=1, mode="async")
    start_center = avg.center.snapshot().double()
    start = flat_values(avg)
    dist.barrier()  # nobody exchanges before everyone has seen the starting center
    initial, final = perturb_and_exchange(avg, params, rank, exchanges)
    avg.close()
    dist.barrier()  # every worker is done: the center is final
    center = torch.cat([c.double() for c in avg.center_state()])
    return {"name": avg.center.name, "owner": avg.center.owner, "start": start, "initial": initial,
            "final": final, "center0": start_center, "center": center,
            "workers": avg.center.workers, "alpha": getattr(avg, "alpha", None)}


def missing_center(rank: int, world: int) -> None:
    """Only rank 1 names a center that does not exist."""
    name = "no-such-center-easgd-test" if rank == 1 else None
    ElasticAverager([torch.nn.Parameter(torch.randn(10))], mode="async", center=name)


def server_misuse(rank: int, world: int) -> list[str]:
    """Each side calls the other side's method first (an error), then does its own job."""
    avg = ElasticAverager([torch.nn.Parameter(torch.randn(100))], mode="async", servers=[0],
                          alpha=0.5)
    errors = []
    try:
        avg.step() if avg.is_server else avg.serve()
    except RuntimeError as exc:
        errors.append(str(exc))
    if avg.is_server:
        avg.serve()
    else:
        avg.exchange()
        avg.close()
        avg.close()  # idempotent: the server must not see a second DONE
    return errors


def other_host(rank: int, world: int) -> None:
    """Rank 1 pretends to run on another machine."""
    if rank == 1:
        socket.gethostname = lambda: "another-machine"  # type: ignore[assignment]
    ElasticAverager([torch.nn.Parameter(torch.randn(10))], mode="async")


def sharded(rank: int, world: int, servers: list[int], numel: int, exchanges: int,
            algo: str, dtype: torch.dtype) -> dict[str, Any]:
    """A sharded center on ``servers``; the other ranks perturb and exchange at different paces,
    then (all workers done) read the final center."""
    workers = [r for r in range(world) if r not in servers]
    worker_group = dist.new_group(workers)
    params = model_params(numel, dtype, 0)  # identical everywhere, as after the broadcast
    cls = ElasticAverager if algo == "easgd" else DownpourAverager
    kwargs = {"alpha": 0.2} if algo == "easgd" else {}
    avg = cls(params, tau=1, mode="async", servers=servers, **kwargs)
    if avg.is_server:
        return {"served": avg.serve()}
    center0 = torch.cat([c.double() for c in avg.center_state()])
    start = flat_values(avg)
    dist.barrier(group=worker_group)  # nobody exchanges before every worker read the start
    initial, final = perturb_and_exchange(avg, params, rank, exchanges + 7 * rank)
    dist.barrier(group=worker_group)
    center = torch.cat([c.double() for c in avg.center_state()])
    avg.close()
    return {"start": start, "initial": initial, "final": final, "center0": center0,
            "center": center, "exchanges": avg.stats.exchanges, "bytes": avg.stats.bytes_sent}


def async_checkpoint(rank: int, world: int, algo: str, sharded: bool, split: int | None,
                     turns: int = 6) -> dict[str, Any]:
    """Workers exchange in a fixed order (one at a time, barriers between), so the whole run is
    deterministic; with ``split``, after that many turns every rank saves its state, the
    averagers are rebuilt (a new center) and every rank loads its own state back."""
    servers = [0] if sharded else None
    workers = [r for r in range(world) if not sharded or r != 0]
    group = dist.new_group(workers)
    params = model_params(3001, torch.float32, rank)
    cls = ElasticAverager if algo == "easgd" else DownpourAverager
    kwargs = {"alpha": 0.2} if algo == "easgd" else {}

    def build() -> Any:
        return cls(params, tau=1, mode="async", servers=servers, **kwargs)

    avg = build()
    if avg.is_server:
        if split is not None:  # first life: serve until the workers checkpoint and close
            avg.serve()
            state = avg.state_dict()
            avg = build()
            avg.load_state_dict(state)
        avg.serve()
        return {"server": True}
    g = torch.Generator().manual_seed(1000 + rank)
    dist.barrier(group=group)  # every worker has started from the center before anyone exchanges
    for turn in range(turns):
        if turn == split:
            state = avg.state_dict()
            saved = [p.detach().clone() for p in params]
            avg.close()
            dist.barrier(group=group)
            avg = build()
            with torch.no_grad():
                for p, v in zip(params, saved):
                    p.copy_(v)
            avg.load_state_dict(state)
        for r in workers:
            if r == rank:
                with torch.no_grad():
                    for p in params:
                        p.add_(torch.randn(p.shape, generator=g))
                avg.step()
            dist.barrier(group=group)
    center = torch.cat([c.double() for c in avg.center_state()])
    dist.barrier(group=group)
    avg.close()
    return {"x": flat_values(avg), "center": center, "clock": avg.clock,
            "exchanges": avg.stats.exchanges}


def async_checkpoint_roles(rank: int, world: int) -> dict[str, Any]:
    """What each rank's state holds, and loading another rank's state."""
    params = model_params(1000, torch.float32, rank)
    avg = ElasticAverager(params, tau=1, mode="async", alpha=0.2)
    dist.barrier()
    perturb(params, rank)
    avg.step()
    dist.barrier()
    state = avg.state_dict()
    states: list[Any] = [None] * world
    dist.all_gather_object(states, state)
    try:
        avg.load_state_dict(states[(rank + 1) % world])
        error = None
    except ValueError as exc:
        error = str(exc)
    avg.close()
    return {"has_center": "center" in state["buffers"], "error": error}
