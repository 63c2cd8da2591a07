"""The one training loop of the tools: ``train`` (processes, ``--fsdp`` and ``--simulate``) and
the study all run :func:`run` over a :class:`Job`, which holds what differs between them.

A job is either :class:`OneWorker` (this process's model, its optimizer and its averager, or the
per-step gradient exchange of the synchronous-SGD baseline) or :class:`SimulatedWorkers` (every
worker of the job in this process, joined by :mod:`easgd_ext.simulate`). The loop takes the local
steps, times them (evaluation excluded), finishes the exchanges in flight after the last step,
and hands a :class:`Point` to its caller every ``eval_every`` steps and at the end.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist

from .stats import ring_allreduce_bytes

Batches = Callable[[], tuple[torch.Tensor, torch.Tensor]]
Loss = Callable[[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]
Evaluate = Callable[[torch.nn.Module, bool], float]  # (model, final split?) -> lower is better


@dataclass(frozen=True)
class Point:
    """One evaluation: the metric of the center (of the model, for a job without one) after
    ``step`` local steps, and one worker's counters then."""
    step: int
    seconds: float     # training time so far, the evaluations excluded
    metric: float
    bytes_sent: int    # by one worker
    exchanges: int     # one worker's applied exchanges (sync SGD: its gradient all-reduces)
    skipped: int       # one worker's exchanges skipped (a non-finite contribution)
    loss: float | None  # the last minibatch's, of one worker


@dataclass(frozen=True)
class Totals:
    """One worker's counters at the end of a run."""
    comm_seconds: float
    exchanges: int
    skipped: int


class Job(Protocol):
    """The workers a process trains, as :func:`run` drives them."""

    def local_step(self) -> torch.Tensor:
        """Every worker's forward and backward on its next minibatch; one worker's loss."""

    def apply(self) -> None:
        """Every worker's optimizer step and exchange (or the gradient exchange first)."""

    def synchronize(self) -> None:
        """Waits for the device, so the step's time is the device's too."""

    def finish(self) -> None:
        """After the last step: the exchanges in flight land in the center."""

    def evaluate(self, final: bool) -> float:
        """The center's metric (the model's where there is no center)."""

    def counters(self) -> tuple[int, int, int]:
        """One worker's (bytes sent, exchanges applied, exchanges skipped) so far."""

    def totals(self) -> Totals:
        """One worker's counters at the end."""


def run(job: Job, steps: int, eval_every: int, on_point: Callable[[Point], bool | None],
        bar: Any = None) -> float:
    """``steps`` local steps of ``job``; ``on_point`` gets every ``eval_every``-th step's point
    and the last one, and stops the run by returning ``False`` (a diverged run). ``bar``, if
    any, is a progress bar shown the metric and advanced each step. Returns the training
    seconds."""
    elapsed = 0.0
    for step in range(1, steps + 1):
        start = time.perf_counter()
        loss = job.local_step()
        job.apply()
        if step == steps:
            job.finish()
        job.synchronize()
        elapsed += time.perf_counter() - start
        if step % eval_every == 0 or step == steps:
            metric = job.evaluate(step == steps)
            shown = loss.item() if loss is not None else None
            point = Point(step, elapsed, metric, *job.counters(), shown)
            if bar is not None:
                bar.set_postfix(test_error=f"{metric:.3f}",
                                **({"loss": f"{shown:.3f}"} if shown is not None else {}))
            if on_point(point) is False:
                break
        if bar is not None:
            bar.update(1)
    return elapsed


class GradientExchange(Protocol):
    """The synchronous-SGD baseline's per-step exchange of the gradients, with its counters."""
    bytes_sent: int
    exchanges: int
    comm_seconds: float

    def __call__(self) -> None:
        """Exchanges this step's gradients (before the optimizer step)."""


