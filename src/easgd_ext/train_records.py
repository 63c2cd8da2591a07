"""The main job's records and progress, shared by :mod:`easgd_ext.train` and
:mod:`easgd_ext.train_fsdp` (which both import this module, not each other): one run's curve of
the center's test error against time and bytes, the progress bar, the data split and the step
count."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from . import data

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

    def add(self, step: int, seconds: float, sent: int, exchanges: int, error: float,
            world: int) -> None:
        """One evaluation point; ``sent`` and ``exchanges`` are one rank's, counted for all
        ``world`` workers (every worker takes the same steps and exchanges)."""
        self.steps.append(step)
        self.seconds.append(seconds)
        self.bytes_sent.append(sent * world)
        self.total_exchanges.append(exchanges * world)
        self.test_error.append(error)

    def evaluate(self, step: int, seconds: float, averager: Any, model: torch.nn.Module,
                 split: data.Split, world: int, plain: tuple[int, int], bar: Any,
                 loss: torch.Tensor) -> None:
        """One evaluation point: the center's test error where there is an averager (on every
        rank: a sharded model's forward is collective) and its counters, else the model's and
        ``plain`` (bytes sent, exchanges) of the run without one; shown on ``bar`` if any."""
        if averager is not None:
            with averager.center_parameters():
                error = data.test_error(model, split.test_x, split.test_y)
            sent, exchanges = averager.stats.bytes_sent, averager.stats.exchanges
        else:
            error = data.test_error(model, split.test_x, split.test_y)
            sent, exchanges = plain
        self.add(step, seconds, sent, exchanges, error, world)
        if bar is not None:
            bar.set_postfix(test_error=f"{error:.3f}", loss=f"{loss.item():.3f}")

    def take_counters(self, averager: Any) -> None:
        """The averager's final counters (communication time, exchanges applied and skipped)."""
        stats = averager.stats
        self.comm_seconds, self.exchanges = stats.comm_seconds, stats.exchanges
        self.skipped_exchanges = stats.skipped_exchanges


def steps_bar(algo: str, steps: int, shown: bool = True) -> Any:
    """The progress of one algorithm's training steps (a terminal's bar, or lines in a log);
    ``None`` where not shown (ranks other than 0)."""
    if not shown:
        return None
    from .progress import bar

    return bar(total=steps, desc=f"{algo:>9}", unit="step", file=sys.stderr, leave=True)


def load_split(args: argparse.Namespace) -> data.Split:
    return data.digits(args.seed) if args.dataset == "digits" else data.cifar10(args.data_root)


def steps_for(args: argparse.Namespace, train_size: int, world: int) -> int:
    if args.steps is not None:
        return args.steps
    if args.epochs is not None:
        return max(1, round(args.epochs * train_size / (args.batch * world)))
    return DEFAULT_STEPS
