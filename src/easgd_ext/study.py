"""Does EASGD help? A convergence study of the local-update methods, on two tasks, at equal
communication, with p workers simulated in one process (:mod:`easgd_ext.simulate`: the same
averagers and kernels as a distributed run).

    python -m easgd_ext.study                      # the default grid: ~1 hour on a 2-core CPU
    python -m easgd_ext.study --quick              # the pipeline end to end in under a minute
    python -m easgd_ext.study --device cuda --full # the larger grid, for a GPU
    python -m easgd_ext.study --tasks lm --methods easgd diloco --wires float32 int8 int4 int2 \
        --workers 4 --taus 16                      # the compressed wires against the float one

Methods: sync-sgd (the gradient all-reduced every step), local-sgd (periodic averaging),
downpour, easgd, eamsgd (EASGD with Nesterov momentum in the local steps), diloco (outer
Nesterov SGD, lr 0.7, momentum 0.9, workers reset to the center) and easgd-outer (the elastic
center moved by an outer Nesterov momentum step, workers pulled by alpha as in EASGD).

Tasks: "digits" (scikit-learn's 8x8 digits, a small CNN, SGD inner steps; test error) and "lm"
(a byte-level transformer on the Python standard library's sources, AdamW inner steps;
validation bits per byte). Each method's inner learning rate is chosen on a stated grid by
its validation result at one setting (the tuning seed), then every (p, tau) runs on fresh seeds;
the table reports the final result's mean and spread over seeds, with the communication rounds
and the bytes each worker sent (ring all-reduce accounting), and a PNG per task plots the final
result against tau and the curves against bytes sent.

``--wires`` runs every method that sends a difference (all but sync-sgd and local-sgd) once per
wire (``comm_dtype``: float32, bfloat16, float16, int8, int4, int2; the low-bit ones with error
feedback), each with the learning rate tuned on the float32 wire: the table's rows are then
"easgd int4" and so on, and their bytes are what the compressed wire sends.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import data, loop, methods
from .settings import COMM_DTYPES

METHODS = tuple(methods.METHODS)  # every method of the table
LM_METHODS = methods.names(("sync-sgd", "local-sgd", "easgd", "easgd-outer", "diloco"))
WIRES = ("float32", "bfloat16", "float16", "int8", "int4", "int2")
# an in-memory gradient mean; averaging sends parameters
FLOAT_ONLY = tuple(m for m in METHODS if not methods.method(m).sends_difference)


# ---- tasks ------------------------------------------------------------------------------------------
@dataclass
class Task:
    """What a run trains and how it is judged. ``metric`` is lower-is-better."""
    name: str
    metric: str
    make_model: Callable[[], torch.nn.Module]
    make_optimizer: Callable[[Any, float, str], torch.optim.Optimizer]  # (params, lr, method)
    batches: Callable[[int, int], Callable[[], tuple[torch.Tensor, torch.Tensor]]]  # (worker, seed)
    loss: Callable[[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]
    evaluate: Callable[[torch.nn.Module, bool], float]  # (model, final) -> metric
    lrs: tuple[float, ...]
    methods: tuple[str, ...]


def digits_task(device: torch.device, seed: int = 0) -> Task:
    """scikit-learn's digits: a validation split carved from the training split for tuning, the
    test split for the final results."""
    split = data.digits(seed)
    n_val = len(split.train_y) // 5
    val_x, val_y = split.train_x[:n_val], split.train_y[:n_val]
    train_x, train_y = split.train_x[n_val:], split.train_y[n_val:]

    def batches(worker: int, run_seed: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        stream = data.Stream(train_x, train_y, 32, seed=run_seed * 1000 + worker + 1)
        return lambda: tuple(t.to(device) for t in stream.next())  # type: ignore[return-value]

    def sgd(params: Any, lr: float, method: str) -> torch.optim.Optimizer:
        # The study's choice, not the methods' definition: the paper's EASGD and DOWNPOUR run
        # plain SGD; every other method (the baselines included) gets Nesterov momentum 0.9.
        plain = method in ("easgd", "downpour")
        return torch.optim.SGD(params, lr=lr, momentum=0.0 if plain else 0.9, nesterov=not plain)

    def evaluate(model: torch.nn.Module, final: bool) -> float:
        x, y = (split.test_x, split.test_y) if final else (val_x, val_y)
        return data.test_error(model, x, y)

    return Task("digits", "test error", lambda: data.DigitsCNN(), sgd, batches,
                lambda m, b: F.cross_entropy(m(b[0]), b[1]), evaluate, (0.02, 0.05, 0.1), METHODS)


def lm_task(device: torch.device, max_bytes: int, seq_len: int = 64, batch: int = 16,
            eval_windows: int = 64) -> Task:
    """A byte-level transformer on the standard library's sources (split by file): the first
    half of the validation windows tunes, the whole validation split judges."""
    from . import lm

    corpus = lm.load_corpus(max_bytes=max_bytes)

    def batches(worker: int, run_seed: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        stream = lm.Batches(corpus.train, batch, seq_len, seed=run_seed * 1000 + worker + 1)
        return lambda: tuple(t.to(device) for t in stream.next())  # type: ignore[return-value]

    def adamw(params: Any, lr: float, method: str) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def loss(model: torch.nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        logits = model(b[0])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[1].reshape(-1))

    def evaluate(model: torch.nn.Module, final: bool) -> float:
        return lm.bits_per_byte(model, corpus.val, seq_len, max_windows=eval_windows if not final
                                else 2 * eval_windows)

    return Task("lm", "bits per byte", lambda: lm.ByteTransformer(seq_len=seq_len), adamw,
                batches, loss, evaluate, (1e-3, 3e-3, 1e-2), LM_METHODS)


# ---- one run -----------------------------------------------------------------------------------------
@dataclass
class Run:
    task: str
    method: str
    workers: int
    tau: int
    lr: float
    seed: int
    wire: str = "float32"
    final: float = math.nan
    steps: list[int] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    mb_sent: list[float] = field(default_factory=list)
    metric: list[float] = field(default_factory=list)
    seconds: float = 0.0
    diverged: bool = False


def label(run: dict) -> str:
    """A run's row in the table: its method, and its wire when that is not float32."""
    wire = run.get("wire", "float32")
    return run["method"] if wire == "float32" else f"{run['method']} {wire}"


