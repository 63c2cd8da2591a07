"""The elastic family with an outer optimizer on the center: its two corners held exactly. No
outer momentum is today's EASGD, bit for bit; a full pull to the new center with an outer
Nesterov step is DiLoCo, against a float64 implementation of Douillard et al.'s algorithm written
here. Real Gloo ranks; the fused kernel against its torch-level path too."""

from __future__ import annotations

import os

import pytest
import torch

import easgd_ext
from dist_harness import run_ranks, values
from easgd_ext.settings import KERNELS_ENV

SHAPES = [(257,), (9, 31), (1000,)]
TAU = 3


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def local_step(params, rank: int, step: int) -> None:
    g = torch.Generator().manual_seed(7919 * step + rank)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g), alpha=0.05)


def run(rank: int, world: int, make: str, kwargs: dict, steps: int, path: str = "fused") -> dict:
    os.environ[KERNELS_ENV] = path
    params = make_params()
    cls = {"elastic": easgd_ext.ElasticAverager, "diloco": easgd_ext.DiLoCoAverager}[make]
    avg = cls(params, tau=TAU, **kwargs)
    for t in range(1, steps + 1):
        local_step(params, rank, t)
        avg.step()
    out = {"x": avg.flat_parameters()[0].clone(), "center": avg.center_state()[0].clone(),
           "state": avg.state_dict(),
           "plans": [(p.offset, [(q.start, q.end) for q in p.pieces]) for p in avg._center.plans]}
    os.environ.pop(KERNELS_ENV)
    return out


def both(rank: int, world: int, first: tuple, second: tuple) -> tuple[dict, dict]:
    return run(rank, world, *first), run(rank, world, *second)


def test_no_outer_momentum_is_easgd_bit_for_bit():
    """The outer kernel with lr 1 and momentum 0 (Nesterov on, to force it) stores what EASGD's
    own kernel stores."""
    plain = ("elastic", {}, 20)
    outer = ("elastic", {"outer_lr": 1.0, "outer_momentum": 0.0, "nesterov": True}, 20)
    for a, b in values(run_ranks(3, both, plain, outer)):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["center"], b["center"])
        assert b["state"]["settings"]["nesterov"] is True  # it did run the outer rule
        assert "momentum" in b["state"]["buffers"]


def noise(rank: int, t: int) -> torch.Tensor:
    """Worker ``rank``'s local step ``t`` in float64, in the averager's flat layout."""
    from easgd_ext.flat_params import flatten

    zeros = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    flat = flatten(zeros)[0].flat
    local_step(zeros, rank, t)
    return flat.double()


def flat_start() -> torch.Tensor:
    from easgd_ext.flat_params import flatten

    return flatten(make_params())[0].flat.double()


def diloco_reference(world: int, steps: int, lr: float, mu: float, nesterov: bool):
    """Douillard et al. (2023), Algorithm 1, in float64: each worker starts from the center
    theta, takes its inner steps; every tau steps delta = theta - mean_i theta_i, the outer
    optimizer (SGD with Nesterov momentum) steps theta with delta as its gradient, and every
    worker restarts from the new theta."""
    theta = flat_start()
    workers = [theta.clone() for _ in range(world)]
    velocity = torch.zeros_like(theta)
    for t in range(1, steps + 1):
        for rank in range(world):
            workers[rank] += noise(rank, t)
        if t % TAU == 0:
            delta = theta - sum(workers) / world
            velocity = mu * velocity + delta
            theta = theta - lr * (delta + mu * velocity if nesterov else velocity)
            workers = [theta.clone() for _ in range(world)]
    return workers, theta


@pytest.mark.parametrize("nesterov", [True, False])
def test_diloco_matches_a_float64_reference_to_float32_rounding(nesterov):
    world, steps, lr, mu = 3, 19, 0.7, 0.9
    outs = values(run_ranks(world, run, "diloco",
                            {"outer_lr": lr, "outer_momentum": mu, "nesterov": nesterov}, steps))
    workers, theta = diloco_reference(world, steps, lr, mu, nesterov)
    for rank, out in enumerate(outs):
        assert torch.equal(out["center"], outs[0]["center"])
        scale = theta.abs() + 1
        assert ((out["center"].double() - theta).abs() <= 2e-5 * scale).all()
        assert ((out["x"].double() - workers[rank]).abs() <= 2e-5 * scale).all()


def streaming_diloco_reference(world: int, steps: int, plans: list, delay: int, mix: float,
                               lr: float, mu: float):
    """Streaming DiLoCo (Douillard et al., 2025) in float64, as this package defines its merge:
    fragment j is sent at its phase t (each worker's values then, ``sent``); at t + delay the
    pseudo-gradient ``theta - mean_i sent_i`` takes an outer Nesterov step, and each worker
    becomes ``mix x + (1 - mix) (theta_new + x - sent)``: the new center plus the progress it
    made since its send, mixed with itself."""
    theta = flat_start()
    workers = [theta.clone() for _ in range(world)]
    velocity = torch.zeros_like(theta)
    pending: list = []

    def complete(t: int) -> None:
        for item in [p for p in pending if p[0] <= t]:
            _, ranges, sent = item
            for k, (a, b) in enumerate(ranges):
                delta = theta[a:b] - sum(sent[r][k] for r in range(world)) / world
                velocity[a:b] = mu * velocity[a:b] + delta
                new = theta[a:b] - lr * (delta + mu * velocity[a:b])
                for r in range(world):
                    x = workers[r][a:b]
                    workers[r][a:b] = mix * x + (1 - mix) * (new + x - sent[r][k])
                theta[a:b] = new
            pending.remove(item)

    for t in range(1, steps + 1):
        for rank in range(world):
            workers[rank] += noise(rank, t)
        complete(t)
        for offset, ranges in plans:
            if (t - offset) % TAU == 0:
                pending.append((t + delay, ranges, [[workers[r][a:b].clone() for a, b in ranges]
                                                    for r in range(world)]))
        complete(t)
    return workers, theta


