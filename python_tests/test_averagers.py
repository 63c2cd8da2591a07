"""The averagers in one process (no torch.distributed): argument checks, the flat-buffer views,
the center swap, checkpoints. Multi-process behaviour is in test_averagers_dist.py."""

from __future__ import annotations

import pytest
import torch

import easgd_ext
from easgd_ext import DownpourAverager, ElasticAverager, PeriodicAverager

ALL = [ElasticAverager, DownpourAverager, PeriodicAverager]


def model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).to(dtype)


def train_step(m: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(8, 6, dtype=next(m.parameters()).dtype)
    m(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("tau,error,match", [
    (0, ValueError, r"tau must be >= 1"), (-3, ValueError, r"tau must be >= 1"),
    (2.0, TypeError, r"tau must be an int"), (True, TypeError, r"tau must be an int"),
])
def test_tau_checked(cls, tau, error, match):
    with pytest.raises(error, match=match):
        cls(model().parameters(), tau=tau)


@pytest.mark.parametrize("cls", ALL)
def test_comm_dtype_and_bucket_checked(cls):
    with pytest.raises(ValueError, match=r"comm_dtype must be None .* got torch.float64"):
        cls(model().parameters(), comm_dtype=torch.float64)
    with pytest.raises(ValueError, match=r"bucket_cap_mb must be positive"):
        cls(model().parameters(), bucket_cap_mb=0)
    with pytest.raises(ValueError, match=r"mode must be 'sync' or 'async', got 'sideways'"):
        cls(model().parameters(), mode="sideways")
    assert cls(model().parameters(), comm_dtype="bf16").comm_dtype == torch.bfloat16


@pytest.mark.parametrize("cls", ALL)
def test_parameters_checked(cls):
    with pytest.raises(ValueError, match="params is empty"):
        cls([])
    with pytest.raises(TypeError, match=r"params\[1\] is int64\[3\] on cpu; parameters must be"):
        cls([torch.zeros(2), torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(TypeError, match="got a single tensor"):
        cls(torch.zeros(3))
    with pytest.raises(TypeError, match="not optimizer-style parameter groups"):
        cls([{"params": [torch.zeros(3)]}])


def test_stability_condition_enforced_with_opt_out():
    with pytest.raises(ValueError, match=r"beta = p \* alpha = 1 \* 1.2 = 1.2 breaks the stability "
                                         r"condition of synchronous EASGD, 0 < beta < 1"):
        ElasticAverager(model().parameters(), alpha=1.2)
    with pytest.raises(ValueError, match="stability condition"):
        ElasticAverager(model().parameters(), beta=1.0)
    avg = ElasticAverager(model().parameters(), beta=1.5, allow_unstable=True)
    assert (avg.alpha, avg.beta) == (1.5, 1.5)
    with pytest.raises(ValueError, match=r"alpha \(the moving rate\) must be positive"):
        ElasticAverager(model().parameters(), alpha=0.0)
    with pytest.raises(ValueError, match=r"alpha=0.3 and beta=0.9 disagree"):
        ElasticAverager(model().parameters(), alpha=0.3, beta=0.9)
    with pytest.raises(TypeError, match="beta must be a real number"):
        ElasticAverager(model().parameters(), beta="0.9")


def test_defaults_follow_the_paper():
    avg = ElasticAverager(model().parameters())
    assert (avg.tau, avg.beta, avg.alpha, avg.world_size) == (10, 0.9, 0.9, 1)


def test_launcher_without_init_process_group_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ElasticAverager(model().parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_through_the_views(dtype):
    """Gradients, the optimizer and the exchange all act on the same memory."""
    m = model(dtype)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    avg = ElasticAverager(m.parameters(), tau=2, alpha=0.5)
    for _ in range(4):
        before = [p.detach().clone() for p in m.parameters()]
        train_step(m, opt)
        assert any(not torch.equal(b, p) for b, p in zip(before, m.parameters())), "optimizer step lost"
        avg.step()
    # One worker: the center follows x and x follows the center; check one exchange by hand.
    x0 = [p.detach().double().clone() for p in m.parameters()]
    with avg.center_parameters():
        c0 = [p.detach().double().clone() for p in m.parameters()]
    assert avg.exchange()
    tol = 4 * torch.finfo(dtype).eps
    for p, x, c in zip(m.parameters(), x0, c0):
        want = x - 0.5 * (x - c)
        assert torch.allclose(p.detach().double(), want, rtol=tol, atol=tol)


def test_replaced_parameter_data_is_pulled_back_into_the_buffer():
    m = model()
    avg = ElasticAverager(m.parameters(), tau=1, alpha=0.5)
    for p in m.parameters():
        p.data = torch.full_like(p, 3.0)  # detaches p from the flat buffer
    center = [c.clone() for c in avg.center_state()]
    avg.exchange()
    # x was 3 everywhere: the exchange saw it, so x = 3 - alpha (3 - c) = (3 + c) / 2.
    offset = 0
    for p in m.parameters():
        c = center[0][offset:offset + p.numel()].view(p.shape)
        assert torch.allclose(p.detach(), (3 + c) / 2, atol=1e-6)
        assert p.data_ptr() == avg._groups[0].flat.data_ptr() + 4 * offset, "not re-pointed"
        offset = -(-(offset + p.numel()) // 64) * 64


def test_model_cast_after_building_is_an_error():
    m = torch.nn.Linear(6, 4)
    avg = ElasticAverager(m.parameters(), tau=1)
    m.double()
    with pytest.raises(ValueError, match=r"changed from float32\[4, 6\] on cpu to float64\[4, 6\]"):
        avg.exchange()


def test_center_parameters_swaps_and_restores_exactly():
    m = model(torch.bfloat16)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    avg = ElasticAverager(m.parameters(), tau=3)
    for _ in range(4):
        train_step(m, opt)
        avg.step()
    mine = [p.detach().clone() for p in m.parameters()]
    with avg.center_parameters():
        inside = [p.detach().clone() for p in m.parameters()]
        with pytest.raises(RuntimeError, match="inside center_parameters"):
            avg.exchange()
    assert all(torch.equal(a, p) for a, p in zip(mine, m.parameters()))
    flat_center = avg.center_state()[0]
    offset = 0
    for p, c in zip(m.parameters(), inside):
        assert torch.equal(c.flatten(), flat_center[offset:offset + p.numel()].to(torch.bfloat16))
        offset = -(-(offset + p.numel()) // 64) * 64


def test_center_parameters_restores_after_an_exception():
    m = model()
    avg = ElasticAverager(m.parameters())
    with torch.no_grad():
        m[0].weight.add_(1.0)
    mine = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(KeyError):
        with avg.center_parameters():
            raise KeyError("evaluation failed")
    assert all(torch.equal(a, p) for a, p in zip(mine, m.parameters()))


@pytest.mark.parametrize("cls", ALL)
def test_state_dict_round_trip_and_validation(cls):
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    avg = cls(m.parameters(), tau=2)
    for _ in range(5):
        train_step(m, opt)
        avg.step()
    state = avg.state_dict()
    other = cls(model().parameters(), tau=2)
    other.load_state_dict(state)
    assert other.clock == 5 and other.stats.exchanges == 2
    assert all(torch.equal(a, b) for a, b in zip(avg.center_state(), other.center_state()))
    with pytest.raises(ValueError, match="state was saved with tau=2, this averager has tau=3"):
        cls(model().parameters(), tau=3).load_state_dict(state)
    with pytest.raises(ValueError, match="state layout is"):
        cls(torch.nn.Linear(2, 2).parameters(), tau=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"state is missing \['buffers'\]"):
        other.load_state_dict({k: v for k, v in state.items() if k != "buffers"})
    with pytest.raises(TypeError, match="state must be a dict"):
        other.load_state_dict([1, 2])


def test_non_finite_parameter_skips_even_alone():
    m = model()
    avg = ElasticAverager(m.parameters(), tau=1)
    with torch.no_grad():
        m[0].weight[0, 0] = float("inf")
    center = [c.clone() for c in avg.center_state()]
    with pytest.warns(RuntimeWarning, match="skipped exchange at clock 1: non-finite values on 1 of 1"):
        assert avg.step() is False
    assert all(torch.equal(a, b) for a, b in zip(center, avg.center_state()))
    assert avg.stats.skipped_exchanges == 1 and avg.stats.exchanges == 0


def test_public_names():
    for name in ("ElasticAverager", "DownpourAverager", "PeriodicAverager", "ExchangeStats"):
        assert name in easgd_ext.__all__
