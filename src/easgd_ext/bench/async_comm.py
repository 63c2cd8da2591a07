"""Latency of one asynchronous exchange, by size, against its floor and peers, in one run.

Shared-memory center, one worker (``--device cpu``: CPU parameters):
  shared_easgd      ElasticAverager(mode="async").exchange(): non-finite check, then each
                    chunk under its lock through the fused kernel
  shared_downpour   DownpourAverager(mode="async").exchange()
  kernel_unlocked   ops.async_exchange over the whole center: the kernel alone, no locks
  torch_eager       e = alpha (x - c); x -= e; c += e in torch ops on the same tensors
  floor             read x and c, write x and c (16 bytes per element) at the copy bandwidth
                    measured in the same run: the target is shared_easgd within 1.5x of it
With ``--device cuda`` (CUDA parameters, center in pinned shared memory):
  shared_easgd      the chunked pipeline (copy in, fused kernel, copy back, overlapped)
  torch_staged      H2D of the center, the update, D2H of e, a CPU add: plain torch ops
  floor             PCIe is full duplex: max(H2D, D2H) of the center at the pinned bandwidth
                    measured now; the target is shared_easgd within 1.3x of it
Scaling (``--scaling``): 1, 2, 4 single-threaded processes exchanging with one center at once,
exchanges per second in total, with the center in 16 chunks and with one lock over the whole
center (the serialized peer). Up to the cores and the memory bandwidth, chunked throughput
should grow with the workers while one lock stays flat.
Sharded center (``--sharded``): rank 0 serves, 1 or 2 workers exchange over Gloo; latency
against a raw ping-pong of the same bytes between the same ranks.

    python -m easgd_ext.bench comm --mode async
    python -m easgd_ext.bench comm --mode async --sizes 1e6 2.56e7 --scaling --sharded --json a.json
    python -m easgd_ext.bench comm --mode async --sharded --plot async.png
"""

from __future__ import annotations

import argparse
import json
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
from easgd_ext._launch import join_group, run_workers
from easgd_ext.shared_center import unique_name

from .kernels import copy_ceiling
from .report import latency_axes, report
from .timing import interleaved_medians, median_seconds

DEFAULT_SIZES = ["1e5", "1e6", "1e7", "2.56e7"]
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
    copy_bw, _ = copy_ceiling(n, device, reps)
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
    seconds = interleaved_medians(fns, device, reps)
    floor = 16 * n / copy_bw
    records = []
    for name, s in seconds.items():
        ratios = {"vs_floor": s / floor}
        if name.startswith("shared"):
            ratios.update(vs_kernel_unlocked=s / seconds["kernel_unlocked"],
                          vs_torch_eager=s / seconds["torch_eager"])
        records.append(_record(name, device, n, s, 16 * n, ratios, transport="shared"))
    records.append(_record("floor", device, n, floor, 16 * n, {}, transport="shared",
                           copy_GBps=copy_bw / 1e9))
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

    def h2d() -> None:
        dev_c.copy_(host, non_blocking=True)

    def d2h() -> None:
        host_e.copy_(dev_e, non_blocking=True)

    def synced(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            fn()
            torch.cuda.synchronize()
        return run

    wall = {name: synced(fn) for name, fn in
            {"shared_easgd": easgd.exchange, "torch_staged": staged, "h2d": h2d, "d2h": d2h}.items()}
    seconds = interleaved_medians(wall, torch.device("cpu"), reps)  # wall time: host work counts
    floor = max(seconds.pop("h2d"), seconds.pop("d2h"))
    records = [_record(name, device, n, s, 8 * n, {"vs_floor": s / floor,
                                                    "vs_torch_staged": s / seconds["torch_staged"]},
                       transport="shared") for name, s in seconds.items()]
    records.append(_record("floor", device, n, floor, 4 * n, {}, transport="shared"))
    easgd.close()
    return records


# ---- several workers against one shared center --------------------------------------------------
def _scaling_worker(name: str, n: int, exchanges: int, threads: int, barrier, out) -> None:
    torch.set_num_threads(threads)
    avg = ElasticAverager(_params(n, torch.device("cpu")), tau=1, mode="async", center=name,
                          alpha=0.1)
    avg.exchange()
    barrier.wait()
    first_wait = [w["lock_wait_s"] for w in avg.center.worker_info() if w["id"] == avg.worker_id][0]
    start = time.perf_counter()
    for _ in range(exchanges):
        avg.exchange()
    took = time.perf_counter() - start
    waited = [w["lock_wait_s"] for w in avg.center.worker_info() if w["id"] == avg.worker_id][0]
    out.put((took, waited - first_wait))
    avg.close()


def scaling(n: int, exchanges: int, worker_counts: list[int]) -> list[dict]:
    ctx = mp.get_context("spawn")
    records = []
    chunks = 16  # small enough for several workers to be in different chunks at once
    for label, chunk_mb in (("chunked", n * 4 / 2**20 / chunks), ("one_lock", n * 4 / 2**20 + 1)):
        base = None
        for p in worker_counts:
            name = unique_name("bench")
            with SharedCenter.create(name, like=_params(n, torch.device("cpu")), workers=p,
                                     chunk_mb=chunk_mb):
                barrier, out = ctx.Barrier(p), ctx.Queue()
                threads = 1  # one core each: p workers can use p cores unless a lock serializes them
                procs = [ctx.Process(target=_scaling_worker,
                                     args=(name, n, exchanges, threads, barrier, out)) for _ in range(p)]
                for proc in procs:
                    proc.start()
                got = [out.get(timeout=600) for _ in procs]
                for proc in procs:
                    proc.join()
            took = [t for t, _ in got]
            wait_share = sum(w for _, w in got) / sum(took)
            rate = p * exchanges / max(took)
            base = base or rate
            records.append({"name": f"scaling_{label}", "device": "cpu", "numel": n,
                            "dtype": "float32", "workers": p, "seconds": max(took) / exchanges,
                            "exchanges_per_s": rate, "GBps": rate * 16 * n / 1e9,
                            "lock_wait_share": wait_share,
                            "ratios": {"vs_one_worker": rate / base}, "transport": "shared"})
    return records


# ---- the sharded center over Gloo ----------------------------------------------------------------
def _sharded_rank(rank: int, world: int, store: str | None, out: str, sizes: list[str],
                  reps: int) -> None:
    join_group(rank, world, store, "cpu")
    workers = world - 1
    records = []
    try:
        for size in sizes:
            n = int(float(size))
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
                                   {"vs_pingpong": ex / pp}, transport="sharded", workers=workers))
            records.append(_record("pingpong", torch.device("cpu"), n, pp, 8 * n, {},
                                   transport="sharded", workers=workers))
        if rank == 0:
            Path(out).write_text(json.dumps(records))
    finally:
        dist.destroy_process_group()


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
                    "--" if name in ("floor", "pingpong") else "-", color=f"C{i % 10}", marker="o",
                    markersize=3, label=label)


