"""The problems the multi-process tests run on each rank, and their float64 simulations.

Everything a rank does is determined by seeds (its starting point, its noise, its quadratic
objective), so the parent process can replay all p workers in float64 and compare.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch

import easgd_ext
from easgd_ext.methods import method

SHAPES = [(7, 3), (5,), (1000,)]
SIGMA, LR, CURVATURE, MOMENTUM = 0.1, 0.05, 1.0, 0.9
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALGORITHMS = {name: method(name).averager for name in ("easgd", "eamsgd", "downpour", "average")}


@dataclass(frozen=True)
class Case:
    algo: str            # easgd | eamsgd | downpour | average
    tau: int
    dtype: str
    comm: str | None     # the wire dtype; None: the parameters'
    grad: bool           # gradient steps on a quadratic (else: random perturbations)
    steps: int = 12
    bucket_cap_mb: float = 25.0
    mixed: bool = False  # add a bfloat16 parameter: two flat groups

    def param_specs(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        specs = [(s, DTYPES[self.dtype]) for s in SHAPES]
        return specs + ([((33,), torch.bfloat16)] if self.mixed else [])


def _normal(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def initial_values(case: Case, rank: int) -> list[torch.Tensor]:
    """Different on every rank, so the tests see the averager start everyone from rank 0's."""
    return [_normal(s, 10_000 * rank + i).to(dt) for i, (s, dt) in enumerate(case.param_specs())]


def noise(case: Case, rank: int, step: int, i: int) -> torch.Tensor:
    return SIGMA * _normal(case.param_specs()[i][0], 1_000_003 + 7919 * rank + 101 * step + i)


def target(case: Case, rank: int, i: int) -> torch.Tensor:
    """Worker ``rank`` minimizes CURVATURE / 2 * ||x - target||^2 (plus gradient noise)."""
    return _normal(case.param_specs()[i][0], 555 + 31 * rank + i)


def make_optimizer(case: Case, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer | None:
    if not case.grad:
        return None
    if case.algo == "eamsgd":
        return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, nesterov=True)
    return torch.optim.SGD(params, lr=LR)


def make_averager(case: Case, params: list[torch.nn.Parameter]):
    cls = ALGORITHMS[case.algo]
    return cls(params, tau=case.tau, comm_dtype=case.comm, bucket_cap_mb=case.bucket_cap_mb)


def local_step(case: Case, rank: int, step: int, params: list[torch.nn.Parameter],
               opt: torch.optim.Optimizer | None) -> None:
    with torch.no_grad():
        for i, p in enumerate(params):
            n = noise(case, rank, step, i)
            if opt is None:
                p.add_(n.to(p.dtype))
            else:
                g = CURVATURE * (p.double() - target(case, rank, i)) + n
                p.grad = g.to(p.dtype)
    if opt is not None:
        opt.step()


def run_case(rank: int, world: int, case: Case) -> dict:
    params = [torch.nn.Parameter(v) for v in initial_values(case, rank)]
    opt = make_optimizer(case, params)
    avg = make_averager(case, params)
    returned = []
    for t in range(case.steps):
        local_step(case, rank, t, params, opt)
        returned.append(avg.step())
    x = [p.detach().clone() for p in params]
    with avg.center_parameters():
        center_as_params = [p.detach().clone() for p in params]
    return {"x": x, "center_as_params": center_as_params, "returned": returned,
            "center_state": [c.clone() for c in avg.center_state()], "stats": asdict(avg.stats)}


def run_cases(rank: int, world: int, cases: list[Case]) -> list[dict]:
    return [run_case(rank, world, case) for case in cases]


