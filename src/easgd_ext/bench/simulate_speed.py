"""p workers simulated in one process against p spawned processes, on the same cores, in one
run: the language-model task of the study (a byte-level transformer, EASGD, tau 16).

  simulated   easgd_ext.simulate.Workers: p replicas in this process, their local steps on
              as many threads as there are CPUs, the averagers' collectives in memory
  processes   p processes (Gloo on localhost), each one replica: what torchrun would run
Reported: the seconds per step of all p workers after a warm-up (and the speedup of the
simulation, processes' time / simulated time), and the wall time of the whole run including
start-up (spawning p interpreters, importing torch, joining the group).

    python -m easgd_ext.bench simulate                 # p = 8, 48 steps
    python -m easgd_ext.bench simulate --workers 4 --steps 32 --json sim.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from .cli import RATIO_LINE, count, prog
from .report import machine_load, write_records

WARMUP = 4


def lm_setup(seed: int):
    from easgd_ext import lm

    corpus = lm.load_corpus(max_bytes=400_000)
    torch.manual_seed(seed)
    return corpus, lambda: lm.ByteTransformer(seq_len=64)


def simulated(workers: int, steps: int) -> dict:
    import torch.nn.functional as F

    from easgd_ext import lm, simulate

    start = time.perf_counter()
    corpus, make = lm_setup(0)
    with simulate.Workers(make, workers, averager="easgd", tau=16,
                          make_optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3)) as sim:
        streams = [lm.Batches(corpus.train, 16, 64, seed=k) for k in range(workers)]

        def local(k: int) -> None:
            x, y = streams[k].next()
            F.cross_entropy(sim.models[k](x).reshape(-1, 256), y.reshape(-1)).backward()

        for step in range(steps + WARMUP):
            if step == WARMUP:
                steady = time.perf_counter()
            sim.each(local)  # the workers' steps on the CPUs' threads
            sim.optimizer_step()
        end = time.perf_counter()
    return {"per_step": (end - steady) / steps, "wall": end - start}


def rank_main(rank: int, world: int, store: str | None, out: str, args: argparse.Namespace) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    from easgd_ext import ElasticAverager, lm
    from easgd_ext._launch import join_group

    join_group(rank, world, store, "cpu")
    torch.set_num_threads(1)
    corpus, make = lm_setup(0)
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    avg = ElasticAverager(model.parameters(), tau=16)
    stream = lm.Batches(corpus.train, 16, 64, seed=rank)
    for step in range(args.steps + WARMUP):
        if step == WARMUP:
            dist.barrier()
            steady = time.perf_counter()
        x, y = stream.next()
        F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        avg.step()
    dist.barrier()
    took = time.perf_counter() - steady
    if rank == 0:
        Path(out).write_text(json.dumps({"per_step": took / args.steps}))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    from easgd_ext._launch import run_workers

    parser = argparse.ArgumentParser(prog=prog("simulate"), description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=count, default=8)
    parser.add_argument("--steps", type=count, default=48, help="timed steps after a warm-up of 4")
    parser.add_argument("--json", type=Path, help="write the records (a JSON list) here")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each process has: the same work per core
    sim = simulated(args.workers, args.steps)
    torch.set_num_threads(threads)
    start = time.perf_counter()
    procs = run_workers(rank_main, args.workers, args)
    procs["wall"] = time.perf_counter() - start
    load, cpus = machine_load()
    records = [{"name": name, "device": "cpu", "numel": None, "dtype": "float32",
                "seconds": r["per_step"], "GBps": None, "wall_seconds": r["wall"],
                "workers": args.workers, "steps": args.steps,
                "ratios": {"vs_processes": procs["per_step"] / r["per_step"]} if name == "simulated" else {}}
               for name, r in (("simulated", sim), ("processes", procs))]
    print(f"{args.workers} workers, LM task (byte transformer, batch 16, seq 64), EASGD tau 16, "
          f"{os.cpu_count()} CPUs, load {load:.1f}")
    print(RATIO_LINE)
    print(f"{'variant':<12}{'s/step':>10}{'wall s':>9}{'speedup':>10}")
    for r in records:
        ratio = r["ratios"].get("vs_processes")
        print(f"{r['name']:<12}{r['seconds']:>10.4f}{r['wall_seconds']:>9.1f}"
              f"{'' if ratio is None else f'{ratio:.2f}x':>10}")
    print(f"wall time (start-up included): simulated {sim['wall']:.1f} s, processes {procs['wall']:.1f} s "
          f"({procs['wall'] / sim['wall']:.2f}x)")
    write_records(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
