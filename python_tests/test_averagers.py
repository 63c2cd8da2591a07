"""The averagers in one process (no torch.distributed): argument checks, the flat-buffer views,
the center swap, checkpoints. Multi-process behaviour is in test_averagers_dist.py."""

from __future__ import annotations

import pytest
import torch

import easgd_ext
from conftest import DEVICES
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
    avg.exchange()
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
        assert p.data_ptr() == avg.flat_parameters()[0].data_ptr() + 4 * offset, "not re-pointed"
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
    avg = ElasticAverager(m.parameters(), tau=1, on_nonfinite="skip")
    with torch.no_grad():
        m[0].weight[0, 0] = float("inf")
    center = [c.clone() for c in avg.center_state()]
    x = [f.clone() for f in avg.flat_parameters()]
    with pytest.warns(RuntimeWarning, match="exchange at clock 1 was skipped: non-finite values on "
                                            r"1 of 1 workers \(this rank: yes\)"):
        assert avg.step() is True
    assert all(torch.equal(a, b) for a, b in zip(center, avg.center_state()))
    assert all(torch.equal(a, b) for a, b in zip(x, avg.flat_parameters()))
    assert avg.stats.skipped_exchanges == 1 and avg.stats.exchanges == 0


def test_non_finite_worker_is_reset_to_the_center_by_default():
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    avg = ElasticAverager(m.parameters(), tau=1)
    avg.attach(opt)
    train_step(m, opt)  # one exchange: momentum buffers exist, the center moved
    assert opt.state and avg.stats.exchanges == 1
    center = [c.clone() for c in avg.center_state()]
    with torch.no_grad():
        m[0].weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="this worker's parameters were not finite at the exchange "
                                            "at clock 1: they were reset to the center; its state in "
                                            "the attached optimizer was cleared"):
        avg.exchange()
    assert all(torch.equal(a, b) for a, b in zip(center, avg.center_state())), "the center moved"
    assert all(torch.equal(f, c) for f, c in zip(avg.flat_parameters(), center))
    assert not any(p in opt.state for p in m.parameters())
    assert (avg.stats.resets, avg.stats.exchanges, avg.stats.skipped_exchanges) == (1, 2, 0)


def test_raise_policy_raises_and_changes_nothing():
    m = model()
    avg = ElasticAverager(m.parameters(), tau=1, on_nonfinite="raise")
    with torch.no_grad():
        m[2].bias[0] = float("inf")
    x = [f.clone() for f in avg.flat_parameters()]
    with pytest.raises(easgd_ext.NonFiniteError, match="exchange at clock 0 was skipped"):
        avg.exchange()
    assert all(torch.equal(a, b) for a, b in zip(x, avg.flat_parameters()))


def test_public_names():
    import inspect

    expected = {"ElasticAverager", "DownpourAverager", "PeriodicAverager", "DiLoCoAverager",
                "Replicated", "SharedMemory", "Servers", "CenterSpec", "SharedCenter",
                "ExchangeStats", "NonFiniteError", "ExchangeError", "StaleSegmentError",
                "build_info", "init_process_group", "ops", "__version__"}
    assert set(easgd_ext.__all__) == expected
    for name in easgd_ext.__all__:
        obj = getattr(easgd_ext, name)  # every name is there
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__ and len(obj.__doc__.split()) >= 5, f"{name} has no docstring"
    # the public constructors say what they take
    for cls in (easgd_ext.ElasticAverager, easgd_ext.Replicated, easgd_ext.SharedMemory):
        hints = inspect.signature(cls).parameters
        assert all(p.annotation is not inspect.Parameter.empty for n, p in hints.items()
                   if n not in ("self",) and p.kind is not p.VAR_KEYWORD), cls


@pytest.mark.parametrize("view", ["row", "transpose", "strided"])
def test_views_of_a_parameter_are_rejected(view):
    w = torch.nn.Parameter(torch.randn(4, 6))
    v = {"row": lambda: w[0], "transpose": lambda: w.t(), "strided": lambda: w[:, ::2]}[view]()
    with pytest.raises(ValueError, match=r"params\[1\] is a view of another tensor .* the tensor it "
                                         "views would never be averaged"):
        ElasticAverager([torch.nn.Parameter(torch.randn(3)), v])
    assert w.data_ptr() == w.untyped_storage().data_ptr(), "w was left alone"


def test_overlapping_parameters_are_rejected():
    base = torch.randn(10)
    a, b = torch.nn.Parameter(base[:6].detach()), torch.nn.Parameter(base[4:].detach())
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] overlap in memory"):
        PeriodicAverager([a, b])


