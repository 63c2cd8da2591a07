"""The verdict machinery of the synchronous exchange, kernel by kernel, against float64
references on fresh random inputs: the send kernels' non-finite flag, publish_flag, and the
guarded apply kernels (skip the exchange, reset a diverged rank, keep overflowed elements,
record the verdict), on the CPU and the GPU."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICES, FLOAT_DTYPES
from easgd_ext._native import native, stream_of, tensor_ref

SKIP, RESET = 0, 1
N = 4099  # not a multiple of the vector width: the tail is covered too


def run(device: str, launch) -> None:
    native.run([launch], stream_of(torch.device(device)), 2)
    if device == "cuda":
        torch.cuda.synchronize()


def refs(**tensors):
    return {k: tensor_ref(k, v) for k, v in tensors.items()}


def guard(bad_ranks, me_bad, policy, world, verdict=None):
    """The verdict a guarded apply kernel reads, as one object (the averagers build it once)."""
    return native.prepare.Guard(tensor_ref("bad_ranks", bad_ranks), tensor_ref("me_bad", me_bad),
                                policy, world, None if verdict is None else tensor_ref("verdict", verdict))


def fresh(device: str, dtype=torch.float32, n: int = N, gen=None) -> torch.Tensor:
    return torch.randn(n, generator=gen, dtype=torch.float64).to(dtype).to(device)


# The kernels' float32 arithmetic, step by step in torch (no FMA on either side), so results can
# be compared bit for bit; test_kernels.py compares the same kernels with float64 references.
def difference(x, c, wire_dtype, alpha):
    return (torch.tensor(alpha, dtype=torch.float32) * (x.float() - c)).to(wire_dtype)


def plain_apply(x, c, s, alpha):
    d = difference(x, c, s.dtype, alpha).float()
    return (x.float() - d).to(x.dtype), c + s.float()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wire_dtype", FLOAT_DTYPES)
def test_send_flags_only_a_non_finite_stored_value(device, wire_dtype, gen):
    x, c = fresh(device, gen=gen), fresh(device, gen=gen)
    wire = torch.empty(N, dtype=wire_dtype, device=device)
    flag = torch.zeros(1, device=device)
    launch = native.prepare.elastic_difference(**refs(x=x, center=c, wire=wire, nonfinite=flag), alpha=0.4)
    run(device, launch)
    assert flag.item() == 0.0
    assert torch.equal(wire, difference(x, c, wire_dtype, 0.4))
    k = int(torch.randint(N, (1,), generator=gen))
    x[k] = float("nan")
    run(device, launch)
    assert flag.item() == 1.0
    if wire_dtype == torch.float16:  # finite inputs whose d overflows the wire dtype
        flag.zero_()
        x[k] = 1e6
        run(device, launch)
        assert flag.item() == 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [0.0, 1.0])
def test_publish_flag_puts_the_flag_in_the_header_and_withdraws_a_bad_contribution(device, bad, gen):
    wire = fresh(device, torch.bfloat16, gen=gen)
    header = torch.full((1,), 7.0, dtype=torch.bfloat16, device=device)
    me_bad = torch.tensor([bad], device=device)
    before = wire.clone()
    run(device, native.prepare.publish_flag(**refs(wire=wire, header=header, me_bad=me_bad)))
    assert header.item() == bad
    assert torch.equal(wire, torch.zeros_like(wire) if bad else before)


def guarded_apply(device, x_dtype, wire_dtype, bad_ranks, me_bad, policy, gen, world=3):
    x, c = fresh(device, x_dtype, gen=gen), fresh(device, gen=gen)
    s = fresh(device, wire_dtype, gen=gen)
    header = torch.tensor([bad_ranks], dtype=wire_dtype, device=device)
    status = torch.tensor([me_bad, -1.0, 0.0, 0.0], device=device)
    x0, c0 = x.clone(), c.clone()
    run(device, native.prepare.sync_apply(
        **refs(x=x, center=c, reduced=s), alpha=0.3,
        guard=guard(header, status[0:1], policy, world, verdict=status[1:2]),
        nonfinite=tensor_ref("overflow", status[2:3])))
    return x, c, s, x0, c0, status


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", FLOAT_DTYPES)
def test_guarded_apply_skips_everything_when_any_rank_flagged(device, x_dtype, gen):
    x, c, _, x0, c0, status = guarded_apply(device, x_dtype, torch.float32, 2.0, 0.0, SKIP, gen)
    assert torch.equal(x, x0) and torch.equal(c, c0)
    assert status[1].item() == 2.0  # the verdict is recorded even when nothing is applied


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("policy", [SKIP, RESET])
def test_guarded_apply_without_a_bad_rank_is_the_plain_update(device, x_dtype, policy, gen):
    x, c, s, x0, c0, status = guarded_apply(device, x_dtype, torch.bfloat16, 0.0, 0.0, policy, gen)
    want_x, want_c = plain_apply(x0, c0, s, 0.3)
    assert torch.equal(x, want_x) and torch.equal(c, want_c)
    assert status[1].item() == 0.0 and status[2].item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", FLOAT_DTYPES)
def test_reset_moves_a_diverged_rank_to_the_new_center(device, x_dtype, gen):
    x, c, s, x0, c0, _ = guarded_apply(device, x_dtype, torch.float32, 1.0, 1.0, RESET, gen)
    _, want_c = plain_apply(x0, c0, s, 0.3)
    assert torch.equal(c, want_c) and torch.equal(x, want_c.to(x_dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_reset_leaves_healthy_ranks_their_plain_update(device, gen):
    x, c, s, x0, c0, _ = guarded_apply(device, torch.float32, torch.float32, 1.0, 0.0, RESET, gen)
    want_x, want_c = plain_apply(x0, c0, s, 0.3)
    assert torch.equal(x, want_x) and torch.equal(c, want_c)


@pytest.mark.parametrize("device", DEVICES)
def test_an_overflowed_sum_leaves_those_elements_alone(device, gen):
    x, c = fresh(device, gen=gen), fresh(device, gen=gen)
    s = fresh(device, torch.float16, gen=gen)
    hit = torch.randperm(N, generator=gen)[:17].to(device)
    s[hit] = float("inf")
    header = torch.zeros(1, dtype=torch.float16, device=device)
    status = torch.zeros(4, device=device)
    x0, c0 = x.clone(), c.clone()
    run(device, native.prepare.sync_apply(
        **refs(x=x, center=c, reduced=s), alpha=0.3, guard=guard(header, status[0:1], SKIP, 2),
        nonfinite=tensor_ref("overflow", status[2:3])))
    assert status[2].item() == 1.0
    kept = torch.zeros(N, dtype=torch.bool, device=device)
    kept[hit] = True
    assert torch.equal(x[kept], x0[kept]) and torch.equal(c[kept], c0[kept])
    want_x, want_c = plain_apply(x0, c0, s, 0.3)
    assert torch.equal(x[~kept], want_x[~kept]) and torch.equal(c[~kept], want_c[~kept])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [0.0, 1.0, 3.0])
def test_guarded_average_is_the_mean_of_the_healthy_ranks(device, bad, gen):
    x, s = fresh(device, gen=gen), fresh(device, gen=gen)
    header = torch.tensor([bad], device=device)
    me_bad = torch.zeros(1, device=device)
    x0 = x.clone()
    run(device, native.prepare.average_apply(
        **refs(x=x, reduced=s), scale=0.25, guard=guard(header, me_bad, RESET, 3)))
    if bad >= 3:  # nobody healthy: nothing to average
        assert torch.equal(x, x0)
    else:
        scale = torch.tensor(1.0, dtype=torch.float32) / (3 - bad)  # the kernel's float32 1/healthy
        assert torch.equal(x, s * scale)


def test_a_guard_is_checked_against_its_call():
    x, c, s, flag = torch.randn(8), torch.randn(8), torch.randn(8), torch.zeros(1)
    with pytest.raises(TypeError):  # a guard needs both halves: the flag and this rank's
        native.prepare.Guard(tensor_ref("bad_ranks", flag), policy=SKIP, world=2)
    with pytest.raises(ValueError, match="policy must be 0"):
        guard(flag, torch.zeros(1), 7, 2)
    with pytest.raises(TypeError, match="bad_ranks must be bfloat16"):
        native.prepare.sync_apply(**refs(x=x, center=c, reduced=s.bfloat16()), alpha=0.3,
                                  guard=guard(flag, torch.zeros(1), SKIP, 2))
    with pytest.raises(ValueError, match="world must be >= 1"):
        native.prepare.sync_apply(**refs(x=x, center=c, reduced=s), alpha=0.3,
                                  guard=guard(flag, torch.zeros(1), SKIP, 0))
    with pytest.raises(ValueError, match="me_bad and x overlap"):
        native.prepare.sync_apply(**refs(x=x, center=c, reduced=s), alpha=0.3,
                                  guard=guard(flag, x[2:3], SKIP, 2))
    with pytest.raises(ValueError, match="nonfinite and x overlap"):
        native.prepare.elastic_difference(**refs(x=x, center=c, wire=s), alpha=0.3,
                                          nonfinite=tensor_ref("nonfinite", x[3:4]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pull_to_new", [0.0, 1.0])
def test_a_reset_rank_takes_the_kept_center_where_an_outer_sum_overflowed(device, pull_to_new, gen):
    """The outer step, like the plain apply: elements whose sum is not finite keep c and the
    momentum on every rank, and a rank reset to the center takes that kept c there (not the
    non-finite new one)."""
    x, c, m = fresh(device, gen=gen), fresh(device, gen=gen), fresh(device, gen=gen)
    s = fresh(device, torch.float16, gen=gen)
    hit = torch.randperm(N, generator=gen)[:17].to(device)
    s[hit] = float("inf")
    header = torch.ones(1, dtype=torch.float16, device=device)  # one rank flagged: this one
    status = torch.tensor([1.0, 0.0, 0.0, 0.0], device=device)
    c0, m0 = c.clone(), m.clone()
    run(device, native.prepare.outer_apply(
        **refs(x=x, center=c, momentum=m, reduced=s), alpha=0.3, lr=0.7, mu=0.9, nesterov=1.0,
        pull_to_new=pull_to_new, guard=guard(header, status[0:1], RESET, 3),
        nonfinite=tensor_ref("overflow", status[2:3])))
    kept = torch.zeros(N, dtype=torch.bool, device=device)
    kept[hit] = True
    assert status[2].item() == 1.0
    assert torch.equal(c[kept], c0[kept]) and torch.equal(m[kept], m0[kept])
    assert torch.isfinite(x).all() and torch.equal(x, c)  # the reset rank is the center
    assert not torch.equal(c[~kept], c0[~kept])  # the healthy elements did move
