"""Latency of one exchange against its peers, by model size and world size, in one run.

For each size (elements of float32 parameters, cut into tensors like a model's) and world
size p, every rank times, round-robin:
  easgd_fp32        ElasticAverager.exchange(), float32 wire
  easgd_bf16        ElasticAverager.exchange(), bfloat16 wire
  easgd_int8        ElasticAverager.exchange(), the 8-bit wire (block-scaled, error feedback:
                    an all-to-all and an all-gather)
  easgd_f4          one step of ElasticAverager(tau=4, fragments=4).step(): a quarter of the
                    model, the peak of one step of a streamed exchange (``--fragments``)
  allreduce_fp32    a raw all_reduce of one float32 buffer of n (the bytes the fp32 wire moves)
  allreduce_bf16    the same in bfloat16
  torch_flat        the same EASGD exchange in plain torch on one preallocated flat float32
                    buffer: d = x - c; d *= alpha; x -= d; all_reduce(d); c += d
  pytorch_periodic  PyTorch's PeriodicModelAverager.average_parameters on the same tensors
  per_param         one all_reduce per parameter tensor, then a division (accelerate's way)
"MB/rank" is what one call puts on the network per rank (a ring all-reduce sends 2 (p - 1) / p
of its payload; the 8-bit wire (p - 1) records out and its own record to p - 1 ranks).
A run's time is the slowest rank's, everyone starting together; "host" is how long the call
blocked the Python thread (measured before any device synchronization: on CPU it is the whole
time, on CUDA the cost of enqueuing). The table reports medians and the speedup of each
exchange over each peer (peer time / our time, > 1: faster). Gloo on CPU tensors; NCCL with
one GPU per rank with ``--device cuda`` (world 1 needs one GPU).

Sizes: a number of elements (1e6, 250000), ``resnet18`` / ``resnet50`` (torchvision's parameter
shapes), or ``resnet50:1`` (ResNet-50's 161 tensors with one element each: what the exchange
costs the host beyond the bytes).

    python -m easgd_ext.bench comm                              # worlds 2 and 4, 1e5..1e8
    python -m easgd_ext.bench comm --worlds 1 --sizes resnet50:1 --reps 21
    python -m easgd_ext.bench comm --worlds 2 --sizes 1e6 resnet18 --json comm.json
    torchrun --nproc-per-node 4 -m easgd_ext.bench comm         # under a launcher: one world
    python -m easgd_ext.bench async                             # asynchronous centers
"""

from __future__ import annotations

import argparse
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
from easgd_ext._launch import launcher_rank_world, run_workers
from easgd_ext.stats import ring_allreduce_bytes

from .cli import RATIO_LINE, count, prog, ratio_cell, speedups
from .collectives import Works, rank_session, write_records_of_rank0
from .peers import torch_flat_easgd
from .report import latency_axes, report, spread_of, warn_if_noisy

DEFAULT_SIZES = ["1e5", "1e6", "1e7", "1e8"]
MODELS = ("resnet18", "resnet50")
PEERS = ["torch_flat", "pytorch_periodic", "per_param"]
FRAGMENTS = 4  # easgd_f4: one fragment of four per step
BETA = 0.9  # ElasticAverager's default: alpha = beta / p


def size_spec(text: str) -> str:
    """argparse type of ``--sizes``: a whole number of elements (``1e6``), a model name, or
    ``model:k`` (the model's tensors with k elements each)."""
    name, colon, each = text.partition(":")
    if name in MODELS:
        if colon:
            count(each)
        return text
    if colon:
        raise argparse.ArgumentTypeError(f"{text!r}: 'model:k' needs a model from {', '.join(MODELS)}")
    try:
        count(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(
            f"{exc}; give a number of elements (1e6), {', '.join(MODELS)} or e.g. resnet50:1") from None
    return text


def model_like_shapes(n: int, pieces: int = 62) -> list[int]:
    """n elements cut into tensors of geometrically growing sizes, as a network's layers are
    (ResNet-18 has 62 parameter tensors); the model names use their real shapes."""
    pieces = max(1, min(pieces, n // 16))
    weights = [1.12 ** k for k in range(pieces)]
    sizes = [max(1, int(n * w / sum(weights))) for w in weights]
    sizes[-1] += n - sum(sizes)
    return sizes


def model_shapes(name: str) -> list[torch.Size]:
    """torchvision's parameter shapes of ``name`` (built on the meta device: no memory)."""
    import torchvision

    with torch.device("meta"):
        model = getattr(torchvision.models, name)(weights=None)
    return [p.shape for p in model.parameters()]


def shapes_for(size: str) -> list[torch.Size]:
    name, colon, each = size.partition(":")
    if name in MODELS:
        shapes = model_shapes(name)
        return [torch.Size([count(each)])] * len(shapes) if colon else shapes
    return [torch.Size([k]) for k in model_like_shapes(count(size))]


def parameters_for(size: str, device: torch.device) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device=device).manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, device=device)) for s in shapes_for(size)]