class OneWorker:
    """This process's worker: ``model`` trained by ``optimizer`` on ``batches()`` under
    ``loss``, and ``averager``'s exchanges; without an averager, ``gradients`` exchanges the
    gradients every step (synchronous SGD)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Batches,
                 loss: Loss, evaluate: Evaluate, averager: Any = None,
                 gradients: GradientExchange | None = None,
                 device: torch.device | None = None) -> None:
        if (averager is None) == (gradients is None):
            raise ValueError("a worker exchanges through an averager or its gradients: give one")
        self.model, self.optimizer, self.averager, self.gradients = model, optimizer, averager, gradients
        self._batches, self._loss, self._evaluate = batches, loss, evaluate
        self._device = device

    def local_step(self) -> torch.Tensor:
        loss = self._loss(self.model, self._batches())
        loss.backward()
        return loss

    def apply(self) -> None:
        if self.gradients is not None:
            self.gradients()
        self.optimizer.step()
        self.optimizer.zero_grad()
        if self.averager is not None:
            self.averager.step()

    def synchronize(self) -> None:
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def finish(self) -> None:
        if self.averager is None:
            return
        if self.averager.mode == "async":
            self.averager.close()
            dist.barrier()  # the final center: after every worker's last exchange
        else:
            self.averager.flush()  # fragments still in flight (delay) count in the final center

    def evaluate(self, final: bool) -> float:
        if self.averager is None:
            return self._evaluate(self.model, final)
        with self.averager.center_parameters():  # on every rank: a sharded forward is collective
            return self._evaluate(self.model, final)

    def counters(self) -> tuple[int, int, int]:
        if self.averager is None:
            return self.gradients.bytes_sent, self.gradients.exchanges, 0
        stats = self.averager.stats
        return stats.bytes_sent, stats.exchanges, stats.skipped_exchanges

    def totals(self) -> Totals:
        _, exchanges, skipped = self.counters()
        exchanger = self.gradients if self.averager is None else self.averager.stats
        return Totals(exchanger.comm_seconds, exchanges, skipped)


class SimulatedWorkers:
    """Every worker of the job in this process: ``averager`` (a method's name, see
    :class:`easgd_ext.simulate.Workers`) over an in-memory group, or, with ``averager=None``,
    synchronous SGD (the gradients averaged in memory every step, counted as a ring all-reduce
    of float32 gradients). ``batches[k]`` is worker k's stream."""

    def __init__(self, make_model: Callable[[], torch.nn.Module], workers: int, averager: str | None,
                 make_optimizer: Callable[[Any], torch.optim.Optimizer], batches: list[Batches],
                 loss: Loss, evaluate: Evaluate, device: torch.device, **averager_settings: Any) -> None:
        from . import simulate

        self.sim: Any = None
        if averager is None:  # every worker starts alike, as the averagers' broadcast makes them
            first = make_model().to(device)
            self.models = [first] + [copy.deepcopy(first) for _ in range(workers - 1)]
            self.optimizers = [make_optimizer(m.parameters()) for m in self.models]
            numel = sum(p.numel() for p in first.parameters())
            self._per_step = ring_allreduce_bytes(4 * numel, workers)
        else:
            self.sim = simulate.Workers(make_model, workers, averager=averager, device=device,
                                        make_optimizer=make_optimizer, **averager_settings)
            self.models, self.optimizers = self.sim.models, self.sim.optimizers
        self._batches, self._loss, self._evaluate = batches, loss, evaluate
        self._device = device
        self._steps = 0
        self._comm_seconds = 0.0  # the exchange's time, the optimizers' steps included

    def local_step(self) -> torch.Tensor:
        def local(k: int) -> torch.Tensor:
            loss = self._loss(self.models[k], self._batches[k]())
            loss.backward()
            return loss

        if self.sim is None:
            return [local(k) for k in range(len(self.models))][0]
        return self.sim.each(local)[0]  # the workers' steps on the CPUs' threads

    def apply(self) -> None:
        start = time.perf_counter()
        self._steps += 1
        if self.sim is None:
            with torch.no_grad():
                for params in zip(*(m.parameters() for m in self.models)):
                    mean = torch.stack([p.grad for p in params]).mean(0)
                    for p in params:
                        p.grad.copy_(mean)
            for opt in self.optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            self.sim.optimizer_step()
        self._comm_seconds += time.perf_counter() - start

    def synchronize(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def finish(self) -> None:
        if self.sim is not None:
            self.sim.flush()

    def evaluate(self, final: bool) -> float:
        if self.sim is None:
            return self._evaluate(self.models[0], final)
        with self.sim.center_parameters() as center:
            return self._evaluate(center, final)

    def counters(self) -> tuple[int, int, int]:
        if self.sim is None:
            return self._steps * self._per_step, self._steps, 0
        stats = self.sim.averagers[0].stats
        return stats.bytes_sent, stats.exchanges, stats.skipped_exchanges

    def totals(self) -> Totals:
        _, exchanges, skipped = self.counters()
        return Totals(self._comm_seconds, exchanges, skipped)

    def close(self) -> None:
        if self.sim is not None:
            self.sim.close()