def wires_for(method: str, wires: tuple[str, ...]) -> tuple[str, ...]:
    """The wires a method runs with: the float32 one only for those that send no difference."""
    return ("float32",) if method in FLOAT_ONLY else wires


def averager_for(method: str, tau: int, wire: str = "float32") -> tuple[str | None, dict[str, Any]]:
    """(simulate's averager name, its arguments) for a method on a wire; ``None`` for sync-sgd."""
    if wire not in WIRES:
        raise ValueError(f"unknown wire {wire!r}; choose from {', '.join(WIRES)}")
    if wire != "float32" and method in FLOAT_ONLY:
        raise ValueError(f"method {method!r} has no {wire} wire: it sends no difference")
    name, kwargs = _averager_for(method, tau)
    if wire != "float32":
        kwargs["comm_dtype"] = COMM_DTYPES[wire]
    return name, kwargs


def _averager_for(method: str, tau: int) -> tuple[str | None, dict[str, Any]]:
    chosen = methods.method(method)  # its fixed settings (easgd-outer's outer step) come with it
    if chosen.averager is None:
        return None, {}
    return chosen.name, {"tau": tau, **({"beta": 0.9} if chosen.elastic else {})}


def run_one(task: Task, method: str, workers: int, tau: int, lr: float, seed: int, steps: int,
            eval_every: int, device: torch.device, final: bool, wire: str = "float32") -> Run:
    """``steps`` local steps of ``workers`` simulated workers exchanging over ``wire``; the
    center's metric every ``eval_every`` steps (validation, or with ``final`` the final split at
    the end)."""
    torch.manual_seed(seed)
    name, kwargs = averager_for(method, tau, wire)
    record = Run(task.name, method, workers, tau, lr, seed, wire)
    start = time.perf_counter()

    def add(point: loop.Point) -> bool:
        record.steps.append(point.step)
        record.rounds.append(point.exchanges + point.skipped)
        record.mb_sent.append(point.bytes_sent / 1e6)
        record.metric.append(point.metric)
        record.diverged = not math.isfinite(point.metric)
        return not record.diverged  # a diverged run stops there

    job = loop.SimulatedWorkers(task.make_model, workers, name,
                                lambda p: task.make_optimizer(p, lr, method),
                                [task.batches(k, seed) for k in range(workers)], task.loss,
                                lambda model, last: task.evaluate(model, final and last), device, **kwargs)
    try:
        loop.run(job, steps, eval_every, add)
    finally:
        job.close()
    record.final = record.metric[-1] if record.metric else math.nan
    record.seconds = time.perf_counter() - start
    return record


