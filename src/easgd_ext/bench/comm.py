"""Latency of one exchange against its peers, by model size and world size, in one run.

For each size n (elements of float32 parameters, cut into tensors like a model's) and world
size p, every rank times, round-robin:
  easgd_fp32        ElasticAverager.exchange(), float32 wire
  easgd_bf16        ElasticAverager.exchange(), bfloat16 wire
  allreduce_fp32    a raw all_reduce of one float32 buffer of n (the bytes the fp32 wire moves)
  allreduce_bf16    the same in bfloat16
  pytorch_periodic  PyTorch's PeriodicModelAverager.average_parameters on the same tensors
  per_param         one all_reduce per parameter tensor, then a division (accelerate's way)
A run's latency is the slowest rank's (all start after a barrier); the table reports medians
and ratios against the peers. Gloo on CPU tensors; NCCL with one GPU per rank when
``--device cuda`` and enough GPUs exist.

    python -m easgd_ext.bench comm                              # worlds 2 and 4, 1e5..1e8
    python -m easgd_ext.bench comm --worlds 2 --sizes 1e6 resnet18 --json comm.json
    torchrun --nproc-per-node 4 -m easgd_ext.bench comm         # under a launcher: one world
    python -m easgd_ext.bench comm --mode async                 # asynchronous transports
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

import easgd_ext
from easgd_ext._launch import join_group, launcher_rank_world, run_workers

from .report import latency_axes, report

RESNET18_NUMEL = 11_689_512
DEFAULT_SIZES = ["1e5", "1e6", "1e7", "1e8"]


def model_like_shapes(n: int, pieces: int = 62) -> list[int]:
    """n elements cut into tensors of geometrically growing sizes, as a network's layers are
    (ResNet-18 has 62 parameter tensors); 'resnet18' uses its real shapes."""
    pieces = max(1, min(pieces, n // 16))
    weights = [1.12 ** k for k in range(pieces)]
    sizes = [max(1, int(n * w / sum(weights))) for w in weights]
    sizes[-1] += n - sum(sizes)
    return sizes


def parameters_for(size: str, device: torch.device) -> list[torch.nn.Parameter]:
    if size == "resnet18":
        import torchvision

        with torch.device(device):
            return list(torchvision.models.resnet18(weights=None).parameters())
    gen = torch.Generator(device=device).manual_seed(0)
    return [torch.nn.Parameter(torch.randn(k, generator=gen, device=device))
            for k in model_like_shapes(int(float(size)))]


def clone_params(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def variants(params: list[torch.nn.Parameter], world: int, peers: set[str]) -> dict[str, Callable[[], object]]:
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

    n = sum(p.numel() for p in params)
    device = params[0].device
    fns: dict[str, Callable[[], object]] = {}
    fns["easgd_fp32"] = easgd_ext.ElasticAverager(clone_params(params), tau=1).exchange
    fns["easgd_bf16"] = easgd_ext.ElasticAverager(clone_params(params), tau=1,
                                                  comm_dtype=torch.bfloat16).exchange
    raw32 = torch.randn(n, device=device)
    raw16 = raw32.bfloat16()
    fns["allreduce_fp32"] = lambda: dist.all_reduce(raw32)
    fns["allreduce_bf16"] = lambda: dist.all_reduce(raw16)
    if "pytorch_periodic" in peers:
        theirs = clone_params(params)
        for p in theirs:
            p.grad = torch.zeros_like(p)  # PyTorch averages only parameters with a gradient
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # period=1 warns "use DDP": we time one averaging
            averager = PeriodicModelAverager(period=1, warmup_steps=0)
        fns["pytorch_periodic"] = lambda: averager.average_parameters(theirs)
    if "per_param" in peers:
        each = clone_params(params)

        def per_param() -> None:
            with torch.no_grad():
                for p in each:
                    dist.all_reduce(p.data)
                    p.data.div_(world)

        fns["per_param"] = per_param
    return fns


def time_collective(fn: Callable[[], object], device: torch.device) -> float:
    """One run of a collective: the slowest rank's wall time, everyone starting together."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    took = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return took.item()


