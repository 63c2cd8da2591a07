"""What the averager costs in a real training step, in one run.

A torchvision model's training step (forward, backward, SGD step) is timed alone and with an
exchange after the optimizer step, on ``--world`` ranks (Gloo on CPU, NCCL on CUDA with one GPU
per rank; the averaged variants' collectives are real):
  step          the training step alone (no averaging)
  easgd         + ElasticAverager.step() after every opt.step(), an exchange every --tau steps:
                the whole exchange blocks the step it falls on
  easgd_stream  + the same with fragments=tau, delay=1: a tau-th of the model leaves every step
                and its sum is applied one step later, so the collective runs behind the next
                step's compute
  easgd_tau1    + an exchange every step
  torch_flat    + the same EASGD exchange in plain torch every step, on one flat float32
                buffer the parameters view: d = x - c; d *= alpha; x -= d; all_reduce(d); c += d
Each variant has its own copy of the model (same initial weights) and optimizer, and the same
batch. The variants run in rounds, in a random order each round (seeded, the same on every
rank); in a round each runs a block of steps (a multiple of tau, so every variant exchanges
equally often in every block), and its step time in that round is the block's mean.

Reported per variant: the median step time over rounds, its inter-quartile range, the overhead
against the step alone, "blocked": the time the call after opt.step() blocks the loop, summed
over a tau window (what the user's loop waits for the exchange), "waited": the part of it the
host spent waiting for collectives (``stats.wait_seconds``; the rest is the exchange's kernels
and launches; 0 with NCCL, where the stream waits instead), and "peak MB": the most bytes
one step puts on the network per rank (``avg.bytes_per_step()``). easgd_stream is compared with
easgd on both: blocked and peak, as a share of the blocking exchange's.

On CUDA every step is followed by a device synchronization: the step time is what the user
sees. With channels_last, the step alone keeps its weights channels_last, while the averaged
variants view contiguous flat buffers (the input is channels_last for all).

    python -m easgd_ext.bench step --world 2          # CPU: resnet18, batch 8, tau 4, Gloo
    python -m easgd_ext.bench step --device cuda      # resnet50, batch 128, bf16, channels_last
    python -m easgd_ext.bench step --batch 2 --image-size 64 --rounds 2 --json step.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import easgd_ext
from easgd_ext._launch import launcher_rank_world, run_workers
from easgd_ext.stats import ring_allreduce_bytes

from .cli import RATIO_LINE, count, prog, ratio_cell, speedups
from .collectives import Works, rank_session, write_records_of_rank0
from .peers import flat_views, torch_flat_easgd
from .report import warn_if_noisy, write_records

VARIANTS = ("step", "easgd", "easgd_stream", "easgd_tau1", "torch_flat")
BETA = 0.9  # ElasticAverager's default: alpha = beta / p
AMP = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULTS = {
    "cuda": {"model": "resnet50", "batch": 128, "amp": "bfloat16", "channels_last": True, "rounds": 20},
    "cpu": {"model": "resnet18", "batch": 8, "amp": "none", "channels_last": False, "rounds": 3},
}


class Variant:
    """One model, its optimizer and what runs after each optimizer step (timed: the seconds it
    blocked the loop), with the bytes per step of its tau window where known."""

    def __init__(self, name: str, model: torch.nn.Module, opt: torch.optim.Optimizer,
                 after: Callable[[], object] | None, tau: int | None = None,
                 bytes_per_step: list[int] | None = None,
                 averager: easgd_ext.ElasticAverager | None = None) -> None:
        self.name, self.model, self.opt, self.after = name, model, opt, after
        self.tau, self.bytes_per_step = tau, bytes_per_step or []
        self.averager = averager
        self.blocked, self.calls = 0.0, 0
        self.wait_mark = 0.0

    def reset(self) -> None:
        """Counts from now (the averager's counters read outside the timed steps)."""
        self.blocked, self.calls = 0.0, 0
        self.wait_mark = self.averager.stats.wait_seconds if self.averager is not None else 0.0

    def waited(self) -> float:
        """Seconds of ``blocked`` the host spent waiting for collectives since :meth:`reset`."""
        return self.averager.stats.wait_seconds - self.wait_mark if self.averager is not None else 0.0

    def run_after(self) -> None:
        if self.after is not None:
            start = time.perf_counter()
            self.after()
            self.blocked += time.perf_counter() - start
            self.calls += 1


def make_variants(args: argparse.Namespace, device: torch.device, world: int,
                  works: Works) -> list[Variant]:
    import torchvision

    torch.manual_seed(args.seed)
    base = getattr(torchvision.models, args.model)(weights=None).to(device)
    variants = []
    for name in VARIANTS:
        model = copy.deepcopy(base)
        after: Callable[[], object] | None = None
        tau, per_step, avg = None, None, None
        if name == "step":
            if args.channels_last:
                model = model.to(memory_format=torch.channels_last)
        elif name == "torch_flat":
            x = flat_views(list(model.parameters()))
            after, tau = torch_flat_easgd(x, BETA / world, works), 1
            per_step = [ring_allreduce_bytes(x.nbytes, world)]
        else:
            tau = 1 if name == "easgd_tau1" else args.tau
            stream = {"fragments": tau, "delay": 1} if name == "easgd_stream" and tau > 1 else {}
            avg = easgd_ext.ElasticAverager(model.parameters(), tau=tau, beta=BETA, **stream)
            after, per_step = avg.step, avg.bytes_per_step()
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True)
        variants.append(Variant(name, model, opt, after, tau, per_step, avg))
    return variants


