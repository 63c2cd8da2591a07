"""Sharded against replicated: one synchronous EASGD exchange of a model whose parameters are
DTensors of FSDP2's ``fully_shard`` (each rank exchanges its local shard over the replicate
dimension) against the same model replicated on every rank, at equal model size, on the same
ranks and the same replicate groups; and the three ways to run EASGD across nodes with DDP
inside them.

Mesh: (replicas, shards) = (world / 2, 2) over the spawned ``--world`` processes (Gloo, CPU), or
torchrun's. Per size and variant, every rank times, round-robin:

  sharded      ElasticAverager(DTensor parameters, process_group=mesh["replicate"]).exchange()
  replicated   ElasticAverager(plain parameters, process_group=mesh["replicate"]).exchange()

"MB/rank" is what one exchange puts on the network per rank (the ring model: 2 (p - 1) / p of
the payload), "center MB" the center's memory per rank, "ms" the slowest rank's median time,
"host ms" how long the call blocked the host, "launch us" the time of the exchange's prepared
native launches alone (send, publish, apply: no collective), the cost of cutting the wire into
one segment per local shard. ``--sizes resnet50:2`` (ResNet-50's 161 tensors, two elements
each: one per shard) is the host-overhead case.

``--hierarchy`` (mesh (nodes, local) = (world / 2, 2), plain parameters, DDP's replicas
identical inside a node) times one exchange of each way to run EASGD across nodes:

  leaders      the nodes' rank 0 exchange; a broadcast inside each node follows
  every_rank   every rank exchanges the whole model with the ranks of its local rank on the
               other nodes (identical inputs, identical results: no step inside the node)
  shares       every rank exchanges its 1/L share of the model with those ranks; an all-gather
               inside each node follows

with the bytes each node sends across nodes and inside itself (the ring model). On one machine
every byte crosses the same memory, so the times measure the work, not a network.

    python -m easgd_ext.bench fsdp                              # 4 ranks, 1e6 and 1e7 elements
    python -m easgd_ext.bench fsdp --sizes resnet50:2 --reps 21 # host overhead, 161 tensors
    python -m easgd_ext.bench fsdp --hierarchy --sizes 1e6 1e7
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

import easgd_ext
from easgd_ext._dist import _all_gather
from easgd_ext._launch import launcher_rank_world, run_workers

from .cli import RATIO_LINE, count, prog
from .collectives import Works, rank_session, write_records_of_rank0
from easgd_ext.stats import ring_allreduce_bytes

from .comm import shapes_for, size_spec
from .report import report, spread_of, warn_if_noisy

DEFAULT_SIZES = ["1e6", "1e7"]


class Holder(nn.Module):
    """Parameters of the given shapes, for ``fully_shard``."""

    def __init__(self, shapes: list[torch.Size]) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.params = nn.ParameterList(nn.Parameter(torch.randn(s, generator=gen)) for s in shapes)


@dataclass(frozen=True)
class KeptCenter(easgd_ext.Replicated):
    """The replicated center, keeping the center it builds: its kernels are timed alone."""
    built: list = field(default_factory=list, compare=False)

    def build(self, *args: Any) -> Any:
        center = super().build(*args)
        self.built.append(center)
        return center


def launches_only(spec: KeptCenter) -> Callable[[], None]:
    """The exchange's prepared native launches (send + publish, then apply), no collective."""
    return spec.built[-1].local_pass


class Clock:
    """Everyone starts together; the slowest rank's (host, total) seconds of one call."""

    def __init__(self, works: Works) -> None:
        self.works = works
        self.flag = torch.zeros(1)
        self.took = torch.zeros(2, dtype=torch.float64)

    def __call__(self, fn: Callable[[], object]) -> tuple[float, float]:
        self.works.run("barrier", [self.flag])
        start = time.perf_counter()
        fn()
        host = time.perf_counter() - start
        self.took[0], self.took[1] = host, time.perf_counter() - start
        self.works.run("took", [self.took], op=dist.ReduceOp.MAX)
        host, total = self.took.tolist()
        return host, total


def timed(fns: dict[str, Callable[[], object]], reps: int, works: Works) -> dict[str, dict]:
    clock = Clock(works)
    for fn in fns.values():
        for _ in range(2):
            clock(fn)
    host: dict[str, list[float]] = {k: [] for k in fns}
    total: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            h, t = clock(fn)
            host[name].append(h)
            total[name].append(t)
    return {k: {"seconds": statistics.median(total[k]), "host_seconds": statistics.median(host[k]),
                "spread": spread_of(total[k])} for k in fns}


