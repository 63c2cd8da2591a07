"""Latency of one asynchronous exchange, by size, against its floor and peers, in one run.

Shared-memory center, one worker (``--device cpu``: CPU parameters):
  shared_easgd      ElasticAverager(mode="async").exchange(): non-finite check, then each
                    chunk under its lock through the fused kernel
  shared_downpour   DownpourAverager(mode="async").exchange()
  kernel_unlocked   ops.async_exchange over the whole center: the kernel alone, no locks
  torch_eager       e = alpha (x - c); x -= e; c += e in torch ops on the same tensors
  floor             read x and c, write x and c (16 bytes per element) at the copy ceiling
                    measured in the same run (the best of torch copy_, the native copy kernel
                    and memcpy): the target is shared_easgd within 1.5x of it
With ``--device cuda`` (CUDA parameters, center in pinned shared memory):
  shared_easgd      the chunked pipeline (copy in, fused kernel, copy back, overlapped)
  torch_staged      H2D of the center, the update, D2H of e, a CPU add: plain torch ops
  h2d, d2h          each direction alone: the center's bytes between pinned host memory and
                    the GPU
  duplex_floor      both at once on two streams (PCIe is full duplex): the floor, timed
                    round-robin with the rest; the target is shared_easgd within 1.3x of it
Every ratio is a speedup over the named peer, peer time / our time (> 1: faster); against a
floor, vs_floor = floor time / our time (1.0: at the floor, 0.5: twice the floor's time).
Scaling (``--scaling``): 1, 2, 4 single-threaded processes exchanging with one center at once
(CPU parameters, or with ``--device cuda`` CUDA parameters, all processes on one GPU),
exchanges per second in total, with the center in 16 chunks and with one lock over the whole
center (the serialized peer), and the share of time spent waiting for chunk locks
(``worker_info()``'s ``lock_wait_s``). Up to the cores (PCIe on a GPU) and the memory bandwidth,
chunked throughput should grow with the workers while one lock stays flat.
Sharded center (``--sharded``): rank 0 serves, 1 or 2 workers exchange over Gloo; latency
against a raw ping-pong of the same bytes between the same ranks.

    python -m easgd_ext.bench async            # (the same as: bench comm --mode async)
    python -m easgd_ext.bench async --sizes 1e6 2.56e7 --scaling --sharded --json a.json
    python -m easgd_ext.bench async --sharded --plot async.png
    python -m easgd_ext.bench async --device cuda --sizes 2.56e7 --scaling
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import easgd_ext
from easgd_ext import DownpourAverager, ElasticAverager, SharedCenter, ops
from easgd_ext._launch import run_workers
from easgd_ext.shared_center import unique_name

from .cli import RATIO_LINE, count, prog, speedup, speedups
from .collectives import rank_session, write_records_of_rank0
from .kernels import COPY_NAMES, copy_candidates
from .report import latency_axes, report
from .timing import interleaved_medians, median_seconds

DEFAULT_SIZES = ["1e5", "1e6", "1e7", "2.56e7"]
FLOORS = ("floor", "duplex_floor", "h2d", "d2h", "pingpong")
ALPHA = 0.225


def _params(n: int, device: torch.device) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(n, generator=g).to(device))]


def _record(name: str, device: torch.device, n: int, seconds: float, nbytes: int,
            ratios: dict[str, float], **extra: object) -> dict:
    return {"name": name, "device": str(device), "numel": n, "dtype": "float32", "seconds": seconds,
            "GBps": nbytes / seconds / 1e9, "ratios": ratios, **extra}


# ---- one worker against the shared center -------------------------------------------------------
def shared_cpu(n: int, reps: int) -> list[dict]:
    device = torch.device("cpu")
    easgd = ElasticAverager(_params(n, device), tau=1, mode="async", alpha=ALPHA)
    downpour = DownpourAverager(_params(n, device), tau=1, mode="async")
    x = easgd.flat_parameters()[0]
    c = easgd.center.tensor[:x.numel()]
    tmp = torch.empty_like(x)

    def eager() -> None:
        torch.sub(x, c, out=tmp).mul_(ALPHA)
        x.sub_(tmp)
        c.add_(tmp)

    fns: dict[str, Callable[[], object]] = {
        "shared_easgd": easgd.exchange,
        "shared_downpour": downpour.exchange,
        "kernel_unlocked": lambda: ops.async_exchange(x, c, ALPHA),
        "torch_eager": eager,
    }
    fns.update(copy_candidates(n, device))  # the floor's copies, timed with the variants
    seconds = interleaved_medians(fns, device, reps)
    copies = {k: seconds.pop(k) for k in list(seconds) if k.startswith("copy/")}
    best = min(copies, key=copies.get)
    floor = 2 * copies[best]  # 16 bytes per element at the copy ceiling (a copy moves 8)
    records = []
    for name, s in seconds.items():
        ratios = {"vs_floor": speedup(floor, s)}
        if name.startswith("shared"):
            ratios.update(speedups(seconds, name, ["kernel_unlocked", "torch_eager"]))
        records.append(_record(name, device, n, s, 16 * n, ratios, transport="shared"))
    records.append(_record("floor", device, n, floor, 16 * n, {}, transport="shared",
                           copy_GBps=8 * n / copies[best] / 1e9, copy_ceiling=COPY_NAMES[best]))
    easgd.close()
    downpour.close()
    return records


def shared_cuda(n: int, reps: int) -> list[dict]:
    device = torch.device("cuda", torch.cuda.current_device())
    easgd = ElasticAverager(_params(n, device), tau=1, mode="async", alpha=ALPHA)
    x = easgd.flat_parameters()[0]
    host = easgd.center.tensor[:x.numel()]  # pinned by the averager
    dev_c = torch.empty_like(x)
    dev_e = torch.empty_like(x)
    host_e = torch.empty(x.numel(), pin_memory=True)

    def staged() -> None:  # plain torch ops, one after the other
        dev_c.copy_(host, non_blocking=True)
        torch.sub(x, dev_c, out=dev_e).mul_(ALPHA)
        x.sub_(dev_e)
        host_e.copy_(dev_e, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        host.add_(host_e)

    # The floor: the center's bytes in and out at once, pinned, each way on its own stream.
    h_in, h_out = torch.randn(n).pin_memory(), torch.empty(n, pin_memory=True)
    d_in, d_out = torch.empty(n, device=device), torch.randn(n, device=device)
    up, down = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def h2d() -> None:
        d_in.copy_(h_in, non_blocking=True)

    def d2h() -> None:
        h_out.copy_(d_out, non_blocking=True)

    def duplex() -> None:
        current = torch.cuda.current_stream(device)
        up.wait_stream(current)
        down.wait_stream(current)
        with torch.cuda.stream(up):
            h2d()
        with torch.cuda.stream(down):
            d2h()
        current.wait_stream(up)
        current.wait_stream(down)

    def synced(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            fn()
            torch.cuda.synchronize(device)
        return run

    wall = {name: synced(fn) for name, fn in
            {"shared_easgd": easgd.exchange, "torch_staged": staged, "duplex_floor": duplex,
             "h2d": h2d, "d2h": d2h}.items()}
    seconds = interleaved_medians(wall, torch.device("cpu"), reps)  # wall time: host work counts
    floor = seconds["duplex_floor"]
    records = []
    for name, s in seconds.items():
        ratios = {}
        if name in ("shared_easgd", "torch_staged"):
            ratios = {"vs_floor": speedup(floor, s)}
            if name == "shared_easgd":
                ratios.update(speedups(seconds, name, ["torch_staged"]))
        nbytes = 4 * n if name in ("h2d", "d2h") else 8 * n
        records.append(_record(name, device, n, s, nbytes, ratios, transport="shared"))
    easgd.close()
    return records


# ---- several workers against one shared center --------------------------------------------------
def _lock_wait(avg: ElasticAverager) -> float:
    return [w["lock_wait_s"] for w in avg.center.worker_info() if w["id"] == avg.worker_id][0]


def _scaling_worker(name: str, n: int, device: str, exchanges: int, threads: int, barrier,
                    out) -> None:
    torch.set_num_threads(threads)
    dev = torch.device(device)
    avg = ElasticAverager(_params(n, dev), tau=1, mode="async", center=name, alpha=0.1)
    avg.exchange()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    barrier.wait()
    first_wait = _lock_wait(avg)
    start = time.perf_counter()
    for _ in range(exchanges):
        avg.exchange()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    took = time.perf_counter() - start
    out.put((took, _lock_wait(avg) - first_wait))
    avg.close()


def scaling(n: int, exchanges: int, worker_counts: list[int], device: torch.device) -> list[dict]:
    """1, 2, 4... processes exchanging with one center at once, with the center in 16 chunks
    and under one lock; on CUDA every process's parameters are on the same GPU."""
    ctx = mp.get_context("spawn")
    records = []
    chunks = 16  # small enough for several workers to be in different chunks at once
    like = _params(n, device)  # the layout (device type included) the workers will attach with
    rates: dict[tuple[str, int], float] = {}
    for label, chunk_mb in (("chunked", n * 4 / 2**20 / chunks), ("one_lock", n * 4 / 2**20 + 1)):
        for p in worker_counts:
            name = unique_name("bench")
            with SharedCenter.create(name, like=like, workers=p, chunk_mb=chunk_mb):
                barrier, out = ctx.Barrier(p), ctx.Queue()
                threads = 1  # one core each: p workers can use p cores unless a lock serializes them
                procs = [ctx.Process(target=_scaling_worker,
                                     args=(name, n, str(device), exchanges, threads, barrier, out))
                         for _ in range(p)]
                for proc in procs:
                    proc.start()
                got = [out.get(timeout=600) for _ in procs]
                for proc in procs:
                    proc.join()
            took = [t for t, _ in got]
            rate = p * exchanges / max(took)
            rates[(label, p)] = rate
            # speedup in total throughput: one worker's time for the same exchanges / ours
            ratios = {"vs_one_worker": rate / rates[(label, worker_counts[0])]}
            if label == "one_lock" and ("chunked", p) in rates:  # the chunked record's peer
                chunked = next(r for r in records if r["name"] == "scaling_chunked" and r["workers"] == p)
                chunked["ratios"]["vs_one_lock"] = rates[("chunked", p)] / rate
            records.append({"name": f"scaling_{label}", "device": str(device), "numel": n,
                            "dtype": "float32", "workers": p, "seconds": max(took) / exchanges,
                            "exchanges_per_s": rate,
                            "GBps": rate * (8 if device.type == "cuda" else 16) * n / 1e9,
                            "lock_wait_s": sum(w for _, w in got),
                            "lock_wait_share": sum(w for _, w in got) / sum(took),
                            "ratios": ratios, "transport": "shared"})
    return records