def train_step(v: Variant, images: torch.Tensor, labels: torch.Tensor, amp: torch.dtype | None) -> None:
    with torch.autocast(images.device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
        loss = F.cross_entropy(v.model(images), labels)
    v.opt.zero_grad(set_to_none=True)
    loss.backward()
    v.opt.step()
    v.run_after()


def block_seconds(v: Variant, steps: int, images: torch.Tensor, labels: torch.Tensor,
                  amp: torch.dtype | None) -> float:
    """Mean seconds per step over ``steps`` steps (synchronized per step on CUDA)."""
    cuda = images.device.type == "cuda"
    total = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        train_step(v, images, labels, amp)
        if cuda:
            torch.cuda.synchronize(images.device)
        total += time.perf_counter() - start
    return total / steps


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q3


def measure(args: argparse.Namespace, device: torch.device, world: int, rank: int,
            works: Works) -> list[dict]:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        # Subnormal weights (a variant drifting towards zero) would make its CPU steps several
        # times slower for reasons that are not the averager's.
        torch.set_flush_denormal(True)
    variants = make_variants(args, device, world, works)
    amp = AMP[args.amp]
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen).to(device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
    for v in variants:  # warm-up: allocations, cuDNN's algorithm search, the first exchanges
        block_seconds(v, args.block, images, labels, amp)
        v.reset()
    order = random.Random(args.seed)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    rounds = range(args.rounds)
    if rank == 0:
        from easgd_ext.progress import bar as tqdm

        rounds = tqdm(rounds, desc="step rounds", unit="round", file=sys.stderr)
    for _ in rounds:
        # Every rank draws the same order: the averaged variants' all-reduces pair up.
        for v in order.sample(variants, len(variants)):
            times[v.name].append(block_seconds(v, args.block, images, labels, amp))
    waited = {v.name: v.waited() for v in variants}
    for v in variants:  # flush what a delayed exchange left in flight: every rank alike
        if v.averager is not None:
            v.averager.flush()
    seconds = {name: statistics.median(ts) for name, ts in times.items()}
    numel = sum(p.numel() for p in variants[0].model.parameters())
    records = []
    for v in variants:
        q1, q3 = quartiles(times[v.name])
        s = seconds[v.name]
        finite = all(bool(torch.isfinite(p).all()) for p in v.model.parameters())
        window = args.tau  # every variant over the same number of steps
        blocked = v.blocked / v.calls * window if v.calls else 0.0
        waited_window = waited[v.name] / v.calls * window if v.calls else 0.0
        peak = max(v.bytes_per_step) if v.bytes_per_step else 0
        records.append({
            "name": v.name, "device": str(device), "numel": numel,
            "dtype": args.amp if amp is not None else "float32", "seconds": s, "GBps": None,
            "ratios": speedups(seconds, v.name, ["step", "torch_flat"]) if v.name != "step" else {},
            "q1_seconds": q1, "q3_seconds": q3, "iqr_seconds": q3 - q1,
            "spread": (q3 - q1) / s if s else 0.0,
            "overhead_pct": (s / seconds["step"] - 1) * 100, "tau": v.tau,
            "blocked_seconds_per_window": blocked, "window_steps": window,
            "waited_seconds_per_window": waited_window,
            "peak_bytes_per_step": peak,
            "model": args.model, "batch": args.batch, "image_size": args.image_size,
            "channels_last": args.channels_last and v.name == "step",
            "world_size": world, "rounds": args.rounds, "block": args.block,
            "parameters_finite": finite,
        })
    by_name = {r["name"]: r for r in records}
    stream, blocking = by_name["easgd_stream"], by_name["easgd"]
    if blocking["blocked_seconds_per_window"] > 0:
        stream["blocked_vs_easgd"] = (stream["blocked_seconds_per_window"]
                                      / blocking["blocked_seconds_per_window"])
    if blocking["peak_bytes_per_step"]:
        stream["peak_bytes_vs_easgd"] = stream["peak_bytes_per_step"] / blocking["peak_bytes_per_step"]
    # The blocking exchange per step (its window's blocked time over tau steps) against the
    # step alone: the share of a step the exchange costs where it is not hidden.
    blocking["exchange_share_of_step"] = (blocking["blocked_seconds_per_window"]
                                          / (by_name["step"]["seconds"] * args.tau))
    for r in records:
        if r["name"] != "step" and r["overhead_pct"] < 0:
            r.setdefault("warnings", []).append(
                f"negative overhead ({r['overhead_pct']:+.1f}%): noise larger than the effect")
    warn_if_noisy(records)
    return records


def rank_main(rank: int, world: int, store: str | None, out: str, args: argparse.Namespace) -> None:
    with rank_session(rank, world, store, args.device) as (device, works):
        records = measure(args, device, world, rank, works)
        works.run("drain", [torch.zeros(1, device=device)])  # our own collective last
        write_records_of_rank0(rank, out, records)


def print_table(records: list[dict]) -> None:
    r0 = records[0]
    window = r0["window_steps"]
    print(f"\n{r0['model']}, batch {r0['batch']}, {r0['image_size']}px, {r0['dtype']}, "
          f"world {r0['world_size']}, {r0['numel']:,} parameters; median of {r0['rounds']} rounds "
          f"of {r0['block']} steps per variant")
    print(f"{RATIO_LINE}; overhead: median step time / the step alone's - 1; blocked: seconds "
          f"the call after opt.step() blocks the loop over {window} steps, of which 'waited': "
          "waiting for collectives (the rest: kernels, launches); peak MB: most bytes one step "
          "sends per rank")
    print(f"{'variant':<14}{'tau':>4}{'step ms':>10}{'IQR ms':>9}{'overhead':>10}"
          f"{'blocked ms':>12}{'waited ms':>11}{'peak MB':>9}{'speedup over step':>19}{'over torch_flat':>17}")
    for r in records:
        tau = "-" if r["tau"] is None else str(r["tau"])
        note = "" if r["parameters_finite"] else "  (parameters became non-finite)"
        print(f"{r['name']:<14}{tau:>4}{r['seconds'] * 1e3:>10.2f}{r['iqr_seconds'] * 1e3:>9.2f}"
              f"{r['overhead_pct']:>+9.1f}%{r['blocked_seconds_per_window'] * 1e3:>12.2f}"
              f"{r['waited_seconds_per_window'] * 1e3:>11.2f}"
              f"{r['peak_bytes_per_step'] / 1e6:>9.2f}{ratio_cell(r['ratios'], 'vs_step', 19)}"
              f"{ratio_cell(r['ratios'], 'vs_torch_flat', 17)}{note}")
    by_name = {r["name"]: r for r in records}
    stream, blocking = by_name["easgd_stream"], by_name["easgd"]
    if "blocked_vs_easgd" in stream:
        print(f"\neasgd_stream (fragments={stream['tau']}, delay=1) against the blocking exchange "
              f"(easgd: {blocking['exchange_share_of_step']:.0%} of a step alone, per step): blocks the "
              f"loop {stream['blocked_vs_easgd']:.1%} as long, peak bytes per step "
              f"{stream.get('peak_bytes_vs_easgd', 0):.1%}, step time "
              f"{stream['seconds'] / blocking['seconds']:.2f}x; waiting for collectives "
              f"{stream['waited_seconds_per_window'] * 1e3:.2f} ms per window against "
              f"{blocking['waited_seconds_per_window'] * 1e3:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog("step"), description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when usable, else the CPU")
    parser.add_argument("--model", default=None,
                        help="a torchvision classification model (default resnet50 on CUDA, "
                             "resnet18 on CPU)")
    parser.add_argument("--batch", type=count, default=None, help="default 128 on CUDA, 8 on CPU")
    parser.add_argument("--image-size", type=count, default=224)
    parser.add_argument("--amp", choices=list(AMP), default=None,
                        help="autocast dtype (default bfloat16 on CUDA, none on CPU)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels_last input and weights (default on CUDA)")
    parser.add_argument("--rounds", type=count, default=None, help="default 20 on CUDA, 3 on CPU")
    parser.add_argument("--world", type=count, default=1,
                        help="ranks to spawn (ignored under torchrun); 2 or more puts real "
                             "collectives behind the exchanges (default %(default)s)")
    parser.add_argument("--tau", type=count, default=4,
                        help="easgd's period and easgd_stream's fragments (default %(default)s)")
    parser.add_argument("--block", type=count, default=8,
                        help="steps per variant per round (a multiple of --tau; default 8)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD, momentum 0.9, Nesterov")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the records (a JSON list) here")
    args = parser.parse_args(argv)
    cuda_ok = torch.cuda.is_available() and easgd_ext.build_info()["cuda"]
    if args.device == "auto":
        args.device = "cuda" if cuda_ok else "cpu"
    if args.device == "cuda" and not cuda_ok:
        parser.error("--device cuda needs a GPU and easgd_ext built with CUDA")
    if args.block % args.tau:
        parser.error(f"--block {args.block}: give a multiple of --tau {args.tau} (every variant "
                     "must exchange equally often in every block)")
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    import torchvision

    if not callable(getattr(torchvision.models, args.model, None)):
        parser.error(f"--model {args.model!r} is not a torchvision model")

    launched = launcher_rank_world()
    records = run_workers(rank_main, launched[1] if launched else args.world, args)
    if records is None:  # a launched rank other than 0
        return 0
    print(f"easgd_ext {easgd_ext.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    print_table(records)
    write_records(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
