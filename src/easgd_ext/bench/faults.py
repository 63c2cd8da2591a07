"""Training through a failure: the main job's CNN (scikit-learn's digits) with EASGD on --world
Gloo ranks and ``on_failure="continue"``; one rank dies (``--fault kill``: it exits, its sockets
close) or freezes (``--fault freeze``: SIGSTOP, its sockets stay open) at --fault-at; the others
finish the run. Against it, the same seeds on world - 1 ranks with no failure. Reported per
seed: the center's final test error both ways, seconds from the fault until the survivors go on
(their re-formed group built; the next exchange follows tau local steps later), whether every survivor ends with the same center, and the workers left.

    python -m easgd_ext.bench faults                       # world 4, rank 3 killed, 3 seeds
    python -m easgd_ext.bench faults --fault freeze --exchange-timeout 5
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from .cli import count, prog


def rank_main(rank: int, world: int, store: str, out: str, args: argparse.Namespace,
              seed: int, faulty: int | None) -> None:
    import easgd_ext
    from easgd_ext import data

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    split = data.digits(seed)
    torch.manual_seed(seed)
    model = data.DigitsCNN()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    avg = easgd_ext.ElasticAverager(model.parameters(), tau=args.tau, on_failure="continue",
                                    exchange_timeout=args.exchange_timeout)
    stream = data.Stream(split.train_x, split.train_y, 32, seed=seed * 1000 + rank + 1)
    fault_time = recovered = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the survivors' warning: counted in the stats instead
        for step in range(1, args.steps + 1):
            if rank == faulty and step == args.fault_at:
                if args.fault == "kill":
                    os._exit(1)
                os.kill(os.getpid(), signal.SIGSTOP)
            if step == args.fault_at:
                fault_time = time.time()  # the other ranks' clocks: same machine
            xb, yb = stream.next()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            opt.zero_grad()
            before = avg.stats.failures_survived
            avg.step()
            if avg.stats.failures_survived > before and fault_time is not None:
                recovered = time.time() - fault_time  # going on: the group is re-formed
    avg.flush()
    center = torch.cat([c.flatten() for c in avg.center_state()])
    everyone = [torch.empty_like(center) for _ in range(avg.world_size)]
    dist.all_gather(everyone, center, group=avg.process_group)
    if dist.get_rank(avg.process_group) == 0:
        with avg.center_parameters():
            error = data.test_error(model, split.test_x, split.test_y)
        Path(out).write_text(json.dumps({
            "seed": seed, "world": world, "workers_left": avg.workers, "test_error": error,
            "exchanges": avg.stats.exchanges, "center_norm": float(center.double().norm()),
            "failures_survived": avg.stats.failures_survived,
            "same_center": all(torch.equal(center, c) for c in everyone),
            "recovery_seconds": recovered}))
    dist.destroy_process_group()


def run(args: argparse.Namespace, world: int, seed: int, faulty: int | None) -> dict:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        procs = [ctx.Process(target=rank_main, args=(r, world, os.path.join(tmp, "store"), out,
                                                     args, seed, faulty), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + args.time_limit
        for r, p in enumerate(procs):
            if r != faulty:
                p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive() and r != faulty]
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)
        if hung:
            raise TimeoutError(f"ranks {hung} of {world} still running after {args.time_limit} s: a hang")
        failed = [r for r, p in enumerate(procs) if r != faulty and p.exitcode != 0]
        if failed or not os.path.exists(out):
            raise RuntimeError(f"rank {failed[0] if failed else 0} exited with "
                               f"{procs[failed[0] if failed else 0].exitcode} and no result")
        return json.loads(Path(out).read_text())


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog("faults"), description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=count, default=4, help="ranks before the fault (>= 3)")
    parser.add_argument("--fault", choices=["kill", "freeze"], default="kill")
    parser.add_argument("--fault-rank", type=int, default=None, help="default: the last rank")
    parser.add_argument("--fault-at", type=count, default=None, help="default: half the steps")
    parser.add_argument("--steps", type=count, default=1000)
    parser.add_argument("--tau", type=count, default=4)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seeds", type=count, default=3)
    parser.add_argument("--exchange-timeout", type=float, default=10.0)
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds a run may take")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.world < 3:
        parser.error("--world must be at least 3: two ranks must be left after the fault")
    args.fault_rank = args.world - 1 if args.fault_rank is None else args.fault_rank
    if not 0 <= args.fault_rank < args.world:
        parser.error(f"--fault-rank must be in [0, {args.world}), got {args.fault_rank}")
    args.fault_at = args.steps // 2 if args.fault_at is None else args.fault_at
    if args.fault_at > args.steps:
        parser.error(f"--fault-at {args.fault_at} is past --steps {args.steps}")
    if not args.exchange_timeout > 0:
        parser.error(f"--exchange-timeout must be > 0, got {args.exchange_timeout}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from tqdm import tqdm

    records = []
    runs = [(seed, faulty) for seed in range(args.seeds) for faulty in (args.fault_rank, None)]
    for seed, faulty in tqdm(runs, desc="bench faults", unit="run", file=sys.stderr):
        world = args.world if faulty is not None else args.world - 1
        record = run(args, world, seed, faulty)
        record["fault"] = args.fault if faulty is not None else None
        records.append(record)
    print(f"\nEASGD, digits CNN, tau {args.tau}, {args.steps} steps, Gloo; rank {args.fault_rank} of "
          f"{args.world} {'killed' if args.fault == 'kill' else 'frozen'} at step {args.fault_at} "
          f"(exchange_timeout {args.exchange_timeout:g} s), against {args.world - 1} ranks with no fault")
    print(f"{'seed':>4}{'error, fault':>14}{'error, none':>13}{'recovery s':>12}{'same center':>13}{'workers':>9}")
    for seed in range(args.seeds):
        hit, clean = [r for r in records if r["seed"] == seed]
        rec = hit["recovery_seconds"]
        print(f"{seed:>4}{hit['test_error']:>14.2%}{clean['test_error']:>13.2%}"
              f"{'-' if rec is None else format(rec, '.2f'):>12}{str(hit['same_center']):>13}"
              f"{hit['workers_left']:>9}")
    hits = [r["test_error"] for r in records if r["fault"]]
    cleans = [r["test_error"] for r in records if not r["fault"]]
    print(f"mean test error: {statistics.fmean(hits):.2%} with the fault, {statistics.fmean(cleans):.2%} "
          f"without (spread of the unfailed seeds {min(cleans):.2%}-{max(cleans):.2%})")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    ok = all(r["same_center"] and r["failures_survived"] == 1 for r in records if r["fault"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