@pytest.mark.parametrize("fragments,delay,mix", [(1, 0, 0.5), (3, 1, 0.0), (3, 2, 0.5), (1, 2, 0.0)])
def test_streaming_diloco_matches_a_float64_reference(fragments, delay, mix):
    world, steps, lr, mu = 3, 20, 0.7, 0.9
    kwargs = {"fragments": fragments, "delay": delay, "fragment_update_alpha": mix}
    outs = values(run_ranks(world, run, "diloco", kwargs, steps))
    workers, theta = streaming_diloco_reference(world, steps, outs[0]["plans"], delay, mix, lr, mu)
    for rank, out in enumerate(outs):
        assert torch.equal(out["center"], outs[0]["center"])
        scale = theta.abs() + 1
        assert ((out["center"].double() - theta).abs() <= 2e-5 * scale).all()
        assert ((out["x"].double() - workers[rank]).abs() <= 2e-5 * scale).all()
    assert outs[0]["state"]["settings"].get("fragment_update_alpha", 0.0) == mix


@pytest.mark.parametrize("make,kwargs", [
    ("elastic", {"outer_lr": 0.8, "outer_momentum": 0.5, "nesterov": True}),
    ("diloco", {}),
    ("diloco", {"fragments": 3, "delay": 2, "fragment_update_alpha": 0.25}),
    ("diloco", {"fragment_update_alpha": 0.25}),
    ("diloco", {"fragment_update_alpha": 1e-9}),  # 1 - a rounds to 1.0 in float32: a full pull in both
])
def test_the_outer_kernel_equals_its_torch_path_bit_for_bit(make, kwargs):
    first, second = (make, kwargs, 14, "fused"), (make, kwargs, 14, "torch")
    for a, b in values(run_ranks(2, both, first, second)):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["center"], b["center"])
        assert torch.equal(a["state"]["buffers"]["momentum"][0], b["state"]["buffers"]["momentum"][0])


def test_outer_momentum_is_checkpointed_and_resumes_exactly():
    params = make_params()
    avg = easgd_ext.ElasticAverager(params, tau=1, outer_momentum=0.9, nesterov=True)
    for t in range(1, 4):
        local_step(params, 0, t)
        avg.step()
    state = avg.state_dict()
    assert state["buffers"]["momentum"][0].abs().sum() > 0
    params2 = make_params(seed=3)
    avg2 = easgd_ext.ElasticAverager(params2, tau=1, outer_momentum=0.9, nesterov=True)
    with torch.no_grad():
        for a, b in zip(params2, params):
            a.copy_(b)
    avg2.load_state_dict(state)
    for p_, a_ in ((params, avg), (params2, avg2)):
        local_step(p_, 0, 9)
        a_.step()
    assert torch.equal(avg.center_state()[0], avg2.center_state()[0])


def test_arguments_of_the_outer_optimizer_are_checked():
    with pytest.raises(ValueError, match=r"outer_momentum must be in \[0, 1\)"):
        easgd_ext.ElasticAverager(make_params(), outer_momentum=1.0)
    with pytest.raises(ValueError, match="outer_lr must be positive"):
        easgd_ext.DiLoCoAverager(make_params(), outer_lr=0.0)
    with pytest.raises(TypeError, match="nesterov must be a bool"):
        easgd_ext.ElasticAverager(make_params(), outer_momentum=0.5, nesterov="yes")
    with pytest.raises(ValueError, match="DiLoCoAverager has no mode='async'"):
        easgd_ext.DiLoCoAverager(make_params(), mode="async")
    with pytest.raises(ValueError, match="ElasticAverager has no mode='async': an outer optimizer"):
        easgd_ext.ElasticAverager(make_params(), mode="async", outer_momentum=0.5)
    with pytest.raises(ValueError, match=r"fragment_update_alpha must be in \[0, 1\]"):
        easgd_ext.DiLoCoAverager(make_params(), fragment_update_alpha=1.5)
    with pytest.raises(TypeError, match="fragment_update_alpha must be a real number, got str"):
        easgd_ext.DiLoCoAverager(make_params(), fragment_update_alpha="0.5")
    with pytest.raises(ValueError, match=r"delay must be in \[0, tau\) = \[0, 4\)"):
        easgd_ext.DiLoCoAverager(make_params(), tau=4, delay=4)
    easgd_ext.DiLoCoAverager(make_params(), tau=4, delay=1)  # Streaming DiLoCo's overlap
    # With the pull towards the old center, a delayed outer step is fine.
    easgd_ext.ElasticAverager(make_params(), tau=4, delay=1, outer_momentum=0.5)