def test_a_second_averager_over_the_same_parameters_works():
    m = model()
    first = ElasticAverager(m.parameters(), tau=1)
    second = DownpourAverager(m.parameters(), tau=1)
    second.exchange()
    assert first.flat_parameters()[0].data_ptr() != second.flat_parameters()[0].data_ptr()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_exchange_invalidates_what_backward_saved(device, mode):
    """A backward that saved a weight before exchange() must fail as after any in-place
    update, not silently use the exchanged values."""
    m = torch.nn.Linear(4, 3).to(device)
    with ElasticAverager(m.parameters(), tau=1, mode=mode, alpha=0.5) as avg:
        with torch.no_grad():
            m.weight.add_(1.0)  # x differs from the center: the exchange changes it
        inputs = torch.randn(2, 4, device=device, requires_grad=True)
        loss = (m(inputs) ** 2).sum()  # saves the weight (for the inputs' gradient)
        version = m.weight._version
        avg.exchange()
        assert m.weight._version > version
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_attached_averager_steps_with_the_optimizer():
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    avg = ElasticAverager(m.parameters(), tau=2)
    handle = avg.attach(opt)
    for _ in range(4):
        train_step(m, opt)
    assert (avg.clock, avg.stats.exchanges) == (4, 2)
    # Attached, a step of the loop's own would count every step twice: it is an error, as is a
    # second attach; detached, the loop steps the averager itself again.
    with pytest.raises(RuntimeError, match="count each step twice"):
        avg.step()
    with pytest.raises(RuntimeError, match="already attached"):
        avg.attach(torch.optim.SGD(m.parameters(), lr=0.1))
    assert avg.clock == 4
    handle.remove()
    train_step(m, opt)
    assert avg.clock == 4
    avg.step()
    assert avg.clock == 5
    avg.attach(opt).remove()  # attachable again once detached
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        avg.attach(m)


@pytest.mark.parametrize("kwargs,match", [
    ({"lock_timeout": 5.0}, "lock_timeout applies to mode='async', not mode='sync'"),
    ({"center": "x"}, "center applies to mode='async'"),
    ({"mode": "async", "bucket_cap_mb": 1.0}, "bucket_cap_mb applies to mode='sync', not mode='async'"),
    ({"mode": "async", "comm_dtype": torch.bfloat16}, "comm_dtype applies to mode='sync'"),
    ({"mode": "async", "exchange_timeout": 3.0}, "exchange_timeout applies to mode='sync'"),
    ({"on_nonfinite": "ignore"}, "on_nonfinite must be one of 'reset', 'skip', 'raise'"),
    ({"exchange_timeout": 0}, "exchange_timeout must be positive"),
])
def test_arguments_of_the_other_mode_are_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ElasticAverager(model().parameters(), **kwargs)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_channels_last_weights_keep_their_memory_order(mode):
    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    before = conv.weight.detach().clone()
    with ElasticAverager(conv.parameters(), tau=1, mode=mode, alpha=0.5) as avg:
        assert conv.weight.is_contiguous(memory_format=torch.channels_last), "layout changed"
        assert torch.equal(conv.weight.detach(), before)
        with avg.center_parameters():
            assert torch.equal(conv.weight.detach(), before)  # the center starts at the weights
        with torch.no_grad():
            conv.weight.add_(2.0)
        avg.exchange()
        assert torch.allclose(conv.weight.detach(), before + 1.0, atol=1e-6)  # halfway back


def test_the_same_tensor_twice_is_an_error():
    w = torch.nn.Parameter(torch.randn(5))
    with pytest.raises(ValueError, match=r"params\[1\] is params\[0\] again"):
        ElasticAverager([w, w])
    tied = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    ElasticAverager(tied.parameters())  # model.parameters() lists a tied weight once: fine


def test_what_a_cuda_graph_cannot_hold_is_refused_before_capture():
    """The checks behind a capture, by their logic (the capture itself needs a GPU: see
    test_exchange_contract and test_streaming): an asynchronous exchange, a delayed one (even
    through exchange()), and a step (which may leave work in flight) rather than exchange()."""
    shared = ElasticAverager(model().parameters(), tau=1, mode="async")
    try:
        with pytest.raises(RuntimeError, match="mode='async'\\) cannot be captured in a CUDA graph"):
            shared._check_capturable(shared._center.exchange)
    finally:
        shared.close()
    delayed = ElasticAverager(model().parameters(), tau=4, fragments=2, delay=1)
    with pytest.raises(RuntimeError, match="only exchange\\(\\) with nothing in flight can be captured"):
        delayed._check_capturable(delayed._center.exchange)
    plain = ElasticAverager(model().parameters(), tau=4)
    with pytest.raises(RuntimeError, match="only exchange\\(\\) with nothing in flight can be captured"):
        plain._check_capturable(plain._center.advance)
    plain._check_capturable(plain._center.exchange)  # one process, no delay: capturable