# ---- the grid ---------------------------------------------------------------------------------------
@dataclass
class Grid:
    workers: tuple[int, ...]
    taus: tuple[int, ...]
    seeds: int
    steps: dict[str, int]
    eval_every: dict[str, int]
    tune_at: tuple[int, int]  # (workers, tau) where each method's learning rate is chosen
    lm_bytes: int
    methods: dict[str, tuple[str, ...]] | None = None
    lrs: dict[str, tuple[float, ...]] | None = None
    wires: tuple[str, ...] = ("float32",)


GRIDS = {
    "quick": Grid((2,), (4,), 1, {"digits": 24, "lm": 16}, {"digits": 12, "lm": 8}, (2, 4), 200_000,
                  {"digits": ("sync-sgd", "easgd"), "lm": ("easgd", "diloco")},
                  {"digits": (0.05,), "lm": (3e-3,)}),
    "default": Grid((4, 8), (4, 16, 64), 3, {"digits": 384, "lm": 256}, {"digits": 32, "lm": 64},
                    (4, 16), 2_000_000),
    "full": Grid((4, 8, 16), (4, 16, 64), 3, {"digits": 1024, "lm": 3072}, {"digits": 64, "lm": 256},
                 (8, 16), 20_000_000),
}


def run_study(tasks: list[str], grid: Grid, device: torch.device, progress: Any = None,
              checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Tunes each method's learning rate, then runs every (method, p, tau) on fresh seeds;
    ``checkpoint(result so far)`` after each task (a long study keeps what it has measured)."""
    out: dict[str, Any] = {"tasks": {}}
    for task_name in tasks:
        task = digits_task(device) if task_name == "digits" else lm_task(device, grid.lm_bytes)
        methods = (grid.methods or {}).get(task_name, task.methods)
        lrs = (grid.lrs or {}).get(task_name, task.lrs)
        steps, every = grid.steps[task_name], grid.eval_every[task_name]
        tuning: dict[str, dict[float, float]] = {}
        p0, tau0 = grid.tune_at
        for method in methods:
            tuning[method] = {}
            for lr in lrs:
                r = run_one(task, method, p0, tau0, lr, 0, steps, every, device, final=False)
                tuning[method][lr] = r.final
                if progress:
                    progress(f"{task_name} tune {method} lr={lr:g}: {r.final:.4f} ({r.seconds:.1f} s)")
        best = {m: min(t, key=lambda lr: (math.isnan(t[lr]), t[lr])) for m, t in tuning.items()}
        runs: list[Run] = []
        for method in methods:
            taus = grid.taus if method != "sync-sgd" else grid.taus[:1]  # sync-sgd has no tau
            for wire in wires_for(method, grid.wires):
                for p in grid.workers:
                    for tau in taus:
                        for seed in range(1, grid.seeds + 1):
                            r = run_one(task, method, p, tau, best[method], seed, steps, every,
                                        device, final=True, wire=wire)
                            runs.append(r)
                            if progress:
                                progress(f"{task_name} {label(asdict(r))} p={p} tau={tau} "
                                         f"seed={seed}: {r.final:.4f} ({r.seconds:.1f} s)")
        out["tasks"][task_name] = {"metric": task.metric, "steps": steps, "lrs": list(lrs),
                                   "wires": list(grid.wires),
                                   "tuning": {m: {str(k): v for k, v in t.items()} for m, t in tuning.items()},
                                   "chosen_lr": best, "tune_at": list(grid.tune_at),
                                   "runs": [asdict(r) for r in runs]}
        if checkpoint is not None:
            checkpoint(out)
    return out


# ---- report ------------------------------------------------------------------------------------------
def summarize(task: dict) -> list[dict]:
    """Per (method, p, tau): the final metric's mean and standard deviation over seeds, the
    rounds and MB sent per worker."""
    groups: dict[tuple[str, int, int], list[dict]] = {}
    for r in task["runs"]:
        groups.setdefault((label(r), r["workers"], r["tau"]), []).append(r)
    rows = []
    for (method, p, tau), rs in groups.items():
        finals = [r["final"] for r in rs]
        rows.append({"method": method, "workers": p, "tau": "-" if rs[0]["method"] == "sync-sgd" else tau,
                     "mean": statistics.fmean(finals), "std": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
                     "seeds": len(rs), "rounds": rs[0]["rounds"][-1], "mb_sent": rs[0]["mb_sent"][-1],
                     "lr": rs[0]["lr"], "diverged": sum(r["diverged"] for r in rs)})
    return rows


def print_tables(result: dict) -> None:
    for name, task in result["tasks"].items():
        print(f"\n{name}: final {task['metric']} (mean +- std over seeds), {task['steps']} local "
              f"steps per worker; inner lr chosen from {task['lrs']} at p={task['tune_at'][0]}, "
              f"tau={task['tune_at'][1]} (tuning seed 0, validation split)")
        print(f"{'method':<18}{'p':>3}{'tau':>5}{task['metric']:>16}{'rounds':>8}{'MB/worker':>11}{'lr':>8}")
        for row in summarize(task):
            note = f"  ({row['diverged']} diverged)" if row["diverged"] else ""
            print(f"{row['method']:<18}{row['workers']:>3}{row['tau']:>5}"
                  f"{row['mean']:>9.4f} +-{row['std']:.4f}{row['rounds']:>8}{row['mb_sent']:>11.2f}"
                  f"{row['lr']:>8g}{note}")


def plot(result: dict, folder: Path) -> list[Path]:
    """One PNG per task: the final metric against tau per method (p as line styles, seeds'
    spread as error bars), and the curves against MB sent per worker at the largest p and the
    middle tau."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    folder.mkdir(parents=True, exist_ok=True)
    for name, task in result["tasks"].items():
        rows = summarize(task)
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        methods = list(dict.fromkeys(r["method"] for r in rows))
        colors = {m: f"C{i}" for i, m in enumerate(methods)}
        ps = sorted({r["workers"] for r in rows})
        for m in methods:
            for i, p in enumerate(ps):
                rs = sorted((r for r in rows if r["method"] == m and r["workers"] == p and r["tau"] != "-"),
                            key=lambda r: r["tau"])
                if rs:
                    left.errorbar([r["tau"] for r in rs], [r["mean"] for r in rs], [r["std"] for r in rs],
                                  color=colors[m], linestyle=["-", "--", ":"][i % 3], marker="o",
                                  markersize=3, capsize=2, label=f"{m} p={p}")
                sync = [r for r in rows if r["method"] == m and r["workers"] == p and r["tau"] == "-"]
                if sync:
                    left.axhline(sync[0]["mean"], color=colors[m], linestyle=["-", "--", ":"][i % 3],
                                 linewidth=0.8, label=f"{m} p={p}")
        left.set_xscale("log", base=2)
        left.set_xlabel("tau (local steps between exchanges)")
        left.set_ylabel(f"final {task['metric']}")
        left.grid(alpha=0.3)
        left.legend(fontsize=6, ncol=2)
        taus = sorted({r["tau"] for r in task["runs"]})
        p_max, tau_mid = max(ps), taus[len(taus) // 2]
        for m in methods:
            runs = [r for r in task["runs"] if label(r) == m and r["workers"] == p_max
                    and (r["tau"] == tau_mid or r["method"] == "sync-sgd")]
            if runs:
                r = runs[0]
                right.plot([max(v, 1e-3) for v in r["mb_sent"]], r["metric"], color=colors[m], label=m,
                           marker=".", markersize=3)
        right.set_xscale("log")
        right.set_xlabel(f"MB sent per worker (p={p_max}, tau={tau_mid}; seed 1)")
        right.set_ylabel(task["metric"])
        right.grid(alpha=0.3, which="both")
        right.legend(fontsize=7)
        fig.suptitle(f"{name}: local-update methods at equal communication")
        fig.tight_layout()
        path = folder / f"study_{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m easgd_ext.study", description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a tiny grid: the pipeline end to end (<60 s)")
    size.add_argument("--full", action="store_true", help="the larger grid (for a GPU)")
    parser.add_argument("--tasks", nargs="+", choices=["digits", "lm"], default=["digits", "lm"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--seeds", type=int, default=None, help="fresh seeds per setting (default 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on the CPU (default 1: the simulated workers' small "
                             "models run fastest on one thread each)")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help=f"only these methods (of {', '.join(METHODS)}; the lm task has "
                             f"{', '.join(LM_METHODS)}); default: every method of each task")
    parser.add_argument("--wires", nargs="+", choices=WIRES, default=None,
                        help="run each method that sends a difference once per wire (default: float32)")
    parser.add_argument("--workers", nargs="+", type=int, default=None, help="the p of the grid")
    parser.add_argument("--taus", nargs="+", type=int, default=None, help="the tau of the grid")
    parser.add_argument("--json", type=Path, default=None, help="write every run's curves here")
    parser.add_argument("--plot-dir", type=Path, default=Path("."), help="where the PNGs go (default: .)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.plot_dir.exists() and not args.plot_dir.is_dir():
        parser.error(f"--plot-dir {args.plot_dir} is not a folder")
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json {args.json}: folder {args.json.parent} does not exist")
    grid = GRIDS["quick" if args.quick else "full" if args.full else "default"]
    grid = _with_options(parser, grid, args)
    device = torch.device(args.device)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def progress(line: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {line}", file=sys.stderr, flush=True)

    def save_so_far(partial: dict) -> None:
        if args.json:
            args.json.write_text(json.dumps({**partial, "partial": True}, indent=1))

    result = run_study(args.tasks, grid, device, progress, save_so_far)
    result["seconds"] = time.perf_counter() - start
    result["grid"] = {k: v for k, v in asdict(grid).items()}
    result["command"] = "python -m easgd_ext.study " + " ".join(sys.argv[1:] if argv is None else argv)
    print_tables(result)
    for path in plot(result, args.plot_dir):
        print(f"plot: {path}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"json: {args.json}")
    print(f"study took {result['seconds']:.0f} s")
    return 0


def _with_options(parser: argparse.ArgumentParser, grid: Grid, args: argparse.Namespace) -> Grid:
    """The grid with the command line's overrides (a copy: the named grids stay as written)."""
    grid = replace(grid)
    if args.seeds is not None:
        grid.seeds = args.seeds
    for name, values in (("--workers", args.workers), ("--taus", args.taus)):
        if values is not None and min(values) < 1:
            parser.error(f"{name} must be at least 1, got {min(values)}")
    if args.workers is not None:
        if min(args.workers) < 2:
            parser.error(f"--workers must be at least 2 (one worker has nothing to average), got {min(args.workers)}")
        grid.workers = tuple(args.workers)
        grid.tune_at = (args.workers[0], grid.tune_at[1])
    if args.taus is not None:
        grid.taus = tuple(args.taus)
        grid.tune_at = (grid.tune_at[0], args.taus[0])
    if args.wires is not None:
        grid.wires = tuple(dict.fromkeys(args.wires))
    if args.methods is not None:
        known = {"digits": METHODS, "lm": LM_METHODS}
        chosen = {task: tuple(m for m in args.methods if m in known[task]) for task in args.tasks}
        unknown = [m for m in args.methods if not any(m in known[t] for t in args.tasks)]
        if unknown:
            parser.error(f"--methods: {', '.join(unknown)} is not a method of "
                         f"{' or '.join(args.tasks)}; choose from {', '.join(METHODS)}")
        empty = [task for task, ms in chosen.items() if not ms]
        if empty:
            parser.error(f"--methods: none of them is a method of task {empty[0]!r}")
        grid.methods = chosen
    return grid


if __name__ == "__main__":
    sys.exit(main())