# ---- the float64 simulation of all p workers -------------------------------------------------
def _rnd(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return v.to(dtype).double()


def simulate(case: Case, world: int) -> dict:
    """All p workers and the center in float64, rounding where the implementation stores."""
    specs = case.param_specs()
    start = [v.double() for v in initial_values(case, 0)]
    xs = [[v.clone() for v in start] for _ in range(world)]
    center = [v.clone() for v in start]
    x_last = [[v.clone() for v in start] for _ in range(world)]
    bufs: list[list[torch.Tensor | None]] = [[None] * len(specs) for _ in range(world)]
    alpha = torch.tensor(0.9 / world, dtype=torch.float32).item()  # the kernels' float32 alpha
    inv_p = torch.tensor(1.0 / world, dtype=torch.float32).item()
    returned = []
    for t in range(case.steps):
        for r in range(world):
            for i, (_, dt) in enumerate(specs):
                n = noise(case, r, t, i)
                x = xs[r][i]
                if not case.grad:
                    xs[r][i] = _rnd(x + _rnd(n, dt), dt)
                    continue
                g = _rnd(CURVATURE * (x - target(case, r, i)) + n, dt)
                if case.algo == "eamsgd":  # torch.optim.SGD's Nesterov form
                    b = g if bufs[r][i] is None else _rnd(MOMENTUM * bufs[r][i] + g, dt)
                    bufs[r][i] = b
                    g = _rnd(g + MOMENTUM * b, dt)
                xs[r][i] = _rnd(x - LR * g, dt)
        due = (t + 1) % case.tau == 0
        returned.append(due)
        if not due:
            continue
        for i, (_, dt) in enumerate(specs):
            wire = DTYPES[case.comm] if case.comm else dt
            if case.algo in ("easgd", "eamsgd"):
                ds = [_rnd(alpha * (xs[r][i] - center[i]), wire) for r in range(world)]
                for r in range(world):
                    xs[r][i] = _rnd(xs[r][i] - ds[r], dt)
                center[i] = _rnd(center[i] + _rnd(sum(ds), wire), torch.float32)
            elif case.algo == "downpour":
                vs = [_rnd(xs[r][i] - x_last[r][i], wire) for r in range(world)]
                center[i] = _rnd(center[i] + _rnd(sum(vs), wire), torch.float32)
                for r in range(world):
                    xs[r][i] = x_last[r][i] = _rnd(center[i], dt)
            else:
                total = _rnd(sum(_rnd(xs[r][i], wire) for r in range(world)), wire)
                for r in range(world):
                    xs[r][i] = _rnd(total * inv_p, dt)
    return {"x": xs, "center": None if case.algo == "average" else center, "returned": returned}


# ---- scenarios for the other multi-process tests ----------------------------------------------
def schedule_case(rank: int, world: int, tau: int, steps: int) -> dict:
    """Which step() calls exchanged, and after which of them the center moved."""
    case = Case("easgd", tau, "float32", None, grad=False)
    params = [torch.nn.Parameter(v) for v in initial_values(case, rank)]
    avg = make_averager(case, params)
    returned, center_moved = [], []
    for t in range(steps):
        local_step(case, rank, t, params, None)
        before = [c.clone() for c in avg.center_state()]
        returned.append(avg.step())
        center_moved.append(any(not torch.equal(b, c) for b, c in zip(before, avg.center_state())))
    clock_before = avg.clock
    before = [c.clone() for c in avg.center_state()]
    avg.exchange()
    forced = any(not torch.equal(b, c) for b, c in zip(before, avg.center_state()))
    return {"returned": returned, "center_moved": center_moved, "clock": avg.clock,
            "clock_before": clock_before, "forced": forced, "exchanges": avg.stats.exchanges}


def periodic_vs_pytorch(rank: int, world: int, dtype_name: str, steps: int) -> list[float]:
    """Our PeriodicAverager (tau=1) and PyTorch's PeriodicModelAverager (period=1) on the same
    parameters and perturbations; returns the largest difference after each averaging of the
    same inputs, in units of the dtype's epsilon."""
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

    case = Case("average", 1, dtype_name, None, grad=False)
    ours = [torch.nn.Parameter(v) for v in initial_values(case, rank)]
    avg = easgd_ext.PeriodicAverager(ours, tau=1)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]  # after our broadcast
    for p in theirs:
        p.grad = torch.zeros_like(p)  # PyTorch averages only parameters that have a gradient
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "period 1: use DDP instead" -- we compare, not train
        reference = PeriodicModelAverager(period=1, warmup_steps=0)
    diffs = []
    for t in range(steps):
        local_step(case, rank, t, ours, None)
        with torch.no_grad():
            for a, b in zip(theirs, ours):  # both average exactly the same inputs
                a.copy_(b)
        avg.step()
        reference.average_parameters(theirs)
        ulp = torch.finfo(DTYPES[dtype_name]).eps
        diffs.append(max(((a.double() - b.double()).abs() / (ulp * (1 + b.double().abs()))).max().item()
                         for a, b in zip(ours, theirs)))
    return diffs


def build_with(rank: int, world: int, per_rank: dict) -> str:
    """Builds an ElasticAverager with arguments that may differ by rank; returns 'built'.
    per_rank: {rank: {"extra_param": (shape, dtype_name), "kwargs": {...}}}."""
    spec = per_rank.get(rank, {})
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    if "extra_param" in spec:
        shape, dt = spec["extra_param"]
        params.append(torch.nn.Parameter(torch.randn(shape).to(DTYPES[dt])))
    if "retype" in spec:
        params[1] = torch.nn.Parameter(params[1].detach().to(DTYPES[spec["retype"]]))
    easgd_ext.ElasticAverager(params, **{"tau": 2, **spec.get("kwargs", {})})
    return "built"


