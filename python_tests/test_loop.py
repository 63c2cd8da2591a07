"""The tools' one training loop (easgd_ext.loop): when it evaluates, that the exchanges in
flight land before the last point, that a caller stops a diverged run, and what a worker
must be given."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from easgd_ext import loop


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def _batches(worker: int) -> loop.Batches:
    gen = torch.Generator().manual_seed(10 + worker)
    return lambda: (torch.randn(8, 6, generator=gen), torch.randint(0, 2, (8,), generator=gen))


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _job(averager: str | None, evaluate=None, **settings) -> loop.SimulatedWorkers:
    torch.manual_seed(0)
    held_out = _batches(99)()
    evaluate = evaluate or (lambda model, final: _loss(model, held_out).item())
    return loop.SimulatedWorkers(_model, 2, averager, lambda p: torch.optim.SGD(p, lr=0.1),
                                 [_batches(k) for k in range(2)], _loss, evaluate,
                                 torch.device("cpu"), **settings)


def test_points_every_eval_steps_and_at_the_end_with_the_fragments_in_flight_landed():
    job = _job("easgd", tau=4, fragments=2, delay=1)
    points: list[loop.Point] = []
    try:
        seconds = loop.run(job, 10, 4, points.append)
    finally:
        job.close()
    assert [p.step for p in points] == [4, 8, 10]
    assert seconds > 0 and all(a.seconds <= b.seconds for a, b in zip(points, points[1:]))
    # two fragments, each every 4 steps at its own phase (sends at 2, 4, 6, 8, 10; each lands a
    # step later): the last send lands by the finish, before the last point is taken
    assert [p.exchanges for p in points] == [1, 3, 5]
    assert all(p.bytes_sent > 0 and math.isfinite(p.metric) and p.loss is not None for p in points)
    assert job.totals().exchanges == 5 and job.totals().skipped == 0


def test_sync_sgd_counts_an_all_reduce_a_step():
    job = _job(None)
    points: list[loop.Point] = []
    loop.run(job, 6, 3, points.append)
    numel = sum(p.numel() for p in _model().parameters())
    assert [(p.step, p.exchanges, p.bytes_sent) for p in points] == [(3, 3, 3 * 4 * numel), (6, 6, 6 * 4 * numel)]
    # every worker took the same mean gradient: the replicas stay equal
    assert all(torch.equal(a, b) for a, b in zip(*(m.parameters() for m in job.models)))


def test_a_caller_stops_a_diverged_run_at_its_point():
    calls = []

    def diverges(model, final):
        calls.append(final)
        return math.nan if len(calls) == 2 else 1.0

    job = _job("average", evaluate=diverges, tau=2)
    points: list[loop.Point] = []
    try:
        loop.run(job, 20, 2, lambda p: points.append(p) or math.isfinite(p.metric))
    finally:
        job.close()
    assert [p.step for p in points] == [2, 4] and calls == [False, False]


def test_a_worker_exchanges_through_an_averager_or_its_gradients():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="through an averager or its gradients: give one"):
        loop.OneWorker(model, opt, _batches(0), _loss, lambda m, f: 0.0)