def sharded_vs_replicated(size: str, reps: int, works: Works) -> list[dict]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("replicate", "shard"))
    shapes = shapes_for(size)
    sharded_model = Holder(shapes)
    fully_shard(sharded_model, mesh=mesh["shard"])
    plain_model = Holder(shapes)
    centers = {"sharded": KeptCenter(), "replicated": KeptCenter()}
    averagers = {
        "sharded": easgd_ext.ElasticAverager(sharded_model.parameters(), tau=1,
                                             process_group=mesh["replicate"], center=centers["sharded"]),
        "replicated": easgd_ext.ElasticAverager(plain_model.parameters(), tau=1,
                                                process_group=mesh["replicate"],
                                                center=centers["replicated"])}
    fns: dict[str, Callable[[], object]] = {k: a.exchange for k, a in averagers.items()}
    fns.update({f"{k}_launches": launches_only(c) for k, c in centers.items()})
    got = timed(fns, reps, works)
    calls = 2 + reps
    n = sum(s.numel() for s in shapes)
    records = []
    for name, avg in averagers.items():
        records.append({
            "bench": "sharded_vs_replicated", "name": name, "size": size, "numel": n,
            "tensors": len(shapes), "world_size": world, "replicas": world // 2, "shards": 2,
            **got[name], "launch_seconds": got[f"{name}_launches"]["seconds"],
            "bytes_per_rank": avg.stats.bytes_sent // calls,
            "center_bytes_per_rank": sum(c.nbytes for c in avg.center_state())})
    s, r = records
    s["ratios"] = {"vs_replicated": r["seconds"] / s["seconds"]}
    s["bytes_vs_replicated"] = s["bytes_per_rank"] / r["bytes_per_rank"]
    s["center_vs_replicated"] = s["center_bytes_per_rank"] / r["center_bytes_per_rank"]
    r["ratios"] = {}
    return records