def measure(size: str, world: int, device: torch.device, reps: int, peers: set[str]) -> list[dict]:
    params = parameters_for(size, device)
    n = sum(p.numel() for p in params)
    fns = variants(params, world, peers)
    for fn in fns.values():  # warm-up: connections, allocations
        time_collective(fn, device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(time_collective(fn, device))
    seconds = {name: statistics.median(ts) for name, ts in times.items()}
    records = []
    for name, s in seconds.items():
        payload = n * (2 if name.endswith("bf16") else 4)
        ratios = {}
        if name.startswith("easgd"):
            ratios = {f"vs_{peer}": s / seconds[peer] for peer in seconds if not peer.startswith("easgd")}
        records.append({"name": name, "device": str(device), "numel": n, "size": size,
                        "world_size": world, "dtype": "bfloat16" if name.endswith("bf16") else "float32",
                        "seconds": s, "GBps": payload / s / 1e9, "ratios": ratios})
    return records


def rank_main(rank: int, world: int, store: str | None, out: str, args: argparse.Namespace) -> None:
    device = join_group(rank, world, store, args.device)
    records = []
    sizes = args.sizes
    if rank == 0:
        from tqdm import tqdm

        sizes = tqdm(sizes, desc=f"world {world}", unit="size", file=sys.stderr)
    try:
        for size in sizes:
            records += measure(size, world, device, args.reps, set(args.peers))
        if rank == 0:
            Path(out).write_text(json.dumps(records))
    finally:
        dist.destroy_process_group()


def print_table(records: list[dict]) -> None:
    peers = ["allreduce_fp32", "allreduce_bf16", "pytorch_periodic", "per_param"]
    head = f"{'world':>5} {'numel':>11} {'variant':<17}{'ms':>10}{'GB/s':>7}"
    print(head + "".join(f"{'vs ' + p:>22}" for p in peers))
    for r in records:
        cells = "".join(f"{r['ratios'].get('vs_' + p, float('nan')):>21.2f}x" if 'vs_' + p in r["ratios"]
                        else f"{'':>22}" for p in peers)
        print(f"{r['world_size']:>5} {r['numel']:>11} {r['name']:<17}{r['seconds'] * 1e3:>10.2f}"
              f"{r['GBps']:>7.2f}{cells}")


def plot(records: list[dict], path: Path) -> None:
    """Latency against payload bytes (float32 parameters), one line per variant and world."""
    with latency_axes(path, "latency of one exchange (ms)") as ax:
        styles = ["-", "--", ":", "-."]
        worlds = sorted({r["world_size"] for r in records})
        names = list(dict.fromkeys(r["name"] for r in records))
        colors = {name: f"C{i}" for i, name in enumerate(names)}
        for w_i, world in enumerate(worlds):
            for name in names:
                rs = sorted((r for r in records if r["name"] == name and r["world_size"] == world),
                            key=lambda r: r["numel"])
                if rs:
                    ax.plot([r["numel"] * 4 for r in rs], [r["seconds"] * 1e3 for r in rs],
                            styles[w_i % 4], color=colors[name], marker="o", markersize=3,
                            label=f"{name} (p={world})")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    mode = argparse.ArgumentParser(add_help=False)
    mode.add_argument("--mode", choices=["sync", "async"], default="sync")
    known, rest = mode.parse_known_args(argv)
    if known.mode == "async":
        from .async_comm import main as async_main

        return async_main(rest)
    argv = rest
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="--mode async: the asynchronous transports (shared "
                                            "and sharded centers); see --mode async --help")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4],
                        help="world sizes to spawn (ignored under torchrun)")
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES,
                        help="elements per model (1e6, 250000, ...) or 'resnet18'")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--peers", nargs="*", default=["pytorch_periodic", "per_param"],
                        choices=["pytorch_periodic", "per_param"],
                        help="slower peers to include besides the raw all_reduce")
    parser.add_argument("--json", type=Path, help="write the records (DESIGN.md section 4) here")
    parser.add_argument("--plot", type=Path, help="write a latency-vs-bytes PNG here")
    args = parser.parse_args(argv)
    for size in args.sizes:
        if size != "resnet18":
            try:
                if float(size) < 1:
                    raise ValueError
            except ValueError:
                parser.error(f"--sizes: {size!r} is neither a positive number nor 'resnet18'")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    records: list[dict] = []
    launched = launcher_rank_world()
    for world in [launched[1]] if launched else args.worlds:
        if not launched and args.device == "cuda" and torch.cuda.device_count() < world:
            print(f"skipping world {world}: NCCL needs one GPU per rank, "
                  f"{torch.cuda.device_count()} present", file=sys.stderr)
            continue
        got = run_workers(rank_main, world, args)
        if got is None:  # a launched rank other than 0
            return 0
        records += got
    print(f"easgd_ext {easgd_ext.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"device {args.device}, median of {args.reps}")
    report(records, print_table, plot, args.plot, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