def clone_params(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


class Averaged:
    """An averager's exchange as a benchmark variant, and the bytes one call sends per rank
    (read from its statistics)."""

    def __init__(self, call: Callable[[], object], averager: easgd_ext.ElasticAverager) -> None:
        self.call, self.averager = call, averager

    def __call__(self) -> object:
        return self.call()

    def bytes_per_call(self, calls: int) -> int:
        return self.averager.stats.bytes_sent // max(1, calls)


def variants(params: list[torch.nn.Parameter], world: int, peers: set[str],
             works: Works) -> tuple[dict[str, Callable[[], object]], dict[str, int]]:
    """The variants and, for those whose bytes are known up front, the bytes per call."""
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

    n = sum(p.numel() for p in params)
    device = params[0].device
    fns: dict[str, Callable[[], object]] = {}
    for name, comm in (("easgd_fp32", None), ("easgd_bf16", torch.bfloat16), ("easgd_int8", torch.int8)):
        avg = easgd_ext.ElasticAverager(clone_params(params), tau=1, beta=BETA, comm_dtype=comm)
        fns[name] = Averaged(avg.exchange, avg)
    streamed = easgd_ext.ElasticAverager(clone_params(params), tau=FRAGMENTS, beta=BETA,
                                         fragments=FRAGMENTS)
    fns[f"easgd_f{FRAGMENTS}"] = Averaged(streamed.step, streamed)
    raw32 = torch.randn(n, device=device)
    raw16 = raw32.bfloat16()
    fns["allreduce_fp32"] = lambda: works.run("allreduce_fp32", [raw32])
    fns["allreduce_bf16"] = lambda: works.run("allreduce_bf16", [raw16])
    known = {"allreduce_fp32": ring_allreduce_bytes(4 * n, world), "allreduce_bf16": ring_allreduce_bytes(2 * n, world)}
    if "torch_flat" in peers:
        x = torch.cat([p.detach().reshape(-1) for p in params]).float()
        fns["torch_flat"] = torch_flat_easgd(x, BETA / world, works)
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
        tensors = [p.detach() for p in each]  # made once: no temporary in the collectives

        def per_param() -> None:
            works.run("per_param", tensors)
            with torch.no_grad():
                torch._foreach_div_(tensors, world)

        fns["per_param"] = per_param
        known["per_param"] = ring_allreduce_bytes(4 * n, world)
    if "torch_flat" in fns:
        known["torch_flat"] = ring_allreduce_bytes(4 * n, world)
    if "pytorch_periodic" in fns:
        known["pytorch_periodic"] = ring_allreduce_bytes(4 * n, world)
    return fns, known


class Clock:
    """Times one run of a collective variant: everyone starts together (an all-reduce of a
    persistent flag, then a device synchronization), and the slowest rank's host-blocking and
    total times are agreed by an all-reduce of a persistent buffer."""

    def __init__(self, device: torch.device, works: Works) -> None:
        self.device = device
        self.works = works
        self.flag = torch.zeros(1, device=device)
        self.took = torch.zeros(2, dtype=torch.float64, device=device)

    def barrier(self) -> None:
        self.works.run("barrier", [self.flag])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object]) -> tuple[float, float]:
        """(host-blocking seconds, total seconds) of one run of ``fn``, slowest rank's."""
        self.barrier()
        start = time.perf_counter()
        fn()
        host = time.perf_counter() - start
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        total = time.perf_counter() - start
        self.took[0], self.took[1] = host, total
        self.works.run("took", [self.took], op=dist.ReduceOp.MAX)
        host, total = self.took.tolist()
        return host, total


