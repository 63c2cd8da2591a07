"""Train one model per worker with EASGD, EAMSGD, DOWNPOUR, periodic averaging and
synchronous SGD on real data, and compare them: test error of the center against wall time
and against bytes sent (with --mode async: against exchanges with the center).

    python -m easgd_ext.train                         # 4 workers, digits, every algorithm
    python -m easgd_ext.train --algo easgd,downpour --tau 8 --steps 600 --json out.json
    python -m easgd_ext.train --dataset cifar10 --data-root ~/data --device cuda
    torchrun --nproc-per-node 4 -m easgd_ext.train    # under a launcher: it spawns nothing
    python -m easgd_ext.train --mode async            # asynchronous EASGD/EAMSGD/DOWNPOUR

Without a launcher it starts ``--workers`` processes itself (Gloo on CPU; NCCL with one GPU per
worker). Each worker draws its own shuffled stream of the training set. Every ``--eval-every``
steps all workers pause their clocks and the center's test error is measured (for periodic
averaging and sync SGD, which have no separate center: the model). With ``--mode async`` the
workers share a center in shared memory (one machine) and never wait for each other.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import DiLoCoAverager, DownpourAverager, ElasticAverager, PeriodicAverager, _dist, data, loop, methods
from ._launch import backend_for, join_group, launcher_rank_world, run_workers
from .settings import QUANT_NAMES
from .stats import ring_allreduce_bytes
from .train_records import (DEFAULT_STEPS, Result, cross_entropy, load_split, minibatches, run_curve,
                            say, steps_for, test_error_of)

# This tool's selection from the table of methods, by the names it has always taken.
DEFAULT_ALGORITHMS = methods.names(("easgd", "eamsgd", "downpour", "average", "sync-sgd"))
ALGORITHMS = (*DEFAULT_ALGORITHMS, "diloco")  # DiLoCo (outer Nesterov step, lr 0.7): on request
DELAYED = {a for a in ALGORITHMS if methods.method(a).delays}  # their pull keeps the steps since the send
ASYNC_ALGORITHMS = tuple(a for a in ALGORITHMS if methods.method(a).asynchronous)  # the paper's
ASYNC_NOTE = "async: the center is in shared memory, nothing crosses a network"


def build_parser() -> argparse.ArgumentParser:
    # Each help text states its default itself: ArgumentDefaultsHelpFormatter would also print
    # "(default: None)" for the options whose default is worked out later.
    p = argparse.ArgumentParser(prog="python -m easgd_ext.train",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--algo", nargs="+", default=None,
                   help=f"one or more, separated by spaces or commas, from {', '.join(ALGORITHMS)} "
                        f"(default: {', '.join(DEFAULT_ALGORITHMS)}; with --mode async: "
                        f"{', '.join(ASYNC_ALGORITHMS)})")
    p.add_argument("--mode", choices=["sync", "async"], default="sync",
                   help="sync: all workers exchange together; async: each worker exchanges with "
                        "a shared-memory center on its own clock (one machine) (default: "
                        "%(default)s)")
    p.add_argument("--workers", type=int, default=4,
                   help="processes to spawn; ignored under a launcher such as torchrun "
                        "(default: %(default)s)")
    p.add_argument("--tau", type=int, default=4,
                   help="local steps between exchanges (default: %(default)s)")
    p.add_argument("--beta", type=float, default=0.9,
                   help="EASGD/EAMSGD beta = p * alpha, below 1 for stability (default: "
                        "%(default)s)")
    p.add_argument("--allow-unstable", action="store_true",
                   help="accept --beta of 1 or more (the center can overshoot the average of the "
                        "workers)")
    p.add_argument("--lr", type=float, default=0.05,
                   help="learning rate of the local SGD (default: %(default)s)")
    p.add_argument("--momentum", type=float, default=0.9,
                   help="EAMSGD's Nesterov momentum (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32,
                   help="minibatch per worker (default: %(default)s)")
    p.add_argument("--comm-dtype", choices=["float32", "bfloat16", "float16", *QUANT_NAMES],
                   default=None,
                   help="wire dtype of the exchanges, --mode sync only; int8/int4/int2: "
                        "block-scaled with error feedback, not for 'average' (default: the "
                        "parameters' dtype)")
    p.add_argument("--fragments", type=int, default=1,
                   help="cut the model into this many fragments, each exchanged every --tau steps "
                        "at its own phase, --mode sync only (default: %(default)s)")
    p.add_argument("--delay", type=int, default=0,
                   help="apply each fragment's sum this many steps after its send (0 <= delay < "
                        "tau), easgd/eamsgd only (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"local steps per worker (default: {DEFAULT_STEPS}, unless --epochs)")
    p.add_argument("--epochs", type=float, default=None,
                   help="instead of --steps: passes over the training set, by all workers "
                        "together")
    p.add_argument("--eval-every", type=int, default=25,
                   help="steps between test evaluations (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the train/test split, the model's initialization and the "
                        "workers' minibatch order (default: %(default)s)")
    p.add_argument("--simulate", action="store_true",
                   help="run the --workers in this one process on one device (easgd_ext.simulate: "
                        "the same averagers, collectives in memory), --mode sync only")
    p.add_argument("--fsdp", action="store_true",
                   help="shard each replica's model with FSDP2 over a (workers / 2) x 2 mesh of "
                        "CPU processes and exchange the shards over the replicate dimension "
                        "(sync-sgd: FSDP2's HSDP); default 200 steps")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where each worker trains: cpu (Gloo), or cuda (NCCL when every worker "
                        "has a GPU of its own, else Gloo) (default: %(default)s)")
    p.add_argument("--dataset", choices=["digits", "cifar10"], default="digits",
                   help="digits: scikit-learn's bundled 8x8 digits and a small CNN (no download); "
                        "cifar10: a local copy (--data-root) and ResNet-18 (default: "
                        "%(default)s)")
    p.add_argument("--data-root", type=Path, default=None, metavar="DIR",
                   help="folder holding cifar-10-batches-py, for --dataset cifar10")
    p.add_argument("--plot", type=Path, default=Path("easgd_train.png"),
                   help="PNG to write (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None,
                   help="write the settings and curves as JSON here")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)

    offered = ASYNC_ALGORITHMS if args.mode == "async" else ALGORITHMS
    given = args.algo if args.algo is not None else [a for a in offered if a in DEFAULT_ALGORITHMS]
    algos = [a.strip() for item in given for a in item.split(",") if a.strip()]
    sync_only = [a for a in algos if a in ALGORITHMS and a not in offered]
    if sync_only:
        p.error(f"--algo: {', '.join(sync_only)} {'is' if len(sync_only) == 1 else 'are'} "
                f"synchronous only; with --mode async choose from {', '.join(offered)}")
    unknown = [a for a in algos if a not in offered]
    if unknown or not algos:
        p.error(f"--algo: {'unknown ' + str(unknown) if unknown else 'empty list'} with --mode "
                f"{args.mode}; choose from {', '.join(offered)}")
    args.algos = list(dict.fromkeys(algos))
    args.algo = ",".join(args.algos)
    if not 0 <= args.seed < 2**32:
        p.error(f"--seed must be in [0, 2^32), got {args.seed}")
    for flag, path in (("--plot", args.plot), ("--json", args.json)):
        if path is not None:
            folder = path.parent if str(path.parent) else Path(".")
            if not folder.is_dir():
                p.error(f"{flag} {path}: folder {folder} does not exist (checked now, not after "
                        "the training)")
            if not os.access(folder, os.W_OK):
                p.error(f"{flag} {path}: folder {folder} is not writable")
    if args.data_root is not None and args.dataset == "digits":
        p.error("--data-root applies to --dataset cifar10 (digits ship with scikit-learn)")
    if args.mode == "async" and args.comm_dtype is not None:
        p.error("--comm-dtype applies to --mode sync (asynchronous exchanges move parameters "
                "in their own dtype)")
    for name in ("workers", "tau", "batch", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.simulate and args.mode == "async":
        p.error("--simulate runs --mode sync (asynchronous workers need processes of their own)")
    if args.mode == "async" and (args.fragments != 1 or args.delay != 0):
        p.error("--fragments and --delay apply to --mode sync")
    if args.fragments < 1:
        p.error(f"--fragments must be at least 1, got {args.fragments}")
    if not 0 <= args.delay < args.tau:
        p.error(f"--delay must be in [0, --tau) = [0, {args.tau}), got {args.delay}")
    if args.delay and set(args.algos) - DELAYED:
        p.error(f"--delay {args.delay} applies to easgd, eamsgd and diloco (whose pulls keep the "
                f"steps taken since the send); leave out {', '.join(sorted(set(args.algos) - DELAYED))} "
                "or use --delay 0")
    whole = [a for a in args.algos  # averagers that send the parameters themselves
             if methods.method(a).averager is not None and not methods.method(a).sends_difference]
    if args.comm_dtype in QUANT_NAMES and whole:
        p.error(f"--comm-dtype {args.comm_dtype} quantizes differences; '{whole[0]}' sends the "
                "parameters themselves: leave it out or use bfloat16")
    if args.steps is not None and args.epochs is not None:
        p.error("give --steps or --epochs, not both")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    if args.epochs is not None and not args.epochs > 0:
        p.error(f"--epochs must be positive, got {args.epochs}")
    if not args.lr > 0:
        p.error(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.momentum < 1:
        p.error(f"--momentum must be in [0, 1), got {args.momentum}")
    # Checked here, in CLI terms, rather than left to ElasticAverager on every worker (whose
    # message names its allow_unstable argument); the condition is on beta alone.
    if not (math.isfinite(args.beta) and args.beta > 0):
        p.error(f"--beta must be positive and finite, got {args.beta}")
    if args.beta >= 1 and not args.allow_unstable:
        p.error(f"--beta {args.beta:g} breaks the stability condition of synchronous EASGD, "
                "0 < beta < 1 (the center overshoots the average of the workers); lower it (the "
                "paper uses 0.9) or pass --allow-unstable to run anyway")
    if args.dataset == "cifar10":
        if args.data_root is None:
            p.error("--dataset cifar10 needs --data-root DIR, a folder holding CIFAR-10. "
                    + data.CIFAR_HELP.format(root="DIR"))
        if not (args.data_root / "cifar-10-batches-py").is_dir():
            p.error(f"--data-root {args.data_root} has no cifar-10-batches-py folder. "
                    + data.CIFAR_HELP.format(root=args.data_root))
        missing = data.cifar_missing(args.data_root)
        if missing:
            p.error(f"--data-root {args.data_root}: cifar-10-batches-py lacks {', '.join(missing)} "
                    "(an incomplete or other download?). " + data.CIFAR_HELP.format(root=args.data_root))
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def make_averager(algo: str, model: torch.nn.Module, args: argparse.Namespace
                  ) -> ElasticAverager | DownpourAverager | PeriodicAverager | DiLoCoAverager | None:
    """The averager of ``algo``; ``None`` for sync-sgd, which averages gradients instead."""
    return methods.method(algo).build(model.parameters(), **averager_settings(algo, args))


def averager_settings(algo: str, args: argparse.Namespace) -> dict[str, Any]:
    """The constructor arguments the command line gives ``algo``'s averager."""
    settings: dict[str, Any] = {"tau": args.tau, "mode": args.mode,
                                **methods.method(algo).rule_settings(args.beta, args.allow_unstable)}
    if args.mode == "sync":
        settings.update(comm_dtype=args.comm_dtype, fragments=args.fragments)
        if algo in DELAYED:
            settings["delay"] = args.delay
    return settings