def non_finite_exchange(rank: int, world: int, bad_rank: int, comm: str | None,
                        overflow: bool, policy: str = "skip") -> dict:
    """Exchange 1: rank ``bad_rank`` holds a NaN (or, with ``overflow``, every rank's d is
    large enough that the float16 sum overflows). Exchange 2: all healthy again."""
    params = [torch.nn.Parameter(torch.randn(300, generator=torch.Generator().manual_seed(rank)))]
    avg = easgd_ext.ElasticAverager(params, tau=1, comm_dtype=comm, on_nonfinite=policy)
    with torch.no_grad():
        params[0].add_(torch.randn(300, generator=torch.Generator().manual_seed(50 + rank)))
        healthy = params[0].detach().clone()
        if overflow:
            params[0].add_(60_000.0 / avg.alpha)  # d ~ 60000 on every rank: finite; the sum is not
        elif rank == bad_rank:
            params[0][7] = float("nan")
    before_x = params[0].detach().clone()
    before_c = [c.clone() for c in avg.center_state()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = avg.step()
        stats_first = asdict(avg.stats)
    after_x = params[0].detach().clone()
    after_c = [c.clone() for c in avg.center_state()]
    with torch.no_grad():
        params[0].copy_(healthy)
    second = avg.step()
    return {"first": first, "second": second, "warnings": [str(w.message) for w in caught],
            "warning_files": [w.filename for w in caught],
            "x_unchanged": torch.equal(after_x, before_x, ) if rank != bad_rank or overflow
            else bool(torch.isnan(after_x[7])),
            "center_unchanged": all(torch.equal(a, b) for a, b in zip(before_c, after_c)),
            "before_x": before_x, "after_x": after_x, "before_c": before_c, "after_c": after_c,
            "alpha": avg.alpha, "stats_first": stats_first,
            "center_after_second": [c.clone() for c in avg.center_state()],
            "stats": asdict(avg.stats)}


def resume_case(rank: int, world: int, algo: str, comm: str | None, split: int | None) -> dict:
    """Trains ``2 * 7`` steps of EAMSGD-style updates; with ``split``, stops after ``split``
    steps, saves everything, builds fresh objects, loads and continues."""
    case = Case(algo, 3, "float32", comm, grad=True, steps=14)
    params = [torch.nn.Parameter(v) for v in initial_values(case, rank)]
    opt = make_optimizer(case, params)
    avg = make_averager(case, params)
    for t in range(case.steps):
        if t == split:
            saved = {"params": [p.detach().clone() for p in params],
                     "opt": opt.state_dict(), "avg": avg.state_dict()}
            params = [torch.nn.Parameter(v) for v in initial_values(case, rank)]
            opt = make_optimizer(case, params)
            avg = make_averager(case, params)  # broadcasts rank 0's start: undone by the loads
            with torch.no_grad():
                for p, v in zip(params, saved["params"]):
                    p.copy_(v)
            opt.load_state_dict(saved["opt"])
            avg.load_state_dict(saved["avg"])
        local_step(case, rank, t, params, opt)
        avg.step()
    stats = asdict(avg.stats)
    return {"x": [p.detach().clone() for p in params], "center": [c.clone() for c in avg.center_state()],
            "clock": avg.clock, "exchanges": stats["exchanges"], "bytes_sent": stats["bytes_sent"]}


def sync_fault(rank: int, world: int, fault: str, steps: int, exchange_timeout: float) -> dict:
    """Rank 1 dies (``kill``: SIGKILL to itself), freezes (``stop``: SIGSTOP) or simply leaves
    the loop one step early (``uneven``) at step ``steps``; the other ranks report what their
    step() raised, how long it took, and whether the failed exchange changed anything."""
    import os
    import signal
    import time

    params = [torch.nn.Parameter(torch.randn(5000, generator=torch.Generator().manual_seed(rank)))]
    avg = easgd_ext.ElasticAverager(params, tau=1, exchange_timeout=exchange_timeout)
    for step in range(1, steps + 1):
        with torch.no_grad():
            params[0].add_(0.1)
        if rank == 1 and step == steps:
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif fault == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            else:  # uneven: this rank's loop is one step shorter
                return {"left": True}
        x, c = params[0].detach().clone(), avg.center_state()[0].clone()
        start = time.monotonic()
        try:
            avg.step()
        except easgd_ext.ExchangeError as exc:
            return {"error": str(exc), "silent": exc.silent_ranks, "clock": avg.clock,
                    "seconds": time.monotonic() - start, "exchanges": avg.stats.exchanges,
                    "x_unchanged": torch.equal(params[0].detach(), x),
                    "center_unchanged": torch.equal(avg.center_state()[0], c), "step": step}
    return {"error": None}