def measure(size: str, world: int, device: torch.device, reps: int, peers: set[str],
            works: Works) -> list[dict]:
    params = parameters_for(size, device)
    n = sum(p.numel() for p in params)
    fns, wire_bytes = variants(params, world, peers, works)
    clock = Clock(device, works)
    for fn in fns.values():  # warm-up: connections, allocations
        for _ in range(2):
            clock(fn)
    host: dict[str, list[float]] = {name: [] for name in fns}
    total: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            h, t = clock(fn)
            host[name].append(h)
            total[name].append(t)
    # Our own collectives last: whatever a peer left in flight is long finished before exit.
    for _ in range(3):
        clock.barrier()
    calls = 2 + reps
    for name, fn in fns.items():
        if isinstance(fn, Averaged):
            wire_bytes[name] = fn.bytes_per_call(calls)
    seconds = {name: statistics.median(ts) for name, ts in total.items()}
    host_s = {name: statistics.median(ts) for name, ts in host.items()}
    spread = {name: spread_of(ts) for name, ts in total.items()}
    records = []
    for name, s in seconds.items():
        dtype = {"bf16": "bfloat16", "int8": "int8"}.get(name.rsplit("_", 1)[-1], "float32")
        record = {"name": name, "device": str(device), "numel": n, "size": size,
                  "tensors": len(params), "world_size": world, "dtype": dtype, "seconds": s,
                  "host_seconds": host_s[name], "spread": spread[name],
                  "bytes_per_rank": wire_bytes.get(name),
                  "GBps": (wire_bytes[name] / s / 1e9) if wire_bytes.get(name) else None,
                  "ratios": {}}
        if name.startswith("easgd"):
            same = {"bfloat16": "allreduce_bf16"}.get(dtype, "allreduce_fp32")
            record["ratios"] = speedups(seconds, name, [same] + [p for p in seconds
                                                                 if not p.startswith("easgd") and p != same])
            record["ratios"]["vs_allreduce"] = record["ratios"][f"vs_{same}"]
            if name != "easgd_fp32":
                record["ratios"]["vs_easgd_fp32"] = seconds["easgd_fp32"] / s
                record["bytes_vs_easgd_fp32"] = (wire_bytes[name] / wire_bytes["easgd_fp32"]
                                                 if wire_bytes.get("easgd_fp32") else None)
            record["host_over_allreduce_s"] = host_s[name] - host_s[same]
        records.append(record)
    warn_if_noisy(records)
    return records


def rank_main(rank: int, world: int, store: str | None, out: str, args: argparse.Namespace) -> None:
    records = []
    sizes = args.sizes
    if rank == 0:
        from easgd_ext.progress import bar as tqdm

        sizes = tqdm(sizes, desc=f"world {world}", unit="size", file=sys.stderr)
    with rank_session(rank, world, store, args.device) as (device, works):
        for size in sizes:
            records += measure(size, world, device, args.reps, set(args.peers), works)
        write_records_of_rank0(rank, out, records)


def print_table(records: list[dict]) -> None:
    print(f"\n{RATIO_LINE}; host: time the call blocks the Python thread (no device sync); "
          "MB/rank: what one call puts on the network per rank")
    cols = [("vs_easgd_fp32", "over easgd_fp32"), ("vs_allreduce", "over all_reduce"),
            ("vs_torch_flat", "over torch_flat"), ("vs_pytorch_periodic", "over PyTorch periodic"),
            ("vs_per_param", "over per_param")]
    head = (f"{'world':>5} {'size':<11}{'numel':>11} {'variant':<17}{'ms':>9}{'+-%':>5}{'host ms':>9}"
            f"{'MB/rank':>9}{'bytes/fp32':>11}{'host-AR us':>11}")
    print(head + "".join(f"{label:>{len(label) + 2}}" for _, label in cols)
          + "   (speedups; all_reduce: the raw one of the same wire dtype, fp32 for int8)")
    for r in records:
        excess = r.get("host_over_allreduce_s")
        mb = "-" if r["bytes_per_rank"] is None else f"{r['bytes_per_rank'] / 1e6:.2f}"
        share = r.get("bytes_vs_easgd_fp32")
        cells = "".join(ratio_cell(r["ratios"], key, len(label) + 2) for key, label in cols)
        print(f"{r['world_size']:>5} {r['size']:<11}{r['numel']:>11} {r['name']:<17}"
              f"{r['seconds'] * 1e3:>9.3f}{r['spread'] * 100:>5.0f}{r['host_seconds'] * 1e3:>9.3f}{mb:>9}"
              f"{'' if share is None else f'{share:.3f}x':>11}"
              f"{'' if excess is None else f'{excess * 1e6:+.0f}':>11}{cells}")


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
    parser = argparse.ArgumentParser(prog=prog("comm"), description=__doc__.split("\n\n")[0],
                                     epilog="The asynchronous centers have a benchmark of their own: "
                                            f"{prog('async')} (also reached as --mode async)")
    parser.add_argument("--mode", choices=["sync", "async"], default="sync",
                        help=f"sync (this) or async: the same as {prog('async')}")
    parser.add_argument("--worlds", type=count, nargs="+", default=[2, 4],
                        help="world sizes to spawn, 1 included (ignored under torchrun)")
    parser.add_argument("--sizes", type=size_spec, nargs="+", default=DEFAULT_SIZES,
                        help="elements per model (1e6, 250000, ...), 'resnet18', 'resnet50' "
                             "(torchvision's shapes) or 'resnet50:1' (its 161 tensors with one "
                             "element each: the host overhead)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--reps", type=count, default=7)
    parser.add_argument("--peers", nargs="*", default=PEERS, choices=PEERS,
                        help="peers to include besides the raw all_reduce (default: all)")
    parser.add_argument("--json", type=Path, help="write the records (a JSON list) here")
    parser.add_argument("--plot", type=Path, help="write a latency-vs-bytes PNG here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not (torch.cuda.is_available() and easgd_ext.build_info()["cuda"]):
        parser.error("--device cuda needs a GPU and easgd_ext built with CUDA")

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
