"""The main job's records and progress, shared by :mod:`easgd_ext.train` and
:mod:`easgd_ext.train_fsdp` (which both import this module, not each other): one run's curve of
the center's test error against time and bytes, the progress bar, the data split, the step
count and the loss of the main job's models."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import data, loop

DEFAULT_STEPS = 1000


def say(message: str) -> None:
    """A progress line on stderr (stdout is kept for the table)."""
    print(message, file=sys.stderr, flush=True)


@dataclass
class Result:
    """One algorithm's run, as rank 0 saw it."""
    algo: str
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)      # training wall time, eval excluded
    bytes_sent: list[int] = field(default_factory=list)     # all workers together
    total_exchanges: list[int] = field(default_factory=list)  # all workers together
    test_error: list[float] = field(default_factory=list)   # of the center
    comm_seconds: float = 0.0
    exchanges: int = 0
    skipped_exchanges: int = 0

    def record(self, point: loop.Point, world: int) -> None:
        """One evaluation point (a :class:`easgd_ext.loop.Point`): its counters are one
        worker's, counted for all ``world`` workers (every worker takes the same steps and
        exchanges)."""
        self.steps.append(point.step)
        self.seconds.append(point.seconds)
        self.bytes_sent.append(point.bytes_sent * world)
        self.total_exchanges.append(point.exchanges * world)
        self.test_error.append(point.metric)

    def take(self, totals: loop.Totals) -> None:
        """One worker's final counters (a :class:`easgd_ext.loop.Totals`)."""
        self.comm_seconds, self.exchanges = totals.comm_seconds, totals.exchanges
        self.skipped_exchanges = totals.skipped


def steps_bar(algo: str, steps: int, shown: bool = True) -> Any:
    """The progress of one algorithm's training steps (a terminal's bar, or lines in a log);
    ``None`` where not shown (ranks other than 0)."""
    if not shown:
        return None
    from .progress import bar

    return bar(total=steps, desc=f"{algo:>9}", unit="step", file=sys.stderr, leave=True)


def cross_entropy(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The main job's loss of ``model`` on a minibatch (moved to the model's device)."""
    device = next(model.parameters()).device
    x, y = batch
    return F.cross_entropy(model(x.to(device)), y.to(device))


def test_error_of(split: data.Split) -> loop.Evaluate:
    """The main job's metric: a model's error on the split's test set."""
    return lambda model, final: data.test_error(model, split.test_x, split.test_y)


def run_curve(algo: str, job: loop.Job, eval_every: int, world: int, steps: int,
              shown: bool = True) -> Result:
    """``job`` through the training loop: the curve of ``algo``'s run (with a progress bar where
    ``shown``) and its final counters."""
    result = Result(algo)
    bar = steps_bar(algo, steps, shown=shown)
    try:
        loop.run(job, steps, eval_every, lambda point: result.record(point, world), bar)
    finally:
        if bar is not None:
            bar.close()
    result.take(job.totals())
    return result


def minibatches(split: data.Split, args: argparse.Namespace, worker: int) -> data.Stream:
    """Worker ``worker``'s own shuffled stream of the training set (the same in every tool)."""
    return data.Stream(split.train_x, split.train_y, args.batch, seed=args.seed * 1000 + worker + 1)


def load_split(args: argparse.Namespace) -> data.Split:
    return data.digits(args.seed) if args.dataset == "digits" else data.cifar10(args.data_root)


def steps_for(args: argparse.Namespace, train_size: int, world: int) -> int:
    if args.steps is not None:
        return args.steps
    if args.epochs is not None:
        return max(1, round(args.epochs * train_size / (args.batch * world)))
    return DEFAULT_STEPS
