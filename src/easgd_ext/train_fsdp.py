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
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import data, methods
from ._launch import join_group, run_workers
from .settings import QUANT_NAMES
from .train_records import Result, load_split, say, steps_bar, steps_for

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


def train_one(algo: str, args: argparse.Namespace, split: data.Split, mesh: Any, steps: int) -> Any:

    rank, world = dist.get_rank(), dist.get_world_size()
    replicas = world // SHARDS
    model, opt, averager = make_job(algo, args, mesh)
    local = sum(p.to_local().numel() for p in model.parameters())
    hsdp_bytes = 2 * (replicas - 1) * 4 * local // replicas  # per step and rank, ring model
    stream = data.Stream(split.train_x, split.train_y, args.batch, seed=args.seed * 1000 + rank + 1)
    result = Result(algo)
    elapsed = 0.0
    bar = steps_bar(algo, steps, shown=rank == 0)
    for step in range(1, steps + 1):
        start = time.perf_counter()
        xb, yb = stream.next()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if averager is not None:
            averager.step()
            if step == steps:
                averager.flush()
        elapsed += time.perf_counter() - start
        if step % args.eval_every == 0 or step == steps:  # every rank: FSDP's forward is collective
            result.evaluate(step, elapsed, averager, model, split, world, (step * hsdp_bytes, step), bar, loss)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if averager is not None:
        result.take_counters(averager)
    else:
        result.exchanges = steps
    return result


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
