"""p workers simulated in one process (easgd_ext.simulate) against the same run on p real Gloo
ranks: bit for bit for two workers, to float32 rounding for more (the order of the sum
differs), for each averager, the 8-bit wire and the streamed exchange included."""

from __future__ import annotations

import pytest
import torch

import easgd_ext
from dist_harness import run_ranks, values
from easgd_ext import simulate

SHAPES = [(300,), (17, 33), (2000,)]
MAKERS = {"easgd": easgd_ext.ElasticAverager, "downpour": easgd_ext.DownpourAverager,
          "average": easgd_ext.PeriodicAverager, "diloco": easgd_ext.DiLoCoAverager}


class Params(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES])


def local_step(params, rank: int, step: int) -> None:
    g = torch.Generator().manual_seed(1000 * step + rank)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g), alpha=0.05)


def distributed(rank: int, world: int, algo: str, kwargs: dict, steps: int) -> dict:
    model = Params()
    avg = MAKERS[algo](model.parameters(), **kwargs)
    for t in range(1, steps + 1):
        local_step(list(model.parameters()), rank, t)
        avg.step()
    return {"x": avg.flat_parameters()[0].clone(),
            "center": [c.clone() for c in avg.center_state()], "stats": avg.stats}


def simulated(world: int, algo: str, kwargs: dict, steps: int) -> list[dict]:
    with simulate.Workers(Params, world, averager=algo, **kwargs) as sim:
        for t in range(1, steps + 1):
            for rank, model in enumerate(sim.models):
                local_step(list(model.parameters()), rank, t)
            sim.step()
        return [{"x": a.flat_parameters()[0].clone(), "center": [c.clone() for c in a.center_state()],
                 "stats": a.stats} for a in sim.averagers]


CASES = [("easgd", {"tau": 3}), ("easgd", {"tau": 4, "fragments": 2, "delay": 1, "comm_dtype": "int8"}),
         ("downpour", {"tau": 2}), ("average", {"tau": 3}), ("diloco", {"tau": 3})]


@pytest.mark.parametrize("algo,kwargs", CASES)
def test_two_simulated_workers_equal_two_gloo_ranks_bit_for_bit(algo, kwargs):
    real = values(run_ranks(2, distributed, algo, kwargs, 17))
    sim = simulated(2, algo, kwargs, 17)
    for r, s in zip(real, sim):
        assert torch.equal(r["x"], s["x"])
        assert all(torch.equal(a, b) for a, b in zip(r["center"], s["center"]))
        assert r["stats"].exchanges == s["stats"].exchanges
        assert r["stats"].bytes_sent == s["stats"].bytes_sent


@pytest.mark.parametrize("algo,kwargs", [CASES[0], CASES[4]])
def test_more_simulated_workers_equal_gloo_to_float32_rounding(algo, kwargs):
    real = values(run_ranks(3, distributed, algo, kwargs, 17))
    sim = simulated(3, algo, kwargs, 17)
    for r, s in zip(real, sim):
        assert torch.allclose(r["x"], s["x"], rtol=1e-5, atol=1e-6)
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(r["center"], s["center"]))


def test_simulated_workers_train_a_real_model_and_start_from_worker_zero():
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    with simulate.Workers(make, 4, averager="easgd", tau=2,
                          make_optimizer=lambda p: torch.optim.SGD(p, lr=0.1)) as sim:
        first = [m[0].weight.detach().clone() for m in sim.models]
        assert all(torch.equal(first[0], w) for w in first)  # broadcast from worker 0
        g = torch.Generator().manual_seed(1)
        x = torch.randn(256, 8, generator=g)
        y = x.sum(1, keepdim=True)
        losses = []
        for step in range(60):
            for k, model in enumerate(sim.models):
                idx = torch.randint(0, 256, (32,), generator=g)
                loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
                loss.backward()
            sim.optimizer_step()
            with sim.center_parameters() as center_model, torch.no_grad():
                losses.append(float(torch.nn.functional.mse_loss(center_model(x), y)))
        assert losses[-1] < 0.5 * losses[0]
        assert all(a.stats.exchanges == 30 for a in sim.averagers)


def test_a_worker_that_does_not_step_is_a_timeout_not_a_hang():
    comms = simulate.simulated_group(2)
    meeting = comms[0].group
    with pytest.raises(TimeoutError, match="simulated rank 0 waited"):
        meeting.meet(0, 0, torch.zeros(1), list, timeout=0.2)
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        simulate.simulated_group(0)
