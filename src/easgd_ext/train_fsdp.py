"""``python -m easgd_ext.train --fsdp``: the main job with every replica's model sharded by
FSDP2 over a (replicate, shard) = (workers / 2, 2) device mesh.

Each replica is two ranks that hold half of the model each (``fully_shard`` over the mesh's
shard dimension: FSDP all-gathers a layer for its forward and backward and reduce-scatters its
gradients, averaging them over the replica's two minibatches); the averager exchanges each
rank's local shard with the ranks that hold the same shard in the other replicas
(``process_group=mesh["replicate"]``). ``sync-sgd`` is FSDP2's HSDP over the same mesh (the
gradient shards all-reduced across replicas every step). "MB sent" counts what crosses the
replicate dimension (the averager's exchanges, or HSDP's gradient all-reduce), all ranks
together; FSDP's own traffic inside a replica is the same for every algorithm.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import data, loop, methods
from ._launch import join_group, run_workers
from .settings import QUANT_NAMES
from .stats import ring_allreduce_bytes
from .train_records import (Result, cross_entropy, load_split, minibatches, run_curve, say, steps_for,
                            test_error_of)

SHARDS = 2
FSDP_STEPS = 200  # the default of --fsdp (each step all-gathers every layer on 4 CPU processes)


def check_args(args: argparse.Namespace, world: int) -> str | None:
    """What makes ``--fsdp`` impossible with these arguments (a sentence), or ``None``."""
    if args.mode != "sync":
        return "--fsdp runs --mode sync (the asynchronous centers exchange whole flat buffers)"
    if args.simulate:
        return "--fsdp runs processes of its own; leave out --simulate"
    if args.device != "cpu":
        return "--fsdp runs on the CPU here (Gloo); leave out --device"
    if world < 2 * SHARDS or world % SHARDS:
        return (f"--fsdp needs an even number of at least {2 * SHARDS} workers (replicas of "
                f"{SHARDS} shards each), got {world}")
    if args.comm_dtype in QUANT_NAMES:
        return "--fsdp: the quantized wire's blocks would straddle the local shards; use bfloat16"
    return None


def units_of(model: nn.Module) -> list[nn.Module]:
    """The modules ``fully_shard`` wraps one by one (each all-gathered on its own)."""
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]


def make_job(algo: str, args: argparse.Namespace, mesh: Any) -> tuple[nn.Module, Any, Any]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(args.seed)
    model = data.make_model(args.dataset)
    where = mesh if algo == "sync-sgd" else mesh["shard"]   # HSDP for the baseline
    for unit in units_of(model):
        fully_shard(unit, mesh=where)
    fully_shard(model, mesh=where)
    chosen = methods.method(algo)
    opt = chosen.local_optimizer(model.parameters(), args.lr, args.momentum)
    settings: dict[str, Any] = {"tau": args.tau, "process_group": mesh["replicate"],
                                "comm_dtype": args.comm_dtype, "fragments": args.fragments,
                                **chosen.rule_settings(args.beta, args.allow_unstable)}
    if chosen.delays:
        settings["delay"] = args.delay
    return model, opt, chosen.build(model.parameters(), **settings)


class HSDPGradients:
    """The baseline's gradient exchange across replicas, which FSDP2's HSDP runs inside the
    backward: here only counted, as a ring all-reduce of this rank's float32 gradient shard."""

    def __init__(self, model: nn.Module, replicas: int) -> None:
        local = sum(p.to_local().numel() for p in model.parameters())
        self.per_step = ring_allreduce_bytes(4 * local, replicas)
        self.bytes_sent, self.exchanges, self.comm_seconds = 0, 0, 0.0

    def __call__(self) -> None:
        self.bytes_sent += self.per_step
        self.exchanges += 1


def train_one(algo: str, args: argparse.Namespace, split: data.Split, mesh: Any, steps: int) -> Result:
    """This rank's run of ``algo`` on the mesh (the curve as rank 0 sees it)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model, opt, averager = make_job(algo, args, mesh)
    stream = minibatches(split, args, rank)
    job = loop.OneWorker(model, opt, stream.next, cross_entropy, test_error_of(split), averager=averager,
                         gradients=HSDPGradients(model, world // SHARDS) if averager is None else None)
    return run_curve(algo, job, args.eval_every, world, steps, shown=rank == 0)


def worker(rank: int, world: int, store: str | None, out: str, args: argparse.Namespace) -> None:
    from torch.distributed.device_mesh import init_device_mesh


    join_group(rank, world, store, "cpu")
    try:
        mesh = init_device_mesh("cpu", (world // SHARDS, SHARDS),
                                mesh_dim_names=("replicate", "shard"))
        split = load_split(args)
        steps = (FSDP_STEPS if args.steps is None and args.epochs is None
                 else steps_for(args, len(split.train_y), world))
        if rank == 0:
            say(f"training {', '.join(args.algos)} on a {world // SHARDS} x {SHARDS} mesh "
                f"(replicas x shards, fully_shard over the shard dimension): {steps} steps, test "
                f"error of the center every {args.eval_every} steps")
        results = [asdict(train_one(algo, args, split, mesh, steps)) for algo in args.algos]
        if rank == 0:
            Path(out).write_text(json.dumps({"results": results, "steps": steps}))
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace, world: int) -> dict | None:
    """Runs the ``--fsdp`` job on ``world`` processes (spawned, or torchrun's); rank 0's
    summary (``None`` on the other ranks of a launched job)."""
    return run_workers(worker, world, args)
