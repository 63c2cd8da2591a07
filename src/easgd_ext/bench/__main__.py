"""python -m easgd_ext.bench {kernels,comm,async,step,simulate,fsdp,link,faults,soak} [options]: the benchmarks shipped with the package.

    kernels   fused kernel bandwidth vs torch eager, _foreach and torch.compile, and the copy
              ceiling (torch copy_, the native copy kernel, memcpy) timed with them
    comm      exchange latency vs size and world size, vs a raw all_reduce, the same exchange
              in plain torch (torch_flat) and PyTorch's PeriodicModelAverager (table, --json,
              --plot PNG)
    async     one asynchronous exchange: the shared-memory and sharded centers against their
              floors, and concurrent workers (also reached as `comm --mode async`)
    step      the averager's cost in a real training step (torchvision model; --world ranks),
              the blocking exchange against the streamed one (fragments, delay)
    simulate  p workers simulated in one process against p spawned processes (the LM task)
    fsdp      a sharded model's exchange (FSDP2 DTensor shards) against the replicated one at
              equal model size: bytes and center memory per rank, time; --hierarchy: EASGD
              across nodes with DDP inside them, three ways
    link      the exchange on a slow link (root): ranks in network namespaces, links shaped
              with tbf; DDP, PeriodicModelAverager, every averager and wire, streamed or not,
              and the raw collectives against the link rate
    faults    training through a failure: EASGD with on_failure="continue" on Gloo ranks, one
              killed or frozen mid-run, the survivors' final center against a run without it
    soak      training through many faults: an elastic job whose ranks are killed or frozen
              at random and replaced by ranks that join from the center; no hang, one center

Every one runs on the CPU by default (CUDA when asked, or for kernels/step when present),
prints a short table and writes its records with --json PATH. Every ratio is a speedup over a
peer measured in the same run: peer time / our time, > 1 = faster.
"""

from __future__ import annotations

import sys

COMMANDS = ("kernels", "comm", "async", "step", "simulate", "fsdp", "link", "faults", "soak")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown benchmark {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    if argv[0] == "kernels":
        from .kernels import main as run
    elif argv[0] == "step":
        from .train_step import main as run
    elif argv[0] == "async":
        from .async_comm import main as run
    elif argv[0] == "simulate":
        from .simulate_speed import main as run
    elif argv[0] == "link":
        from .link import main as run
    elif argv[0] == "fsdp":
        from .fsdp import main as run
    elif argv[0] == "faults":
        from .faults import main as run
    elif argv[0] == "soak":
        from .soak import main as run
    else:
        from .comm import main as run
    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