class GradientAllReduce:
    """Synchronous SGD, the usual DDP baseline: every step, the mean gradient over the workers
    (one all-reduce of a flat buffer)."""

    def __init__(self, model: torch.nn.Module, world: int) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.world = world
        self.comm_seconds = 0.0
        self.bytes_sent = 0
        self.exchanges = 0
        # One persistent buffer, and the last collective kept: a temporary tensor in a Gloo work
        # can be released by Gloo's thread at interpreter exit, which aborts the process.
        self.flat = torch.empty(sum(p.numel() for p in self.params), device=self.params[0].device)
        self.work = None
        if dist.is_initialized():  # through _dist: nothing left to Gloo's threads at exit
            comm = _dist.resolve()
            for p in self.params:
                comm.broadcast(p.data, 0)

    def __call__(self) -> None:
        start = time.perf_counter()
        grads = [p.grad for p in self.params]
        torch.cat([g.reshape(-1) for g in grads], out=self.flat)
        if dist.is_initialized():
            self.work = dist.all_reduce(self.flat, async_op=True)
            self.work.wait()
        self.flat.div_(self.world)
        offset = 0
        for g in grads:
            g.copy_(self.flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        self.comm_seconds += time.perf_counter() - start
        # what a ring all-reduce puts on the network per rank, as the averagers count it
        self.bytes_sent += ring_allreduce_bytes(self.flat.nbytes, self.world)
        self.exchanges += 1


def train_one(algo: str, args: argparse.Namespace, split: data.Split, rank: int, world: int,
              device: torch.device, steps: int) -> Result:
    """This rank's run of ``algo`` (the curve as rank 0 sees it)."""
    torch.manual_seed(args.seed)
    model = data.make_model(args.dataset).to(device)
    opt = methods.method(algo).local_optimizer(model.parameters(), args.lr, args.momentum)
    averager = make_averager(algo, model, args)
    stream = minibatches(split, args, rank)
    job = loop.OneWorker(model, opt, stream.next, cross_entropy, test_error_of(split), averager=averager,
                         gradients=GradientAllReduce(model, world) if averager is None else None,
                         device=device)
    return run_curve(algo, job, args.eval_every, world, steps, shown=rank == 0)


def train_simulated(algo: str, args: argparse.Namespace, split: data.Split, world: int,
                    device: torch.device, steps: int) -> Result:
    """``world`` workers of ``algo`` in this process (easgd_ext.simulate): each on its own
    minibatch stream, the averagers' collectives in memory; sync-sgd averages the gradients in
    memory every step."""
    torch.manual_seed(args.seed)
    chosen = methods.method(algo)
    streams = [minibatches(split, args, k) for k in range(world)]
    job = loop.SimulatedWorkers(
        lambda: data.make_model(args.dataset), world, None if chosen.averager is None else algo,
        lambda params: chosen.local_optimizer(params, args.lr, args.momentum),
        [s.next for s in streams], cross_entropy, test_error_of(split), device,
        **({} if chosen.averager is None else averager_settings(algo, args)))
    try:
        return run_curve(algo, job, args.eval_every, world, steps)
    finally:
        job.close()


def worker(rank: int, world: int, store: str | None, out: str, args: argparse.Namespace) -> None:
    device = join_group(rank, world, store, args.device)
    try:
        if rank == 0:
            say(f"loading {args.dataset} and building the model...")
        split = load_split(args)
        steps = steps_for(args, len(split.train_y), world)
        if rank == 0:
            say(f"training {', '.join(args.algos)}: {steps} steps per worker, test error of the "
                f"center every {args.eval_every} steps")
        results = [asdict(train_one(algo, args, split, rank, world, device, steps))
                   for algo in args.algos]
        if rank == 0:
            Path(out).write_text(json.dumps({"results": results, "steps": steps}))
    finally:
        dist.destroy_process_group()


def print_table(results: list[dict], mode: str = "sync") -> None:
    """The final row of each algorithm (on stdout), and for async mode a note on MB sent."""
    print(f"\n{'algorithm':<10}{'test error':>11}{'best':>8}{'wall s':>9}{'comm s':>9}"
          f"{'comm %':>8}{'MB sent':>10}{'exch/worker':>13}")
    for r in results:
        wall, comm = r["seconds"][-1], r["comm_seconds"]
        # An async exchange is a copy within shared memory: 0 MB would read as a network figure.
        sent = "-" if mode == "async" else f"{r['bytes_sent'][-1] / 1e6:.2f}"
        print(f"{r['algo']:<10}{r['test_error'][-1]:>11.4f}{min(r['test_error']):>8.4f}"
              f"{wall:>9.2f}{comm:>9.2f}{comm / wall:>8.1%}{sent:>10}{r['exchanges']:>13}")
    print("\nMB sent: all workers together; exch/worker: one worker's exchanges"
          + (" (the plot counts every worker's)" if mode == "async" else ""))
    if mode == "async":
        print(ASYNC_NOTE)


def figure(results: list[dict], title: str, mode: str = "sync") -> Any:
    """The matplotlib figure of the curves: test error against wall time (left) and against
    MB sent (right; with ``mode="async"``, which sends nothing over a network: against
    exchanges with the center)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for r in results:
        left.plot(r["seconds"], r["test_error"], label=r["algo"], marker=".", markersize=3)
        if mode == "async":
            x = r["total_exchanges"]
        else:
            x = [max(b, 1) / 1e6 for b in r["bytes_sent"]]  # log axis: no zero
        right.plot(x, r["test_error"], label=r["algo"], marker=".", markersize=3)
    left.set_xlabel("training wall time (s)")
    if mode == "async":
        right.set_xlabel("exchanges with the shared-memory center, all workers")
    else:
        right.set_xlabel("MB sent, all workers")
        right.set_xscale("log")  # sync-sgd sends tau times more than the others
    left.set_ylabel("test error of the center")
    for ax in (left, right):
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot(results: list[dict], path: Path, title: str, mode: str = "sync") -> None:
    """Writes :func:`figure` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = figure(results, title, mode)
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def header(args: argparse.Namespace, world: int, steps: int) -> str:
    """The run's one-line summary, above the table and on the plot."""
    where = ("shared-memory center" if args.mode == "async"
             else f"wire={args.comm_dtype or 'param dtype'}")
    if args.mode == "sync" and (args.fragments > 1 or args.delay):
        where += f", {args.fragments} fragments, delay {args.delay}"
    return (f"{args.dataset}, {world} workers ({args.mode}), tau={args.tau}, {steps} steps, "
            f"lr={args.lr:g}, {where}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    launched = launcher_rank_world()
    world = launched[1] if launched else args.workers
    if args.fsdp:
        return run_fsdp(args, world, launched)
    # Starting the processes and importing torch in each takes seconds: say what is going on.
    backend = {"nccl": "NCCL", "gloo": "Gloo"}[backend_for(args.device, world)]
    how = f"{backend}, {args.device.upper()}"
    if args.simulate:
        pass
    elif not launched:
        if args.device == "cuda" and torch.cuda.device_count() < world:
            say(f"note: {world} workers share {torch.cuda.device_count()} GPU(s); using Gloo")
        say(f"starting {world} worker processes ({how})...")
    elif launched[0] == 0:
        say(f"joining the process group of the launcher's {world} processes ({how})...")
    if args.simulate:
        if launched:
            say("note: --simulate under a launcher: every rank simulates the whole job")
        say(f"simulating {world} workers in this process ({args.device.upper()})...")
        split = load_split(args)
        steps = steps_for(args, len(split.train_y), world)
        device = torch.device("cuda" if args.device == "cuda" else "cpu")
        summary = {"results": [asdict(train_simulated(a, args, split, world, device, steps))
                               for a in args.algos], "steps": steps}
    else:
        summary = run_workers(worker, world, args)
    if summary is None:  # a launched rank other than 0
        return 0
    report(summary, header(args, world, summary["steps"]), args, world)
    return 0


def report(summary: dict, title: str, args: argparse.Namespace, world: int) -> None:
    """The run's title, table and plot on stdout and in ``--plot``, the curves in ``--json``."""
    print(title)
    print_table(summary["results"], args.mode)
    plot(summary["results"], args.plot, title, args.mode)
    print(f"\nplot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: str(v) if isinstance(v, Path) else v
                                                      for k, v in vars(args).items()},
                                         "world_size": world, **summary}, indent=1))
        print(f"json: {args.json}")


def run_fsdp(args: argparse.Namespace, world: int, launched: tuple[int, int] | None) -> int:
    """``--fsdp``: the job with each replica sharded over 2 ranks (easgd_ext.train_fsdp)."""
    from . import train_fsdp

    problem = train_fsdp.check_args(args, world)
    if problem is not None:
        build_parser().error(problem)
    if not launched:
        say(f"starting {world} worker processes (Gloo, CPU; a {world // 2} x 2 mesh)...")
    summary = train_fsdp.run(args, world)
    if summary is None:  # a launched rank other than 0
        return 0
    report(summary, header(args, world, summary["steps"]) + f", FSDP2: {world // 2} replicas x 2 shards",
           args, world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