# ---- the sharded center over Gloo ----------------------------------------------------------------
def _sharded_rank(rank: int, world: int, store: str | None, out: str, sizes: list[str],
                  reps: int) -> None:
    workers = world - 1
    records = []
    flag = torch.zeros(1)
    with rank_session(rank, world, store, "cpu") as (_, works):
        for size in sizes:
            n = count(size)
            buf = torch.randn(n)
            # Peer: a raw ping-pong of the same bytes (worker -> server -> worker).
            if rank == 0:
                for _ in range((reps + 1) * workers):
                    src = dist.recv(buf, src=None)
                    dist.send(buf, dst=src)
            else:
                ping = []
                for i in range(reps + 1):
                    start = time.perf_counter()
                    dist.send(buf, dst=0)
                    dist.recv(buf, src=0)
                    ping.append(time.perf_counter() - start)
            avg = ElasticAverager(_params(n, torch.device("cpu")), tau=1, mode="async",
                                  servers=[0], alpha=0.9 / workers)
            if avg.is_server:
                avg.serve()
                mine = None
            else:
                mine = {"exchange": median_seconds(avg.exchange, torch.device("cpu"), reps, warmup=1),
                        "pingpong": statistics.median(ping[1:])}
                avg.close()
            everyone: list = [None] * world
            dist.all_gather_object(everyone, mine)
            ex = max(m["exchange"] for m in everyone[1:])
            pp = max(m["pingpong"] for m in everyone[1:])
            records.append(_record("sharded_easgd", torch.device("cpu"), n, ex, 8 * n,
                                   {"vs_pingpong": speedup(pp, ex)}, transport="sharded",
                                   workers=workers))
            records.append(_record("pingpong", torch.device("cpu"), n, pp, 8 * n, {},
                                   transport="sharded", workers=workers))
        # Our own collectives last, on a persistent tensor with the works kept: what the
        # exchanges and all_gather_object left in Gloo's hands is finished before exit.
        for _ in range(3):
            works.run("drain", [flag])
        write_records_of_rank0(rank, out, records)


