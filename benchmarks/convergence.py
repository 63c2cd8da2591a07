"""Time to reach a target center test error, per algorithm and tau, median over seeds.

The paper's claim on our machine: p workers on the default data (scikit-learn's digits, small
CNN), tau in {1, 4, 16}; for each (tau, seed) one `python -m easgd_ext.train` run trains every
algorithm, and this script reads the curves. sync-sgd exchanges every step whatever tau is.

    python benchmarks/convergence.py                       # p=4, tau 1 4 16, 3 seeds
    python benchmarks/convergence.py --seeds 0 1 --taus 4 16 --target 0.05 --json conv.json

Reports, per algorithm and tau: the median training wall time (and steps, and MB sent) at which
the center's test error first reached the target, with how many seeds reached it at all.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from easgd_ext import train


def first_reach(result: dict, target: float) -> tuple[float, int, int] | None:
    for seconds, step, sent, err in zip(result["seconds"], result["steps"], result["bytes_sent"],
                                        result["test_error"]):
        if err <= target:
            return seconds, step, sent
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--taus", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--target", type=float, default=0.05, help="center test error to reach")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--algo", default=",".join(train.ALGORITHMS))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    table: dict[tuple[str, int], list[tuple[float, int, int] | None]] = {}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for tau in args.taus:
            for seed in args.seeds:
                out = Path(tmp) / f"tau{tau}_seed{seed}.json"
                print(f"== tau {tau}, seed {seed} ==", flush=True)
                train.main(["--workers", str(args.workers), "--tau", str(tau), "--seed", str(seed),
                            "--steps", str(args.steps), "--lr", str(args.lr), "--algo", args.algo,
                            "--plot", str(Path(tmp) / "plot.png"), "--json", str(out)])
                run = json.loads(out.read_text())
                runs.append({"tau": tau, "seed": seed, "results": run["results"]})
                for result in run["results"]:
                    table.setdefault((result["algo"], tau), []).append(first_reach(result, args.target))

    print(f"\ntime to reach center test error <= {args.target:g} ({args.workers} workers, "
          f"{len(args.seeds)} seeds, median over the seeds that reached it)")
    print(f"{'algorithm':<10}{'tau':>5}{'reached':>9}{'wall s':>9}{'steps':>7}{'MB sent':>9}")
    summary = []
    for (algo, tau), hits in table.items():
        ok = [h for h in hits if h is not None]
        row = {"algo": algo, "tau": tau, "reached": len(ok), "seeds": len(hits)}
        if ok:
            row.update(seconds=statistics.median(h[0] for h in ok),
                       steps=statistics.median(h[1] for h in ok),
                       mb_sent=statistics.median(h[2] for h in ok) / 1e6)
            print(f"{algo:<10}{tau:>5}{len(ok):>5}/{len(hits):<3}{row['seconds']:>9.2f}"
                  f"{row['steps']:>7.0f}{row['mb_sent']:>9.2f}")
        else:
            print(f"{algo:<10}{tau:>5}{0:>5}/{len(hits):<3}{'-':>9}{'-':>7}{'-':>9}")
        summary.append(row)
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)},
                                         "summary": summary, "runs": runs}, indent=1))
        print(f"\njson: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