# ---- front door -----------------------------------------------------------------------------------
def print_table(records: list[dict]) -> None:
    print(f"{'transport':<9} {'variant':<18}{'numel':>11}{'workers':>8}{'ms':>10}{'GB/s':>8}  ratios")
    for r in records:
        ratios = "  ".join(f"{k} {v:.2f}x" for k, v in r["ratios"].items())
        if "lock_wait_share" in r:
            ratios += f"  waiting for locks {r['lock_wait_share']:.0%} of the time"
        print(f"{r['transport']:<9} {r['name']:<18}{r['numel']:>11}{r.get('workers', 1):>8}"
              f"{r['seconds'] * 1e3:>10.3f}{r['GBps']:>8.2f}  {ratios}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m easgd_ext.bench comm --mode async",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="elements per model")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--scaling", action="store_true", help="1, 2, 4 concurrent workers")
    parser.add_argument("--scaling-size", default="1e6",
                        help="elements per worker for --scaling (1e6: in cache, so the cores, "
                             "not the memory bus, are what the workers share)")
    parser.add_argument("--sharded", action="store_true", help="the sharded center over Gloo")
    parser.add_argument("--json", type=Path, help="write the records (DESIGN.md section 4) here")
    parser.add_argument("--plot", type=Path, help="write a latency-vs-size PNG here")
    args = parser.parse_args(argv)
    for size in args.sizes + [args.scaling_size]:
        try:
            if float(size) < 64:
                raise ValueError
        except ValueError:
            parser.error(f"size {size!r} is not a number of at least 64 elements")
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    from tqdm import tqdm

    records: list[dict] = []
    for size in tqdm(args.sizes, desc="shared center", unit="size", file=sys.stderr):
        n = int(float(size))
        records += shared_cuda(n, args.reps) if args.device == "cuda" else shared_cpu(n, args.reps)
    if args.scaling:
        records += scaling(int(float(args.scaling_size)), 300, [1, 2, 4])
    if args.sharded:
        for world in (2, 3):
            records += run_workers(_sharded_rank, world, [s for s in args.sizes if float(s) <= 1e7],
                                   args.reps)
    print(f"easgd_ext {easgd_ext.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads, device {args.device}, median of {args.reps}")
    report(records, print_table, plot, args.plot, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