def plot(records: list[dict], path: Path) -> None:
    """Latency against size for the one-worker shared-center variants and their floor, and the
    sharded center against its ping-pong peer."""
    with latency_axes(path, "latency of one asynchronous exchange (ms)") as ax:
        lines = [(r["name"], r.get("workers", 1)) for r in records if not r["name"].startswith("scaling")]
        for i, (name, workers) in enumerate(dict.fromkeys(lines)):
            rs = sorted((r for r in records if r["name"] == name and r.get("workers", 1) == workers),
                        key=lambda r: r["numel"])
            label = name if rs[0]["transport"] == "shared" else f"{name} ({workers} worker{'s' * (workers > 1)})"
            ax.plot([r["numel"] * 4 for r in rs], [r["seconds"] * 1e3 for r in rs],
                    "--" if name in FLOORS else "-", color=f"C{i % 10}", marker="o",
                    markersize=3, label=label)


# ---- front door -----------------------------------------------------------------------------------
def print_table(records: list[dict]) -> None:
    print(f"\n{RATIO_LINE}; vs_floor = floor time / ours (1.0: at the floor)")
    print(f"{'transport':<9} {'variant':<18}{'device':<8}{'numel':>11}{'workers':>8}{'ms':>10}"
          f"{'GB/s':>8}  speedups")
    for r in records:
        ratios = "  ".join(f"{k} {v:.2f}x" for k, v in r["ratios"].items())
        if "lock_wait_share" in r:
            ratios += f"  waiting for locks {r['lock_wait_share']:.0%} of the time"
        print(f"{r['transport']:<9} {r['name']:<18}{r['device']:<8}{r['numel']:>11}{r.get('workers', 1):>8}"
              f"{r['seconds'] * 1e3:>10.3f}{r['GBps']:>8.2f}  {ratios}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog("async"),
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=count, nargs="+", default=DEFAULT_SIZES,
                        help="elements per model (1e6, 25557032, ...; at least 64)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the worker's parameters live (the center is in host memory)")
    parser.add_argument("--reps", type=count, default=9)
    parser.add_argument("--scaling", action="store_true", help="1, 2, 4 concurrent workers")
    parser.add_argument("--scaling-size", type=count, default=None,
                        help="elements per worker for --scaling (default 1e6 on CPU: in cache, "
                             "so the cores, not the memory bus, are what the workers share; "
                             "2.56e7 on CUDA: ResNet-50's bytes over PCIe)")
    parser.add_argument("--scaling-exchanges", type=count, default=300,
                        help="exchanges per worker for --scaling")
    parser.add_argument("--sharded", action="store_true", help="the sharded center over Gloo")
    parser.add_argument("--json", type=Path, help="write the records (a JSON list) here")
    parser.add_argument("--plot", type=Path, help="write a latency-vs-size PNG here")
    args = parser.parse_args(argv)
    args.sizes = [count(str(s)) for s in args.sizes]  # the defaults are strings
    if args.scaling_size is None:
        args.scaling_size = 25_600_000 if args.device == "cuda" else 1_000_000
    for size in args.sizes + [args.scaling_size]:
        if size < 64:
            parser.error(f"size {size} is less than 64 elements")
    if args.device == "cuda" and not (torch.cuda.is_available() and easgd_ext.build_info()["cuda"]):
        parser.error("--device cuda needs a GPU and easgd_ext built with CUDA")

    from easgd_ext.progress import bar as tqdm

    records: list[dict] = []
    for n in tqdm(args.sizes, desc="shared center", unit="size", file=sys.stderr):
        records += shared_cuda(n, args.reps) if args.device == "cuda" else shared_cpu(n, args.reps)
    if args.scaling:
        records += scaling(args.scaling_size, args.scaling_exchanges, [1, 2, 4],
                           torch.device(args.device))
    if args.sharded:
        for world in (2, 3):
            records += run_workers(_sharded_rank, world, [str(n) for n in args.sizes if n <= 1e7],
                                   args.reps)
    print(f"easgd_ext {easgd_ext.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads, device {args.device}, median of {args.reps}")
    report(records, print_table, plot, args.plot, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
