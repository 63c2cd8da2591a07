"""p workers simulated in one process on one device: the same averagers, algorithms and kernels
as a distributed run, with the collectives done in memory.

    sim = easgd_ext.simulate.Workers(make_model, workers=8, averager="easgd", tau=16)
    for step in range(steps):
        for k, model in enumerate(sim.models):
            loss_fn(model, next(data[k])).backward()
        sim.optimizer_step()          # every worker's optimizer, then its averager's step()
    with sim.center_parameters():     # worker 0's model holds the center
        evaluate(sim.models[0])

Each worker is a model replica with its own optimizer and its own averager, built exactly as
under ``torchrun`` but on a rank of an in-process group: the averagers run in one thread per
worker, and their collectives meet in memory (a sum in rank order: equal to Gloo's bit for bit
for two workers, to float32 rounding for more, where Gloo's reduction order differs). Useful
for trying settings on one GPU, and for studies on a small machine: no process start-up, no
sockets, one copy of the data.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ._dist import Comm
from .averager import Averager
from .methods import METHODS, method


class Rendezvous:
    """Where the p simulated ranks' collectives meet: the n-th collective of every rank is
    combined once all p have posted it (each rank issues them in the same order, as with a real
    process group)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self._cond = threading.Condition()
        self._posted: dict[int, dict[int, Any]] = {}
        self._results: dict[int, Any] = {}
        self._taken: dict[int, int] = {}

    def meet(self, seq: int, rank: int, value: Any, combine: Callable[[list[Any]], Any],
             timeout: float = 600.0) -> Any:
        with self._cond:
            self._posted.setdefault(seq, {})[rank] = value
            if len(self._posted[seq]) == self.world:
                values = [self._posted[seq][r] for r in range(self.world)]
                self._results[seq] = combine(values)
                self._cond.notify_all()
            elif not self._cond.wait_for(lambda: seq in self._results, timeout):
                raise TimeoutError(f"simulated rank {rank} waited {timeout:.0f} s for collective "
                                   f"{seq}: the workers do not call step()/exchange() alike")
            result = self._results[seq]
            self._taken[seq] = self._taken.get(seq, 0) + 1
            if self._taken[seq] == self.world:  # everybody has it: forget it
                del self._results[seq], self._posted[seq], self._taken[seq]
            return result


class _Done:
    """A finished collective's work: waiting costs nothing."""

    def wait(self, *args: Any) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


@dataclass(frozen=True)
class SimulatedComm(Comm):
    """One rank of an in-process group (``group`` is its :class:`Rendezvous`)."""
    counter: list = None  # type: ignore[assignment]  # this rank's collectives so far

    def _meet(self, value: Any, combine: Callable[[list[Any]], Any]) -> Any:
        seq = self.counter[0]
        self.counter[0] += 1
        return self.group.meet(seq, self.rank, value, combine)

    def global_rank(self, group_rank: int) -> int:
        return group_rank

    def backend(self) -> str:
        return "simulated"

    def backend_for(self, device: torch.device) -> str:
        return "simulated"

    def all_reduce(self, t: torch.Tensor, async_op: bool = False) -> Any:
        total = self._meet(t, _sum_in_rank_order)
        t.copy_(total)
        return _Done() if async_op else None

    def all_to_all_single(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False) -> Any:
        sent = self._meet(inp, list)
        size = inp.numel() // self.world_size
        for w, tensor in enumerate(sent):
            out[w * size:(w + 1) * size].copy_(tensor[self.rank * size:(self.rank + 1) * size])
        return _Done() if async_op else None

    def all_gather_single(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False) -> Any:
        parts = self._meet(inp, list)
        torch.cat(parts, out=out)
        return _Done() if async_op else None

    def broadcast(self, t: torch.Tensor, src: int = 0) -> None:
        parts = self._meet(t, list)
        if self.rank != src:
            t.copy_(parts[src])

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self._meet(obj, list)

    def broadcast_object(self, obj: Any) -> Any:
        return self._meet(obj, list)[0]


def _sum_in_rank_order(tensors: list[torch.Tensor]) -> torch.Tensor:
    total = tensors[0].clone()
    for t in tensors[1:]:
        total += t
    return total