def hierarchy(size: str, reps: int, works: Works) -> list[dict]:
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    local_size = 2
    nodes = world // local_size
    mesh = init_device_mesh("cpu", (nodes, local_size), mesh_dim_names=("node", "local"))
    node, local = mesh.get_coordinate()
    intra = mesh.get_group("local")
    leaders = dist.new_group([r * local_size for r in range(nodes)])  # every rank calls it
    n = sum(s.numel() for s in shapes_for(size))
    share = -(-n // local_size)
    leader_src = dist.get_global_rank(intra, 0)

    whole = [nn.Parameter(torch.randn(n))]
    every_rank = easgd_ext.ElasticAverager(whole, tau=1, process_group=mesh["node"])
    lead_params = [nn.Parameter(torch.randn(n))]
    lead = (easgd_ext.ElasticAverager(lead_params, tau=1, process_group=leaders)
            if local == 0 else None)
    part = [nn.Parameter(torch.randn(share))]
    shares = easgd_ext.ElasticAverager(part, tau=1, process_group=mesh["node"])
    gathered = torch.empty(share * local_size)
    kept: list = []

    def leaders_way() -> None:
        if lead is not None:
            lead.exchange()
        kept[:] = [dist.broadcast(lead_params[0].data, src=leader_src, group=intra, async_op=True)]
        kept[0].wait()

    def shares_way() -> None:
        shares.exchange()
        kept[:] = [_all_gather(gathered, part[0].data, group=intra, async_op=True)]
        kept[0].wait()

    got = timed({"leaders": leaders_way, "every_rank": every_rank.exchange,
                 "shares": shares_way}, reps, works)
    bytes_ = {  # per node, ring model: (across nodes, inside the node)
        "leaders": (ring_allreduce_bytes(4 * n, nodes), 4 * n * (local_size - 1)),
        "every_rank": (local_size * ring_allreduce_bytes(4 * n, nodes), 0),
        "shares": (local_size * ring_allreduce_bytes(4 * share, nodes),
                   local_size * 4 * share * (local_size - 1))}
    center = {"leaders": 4 * n, "every_rank": 4 * n, "shares": 4 * share}
    records = []
    for name, timing in got.items():
        records.append({"bench": "hierarchy", "name": name, "size": size, "numel": n,
                        "world_size": world, "nodes": nodes, "local": local_size, **timing,
                        "inter_node_bytes_per_node": bytes_[name][0],
                        "intra_node_bytes_per_node": bytes_[name][1],
                        "center_bytes_per_rank": center[name], "ratios": {}})
    base = got["every_rank"]["seconds"]
    for r in records:
        if r["name"] != "every_rank":
            r["ratios"]["every_rank_vs"] = r["seconds"] / base
    del node
    return records


def rank_main(rank: int, world: int, store: str | None, out: str, args: argparse.Namespace) -> None:
    records: list[dict] = []
    with rank_session(rank, world, store, "cpu") as (_, works):
        for size in args.sizes:
            records += (hierarchy if args.hierarchy else sharded_vs_replicated)(size, args.reps, works)
        write_records_of_rank0(rank, out, records)


def print_table(records: list[dict]) -> None:
    mine = [r for r in records if r["bench"] == "sharded_vs_replicated"]
    if mine:
        print(f"\n{RATIO_LINE}")
        print(f"{'world':>5} {'size':<11}{'numel':>10}{'tensors':>8} {'variant':<11}{'ms':>9}{'+-%':>5}"
              f"{'host ms':>9}{'launch us':>10}{'MB/rank':>9}{'center MB':>10}  sharded vs replicated")
        for r in mine:
            extra = ""
            if r["name"] == "sharded":
                extra = (f"  {r['ratios']['vs_replicated']:.2f}x time, {r['bytes_vs_replicated']:.3f}x "
                         f"bytes, {r['center_vs_replicated']:.3f}x center")
            print(f"{r['world_size']:>5} {r['size']:<11}{r['numel']:>10}{r['tensors']:>8} {r['name']:<11}"
                  f"{r['seconds'] * 1e3:>9.3f}{r['spread'] * 100:>5.0f}{r['host_seconds'] * 1e3:>9.3f}"
                  f"{r['launch_seconds'] * 1e6:>10.1f}{r['bytes_per_rank'] / 1e6:>9.3f}"
                  f"{r['center_bytes_per_rank'] / 1e6:>10.3f}{extra}")
    tiers = [r for r in records if r["bench"] == "hierarchy"]
    if tiers:
        print("\nEASGD across nodes, DDP inside them: one exchange (slowest rank); bytes per node "
              "by the ring model")
        print(f"{'nodes x L':>9} {'size':<11}{'numel':>10} {'way':<12}{'ms':>9}{'+-%':>5}"
              f"{'across MB':>10}{'inside MB':>10}{'center MB':>10}{'time / every_rank':>19}")
        for r in tiers:
            rel = r["ratios"].get("every_rank_vs")
            print(f"{r['nodes']:>4} x {r['local']:<2} {r['size']:<11}{r['numel']:>10} {r['name']:<12}"
                  f"{r['seconds'] * 1e3:>9.3f}{r['spread'] * 100:>5.0f}"
                  f"{r['inter_node_bytes_per_node'] / 1e6:>10.2f}{r['intra_node_bytes_per_node'] / 1e6:>10.2f}"
                  f"{r['center_bytes_per_rank'] / 1e6:>10.2f}{'' if rel is None else f'{rel:.2f}x':>19}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog("fsdp"), description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=count, default=4,
                        help="processes to spawn, an even number (ignored under torchrun) "
                             "(default: %(default)s)")
    parser.add_argument("--sizes", type=size_spec, nargs="+", default=DEFAULT_SIZES,
                        help="elements per model (1e6), 'resnet18', 'resnet50', or 'resnet50:2' "
                             "(its 161 tensors, two elements each: the host overhead) "
                             f"(default: {' '.join(DEFAULT_SIZES)})")
    parser.add_argument("--reps", type=count, default=7, help="timed calls per variant (default: %(default)s)")
    parser.add_argument("--hierarchy", action="store_true",
                        help="time the three ways to run EASGD across nodes with DDP inside them "
                             "instead")
    parser.add_argument("--json", type=Path, help="write the records (a JSON list) here")
    args = parser.parse_args(argv)
    launched = launcher_rank_world()
    world = launched[1] if launched else args.world
    if world % 2 or world < 4:
        parser.error(f"--world must be even and at least 4 (2 replicas x 2 shards), got {world}")
    records = run_workers(rank_main, world, args)
    if records is None:  # a launched rank other than 0
        return 0
    print(f"easgd_ext {easgd_ext.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"world {world}, Gloo on CPU, median of {args.reps}")
    warn_if_noisy([r for r in records if "spread" in r])
    report(records, print_table, None, None, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