def simulated_group(workers: int) -> list[SimulatedComm]:
    """The ranks of an in-process group of ``workers``: pass one as ``process_group=`` to an
    averager built in that worker's thread."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    meeting = Rendezvous(workers)
    return [SimulatedComm(meeting, rank, workers, [0]) for rank in range(workers)]


def _averager_named(name: str) -> Callable[..., Averager]:
    """The averager of a method of the table (:mod:`easgd_ext.methods`)."""
    try:
        chosen = method(name)
    except ValueError:
        chosen = None
    if chosen is None or chosen.averager is None:
        offered = [m for m, entry in METHODS.items() if entry.averager is not None]
        raise ValueError(f"averager must be a method with an averager ({', '.join(offered)}; "
                         f"'average' is local-sgd) or a callable, got {name!r}")
    return chosen.build


class Workers:
    """``workers`` replicas of ``make_model()`` on ``device``, each with its optimizer
    (``make_optimizer(params)``, default SGD lr 0.05) and its averager (``averager``: a method
    of :data:`easgd_ext.methods.METHODS` with an averager, "easgd", "downpour", "average",
    "diloco", ..., or a callable ``(params, **kwargs) -> Averager``; a name picks the averager
    and its fixed settings, not the optimizer: "eamsgd" needs its Nesterov ``make_optimizer``), joined by
    an in-process group. ``averager_kwargs`` go to every averager (``tau``, ``beta``,
    ``comm_dtype``, ``fragments``, ...). Replica k starts from replica 0's weights, as the
    averagers broadcast them."""

    def __init__(self, make_model: Callable[[], torch.nn.Module], workers: int,
                 averager: str | Callable[..., Averager] = "easgd",
                 make_optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
                 device: str | torch.device = "cpu", **averager_kwargs: Any) -> None:
        self.comms = simulated_group(workers)
        self.device = torch.device(device)
        build = _averager_named(averager) if isinstance(averager, str) else averager
        make_optimizer = make_optimizer or (lambda params: torch.optim.SGD(params, lr=0.05))
        self.models = [make_model().to(self.device) for _ in range(workers)]
        self.optimizers = [make_optimizer(m.parameters()) for m in self.models]
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="easgd-sim")
        self._local: ThreadPoolExecutor | None = None
        self.averagers: list[Averager] = self._everywhere(
            lambda k: build(self.models[k].parameters(), process_group=self.comms[k], **averager_kwargs))

    def _everywhere(self, fn: Callable[[int], Any]) -> list[Any]:
        """``fn(k)`` for every worker at once (their collectives meet each other)."""
        device = self.device

        def run(k: int) -> Any:
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                return fn(k)

        return list(self._pool.map(run, range(len(self.models))))

    @property
    def workers(self) -> int:
        return len(self.models)

    def each(self, fn: Callable[[int], Any]) -> list[Any]:
        """``fn(k)`` for every worker, on as many threads as there are CPUs (a worker's local
        step: its forward, backward and optimizer touch its replica alone, and torch's ops run
        without the GIL); returns the results in worker order."""
        if self._local is None:
            import os

            self._local = ThreadPoolExecutor(max_workers=max(1, min(self.workers, os.cpu_count() or 1)),
                                             thread_name_prefix="easgd-sim-local")
        return list(self._local.map(fn, range(self.workers)))

    def optimizer_step(self) -> None:
        """Every worker's ``optimizer.step()`` and ``zero_grad()``, then every averager's
        ``step()`` (together: an exchange is collective)."""
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.step()

    def step(self) -> list[bool]:
        """Every averager's ``step()`` (after the workers' own optimizer steps)."""
        return self._everywhere(lambda k: self.averagers[k].step())

    def exchange(self) -> None:
        self._everywhere(lambda k: self.averagers[k].exchange())

    def flush(self) -> None:
        self._everywhere(lambda k: self.averagers[k].flush())

    @contextlib.contextmanager
    def center_parameters(self, worker: int = 0) -> Iterator[torch.nn.Module]:
        """Worker ``worker``'s model holds the center within the block (every replica of the
        center is the same); yields that model."""
        with self.averagers[worker].center_parameters():
            yield self.models[worker]

    def close(self) -> None:
        self._everywhere(lambda k: self.averagers[k].close())
        self._pool.shutdown()
        if self._local is not None:
            self._local.shutdown()

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
