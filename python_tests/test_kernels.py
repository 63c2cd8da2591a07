"""Every fused kernel against its float64 reference (easgd_ext.ops.reference): fresh random
inputs, every dtype combination, sizes 0 .. 2^20+3, aligned and unaligned views, write-only
outputs poisoned with NaN, every element checked.

Tolerances follow where the kernel rounds: float32 arithmetic (a few EPS32 of the magnitudes
involved), plus one unit of the storage dtype's epsilon wherever a value is stored in it (the
float64 reference rounds once where the kernel may round twice, f32 then bf16)."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import (EPS32, FLOAT_DTYPES, SIZES, assert_close, cuda_usable, eps, poisoned,
                      random_tensor)
from easgd_ext import ops
from easgd_ext.ops import reference as ref

DTYPE_PAIRS = list(itertools.product(FLOAT_DTYPES, FLOAT_DTYPES))
ALPHA = 0.225  # 0.9 / 4 workers, the paper's beta = 0.9


def _ids(pair):
    return "-".join(str(d).removeprefix("torch.") for d in pair)


size_and_offset = pytest.mark.parametrize("n,offset", [(n, 0) for n in SIZES] + [(4099, 1), (1 << 20, 3)])


@size_and_offset
@pytest.mark.parametrize("x_dtype,wire_dtype", DTYPE_PAIRS, ids=[_ids(p) for p in DTYPE_PAIRS])
def test_elastic_difference(device, gen, n, offset, x_dtype, wire_dtype):
    x = random_tensor(n, x_dtype, device, gen, offset)
    c = random_tensor(n, torch.float32, device, gen, offset)
    wire = poisoned(n, wire_dtype, device, offset)
    x0, c0 = x.clone(), c.clone()

    ops.elastic_difference(x, c, wire, ALPHA)

    mag_d = ALPHA * (x0.double().abs() + c0.double().abs())
    tol_d = 2 * eps(wire_dtype) * mag_d + 4 * EPS32 * mag_d
    assert_close(wire, ref.elastic_difference(x0, c0, wire, ALPHA)["wire"], tol_d, "wire")
    assert torch.equal(x, x0), "x must be read-only"
    assert torch.equal(c, c0), "center must be read-only"


@size_and_offset
@pytest.mark.parametrize("x_dtype,wire_dtype", DTYPE_PAIRS, ids=[_ids(p) for p in DTYPE_PAIRS])
def test_sync_apply(device, gen, n, offset, x_dtype, wire_dtype):
    x = random_tensor(n, x_dtype, device, gen, offset)
    c = random_tensor(n, torch.float32, device, gen, offset)
    s = random_tensor(n, wire_dtype, device, gen, offset, scale=3.0)
    x0, c0, s0 = x.clone(), c.clone(), s.clone()
    want = ref.sync_apply(x0, c0, s0, ALPHA)
    want_x, want_c = want["x"], want["center"]

    ops.sync_apply(x, c, s, ALPHA)

    mag_d = ALPHA * (x0.double().abs() + c0.double().abs())
    tol_d = 2 * eps(wire_dtype) * mag_d + 4 * EPS32 * mag_d
    assert_close(x, want_x, 2 * eps(x_dtype) * (x0.double().abs() + mag_d) + tol_d, "x")
    assert_close(c, want_c, EPS32 * (c0.double().abs() + s0.double().abs()), "center")
    assert torch.equal(s, s0), "reduced must be read-only"


@size_and_offset
@pytest.mark.parametrize("x_dtype", FLOAT_DTYPES, ids=str)
def test_async_exchange(device, gen, n, offset, x_dtype):
    x = random_tensor(n, x_dtype, device, gen, offset)
    c = random_tensor(n, torch.float32, device, gen, offset)
    x0, c0 = x.clone(), c.clone()
    want = ref.async_exchange(x0, c0, ALPHA)
    want_x, want_c = want["x"], want["center"]

    ops.async_exchange(x, c, ALPHA)

    mag = x0.double().abs() + c0.double().abs()
    tol_x = 2 * eps(x_dtype) * mag + 4 * EPS32 * mag
    assert_close(x, want_x, tol_x, "x")
    assert_close(c, want_c, tol_x + 4 * EPS32 * mag, "center")
    # What x lost, the center gained: x + c is conserved to float32 rounding, in every dtype.
    assert_close(x.double() + c.double(), x0.double() + c0.double(), 2 * EPS32 * mag, "x + center")


@size_and_offset
@pytest.mark.parametrize("x_dtype,wire_dtype", DTYPE_PAIRS, ids=[_ids(p) for p in DTYPE_PAIRS])
def test_downpour_push(device, gen, n, offset, x_dtype, wire_dtype):
    x = random_tensor(n, x_dtype, device, gen, offset)
    x_last = random_tensor(n, x_dtype, device, gen, offset)
    wire = poisoned(n, wire_dtype, device, offset)
    x0, l0 = x.clone(), x_last.clone()

    ops.downpour_push(x, x_last, wire)

    mag = x0.double().abs() + l0.double().abs()
    assert_close(wire, ref.downpour_push(x0, l0, wire)["wire"], (eps(wire_dtype) + 2 * EPS32) * mag,
                 "wire")
    assert torch.equal(x, x0) and torch.equal(x_last, l0), "x and x_last must be read-only"


@size_and_offset
@pytest.mark.parametrize("x_dtype,wire_dtype", DTYPE_PAIRS, ids=[_ids(p) for p in DTYPE_PAIRS])
def test_downpour_pull(device, gen, n, offset, x_dtype, wire_dtype):
    c = random_tensor(n, torch.float32, device, gen, offset)
    s = random_tensor(n, wire_dtype, device, gen, offset)
    x = poisoned(n, x_dtype, device, offset)
    x_last = poisoned(n, x_dtype, device, offset)
    c0, s0 = c.clone(), s.clone()
    want = ref.downpour_pull(c0, s0, x, x_last)
    want_c, want_x = want["center"], want["x"]

    ops.downpour_pull(c, s, x, x_last)

    tol_c = EPS32 * (c0.double().abs() + s0.double().abs())
    assert_close(c, want_c, tol_c, "center")
    assert_close(x, want_x, 2 * eps(x_dtype) * want_c.abs() + tol_c, "x")
    assert torch.equal(x_last, x), "x_last must equal the pulled x exactly"


@size_and_offset
@pytest.mark.parametrize("x_dtype", FLOAT_DTYPES, ids=str)
def test_downpour_async_exchange(device, gen, n, offset, x_dtype):
    x = random_tensor(n, x_dtype, device, gen, offset)
    x_last = random_tensor(n, x_dtype, device, gen, offset)
    c = random_tensor(n, torch.float32, device, gen, offset)
    x0, l0, c0 = x.clone(), x_last.clone(), c.clone()
    want = ref.downpour_async_exchange(x0, l0, c0)
    want_x, want_c = want["x"], want["center"]

    ops.downpour_async_exchange(x, x_last, c)

    tol_c = 2 * EPS32 * (c0.double().abs() + x0.double().abs() + l0.double().abs())
    assert_close(c, want_c, tol_c, "center")
    assert_close(x, want_x, 2 * eps(x_dtype) * want_c.abs() + tol_c, "x")
    assert torch.equal(x_last, x), "x_last must equal the pulled x exactly"


@size_and_offset
@pytest.mark.parametrize("x_dtype,wire_dtype", DTYPE_PAIRS, ids=[_ids(p) for p in DTYPE_PAIRS])
def test_average_apply(device, gen, n, offset, x_dtype, wire_dtype):
    s = random_tensor(n, wire_dtype, device, gen, offset, scale=3.0)
    x = poisoned(n, x_dtype, device, offset)
    s0 = s.clone()

    ops.average_apply(x, s, 1 / 3)

    want = ref.average_apply(x, s0, 1 / 3)["x"]
    assert_close(x, want, (2 * eps(x_dtype) + 2 * EPS32) * want.abs(), "x")


@pytest.mark.parametrize("x_dtype", FLOAT_DTYPES, ids=str)
def test_average_apply_in_place(device, gen, x_dtype):
    """`reduced` may be `x` itself: the all-reduce runs in place on the flat buffer."""
    x = random_tensor(100_003, x_dtype, device, gen, scale=4.0)
    want = ref.average_apply(x, x.clone(), 0.25)["x"]
    ops.average_apply(x, x, 0.25)
    assert_close(x, want, (2 * eps(x_dtype) + 2 * EPS32) * want.abs(), "x")


def test_multidimensional_tensors_of_one_shape(device, gen):
    x = random_tensor(6 * 35, torch.float32, device, gen).view(6, 35)
    c = random_tensor(6 * 35, torch.float32, device, gen).view(6, 35)
    x0, c0 = x.clone(), c.clone()
    ops.async_exchange(x, c, 0.5)
    want_x = ref.async_exchange(x0, c0, 0.5)["x"]
    assert_close(x, want_x, 4 * EPS32 * (x0.abs() + c0.abs()).double(), "x")


@pytest.mark.parametrize("x_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("wire_dtype", FLOAT_DTYPES, ids=str)
def test_sync_apply_subtracts_exactly_the_wire_value(device, gen, x_dtype, wire_dtype):
    """Replicas stay consistent only if x loses exactly the d that went on the wire (rounded to
    the wire dtype), recomputed bit for bit by sync_apply; here the all-reduce is the identity
    (one worker), so the center must gain the same d."""
    n = 200_000
    x = random_tensor(n, x_dtype, device, gen)
    c = random_tensor(n, torch.float32, device, gen)
    wire = poisoned(n, wire_dtype, device)
    x0 = x.clone()
    ops.elastic_difference(x, c, wire, ALPHA)
    ops.sync_apply(x, c, wire, ALPHA)
    want_x = (x0.double() - wire.double()).to(x_dtype)  # one rounding of x0 - d, nothing else
    assert torch.equal(x, want_x), "x must lose exactly the rounded wire value"


needs_cuda = pytest.mark.skipif(not cuda_usable(), reason="needs a CUDA GPU and easgd_ext built with CUDA")


@needs_cuda
@pytest.mark.parametrize("x_dtype,wire_dtype", DTYPE_PAIRS, ids=[_ids(p) for p in DTYPE_PAIRS])
def test_cuda_matches_cpu_bit_for_bit(gen, x_dtype, wire_dtype):
    """Both backends compute in float32 without FMA contraction and round the same way, so a
    mixed CPU/GPU job keeps identical replicas."""
    n = 300_007
    x, c = random_tensor(n, x_dtype, "cpu", gen), random_tensor(n, torch.float32, "cpu", gen)
    wire = torch.empty(n, dtype=wire_dtype)
    xg, cg, wg = x.cuda(), c.cuda(), wire.cuda()
    for args in ((x, c, wire), (xg, cg, wg)):
        ops.elastic_difference(*args, ALPHA)
        ops.sync_apply(*args, ALPHA)
        ops.async_exchange(args[0], args[1], ALPHA)
    for cpu_t, gpu_t in ((x, xg), (c, cg), (wire, wg)):
        assert torch.equal(cpu_t, gpu_t.cpu())


@needs_cuda
def test_cuda_runs_on_the_callers_stream(gen):
    """Work is enqueued on the current stream: ordered after earlier work on that stream and
    visible to later work on it, with no device synchronization in between."""
    n = 1 << 24
    stream = torch.cuda.Stream()
    x = random_tensor(n, torch.float32, "cuda", gen)
    c = random_tensor(n, torch.float32, "cuda", gen)
    want = ref.async_exchange((x * 2).cpu(), c.cpu(), ALPHA)
    want_x, want_c = want["x"], want["center"]
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        x.mul_(2)  # must finish before the exchange reads x
        ops.async_exchange(x, c, ALPHA)
        x_after, c_after = x.clone(), c.clone()  # ordered after the exchange on the same stream
    stream.synchronize()
    mag = (want_x.abs() + want_c.abs()).double()
    assert_close(x_after, want_x, 8 * EPS32 * mag, "x")
    assert_close(c_after, want_c, 8 * EPS32 * mag, "center")


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_second_device(gen):
    x = random_tensor(10_001, torch.float32, "cuda:1", gen)
    c = random_tensor(10_001, torch.float32, "cuda:1", gen)
    want_x = ref.async_exchange(x.cpu(), c.cpu(), ALPHA)["x"]
    torch.cuda.set_device(0)
    ops.async_exchange(x, c, ALPHA)
    assert_close(x, want_x, 4 * EPS32 * (want_x.abs() + c.cpu().abs()).double(), "x")
    assert torch.cuda.current_device() == 0, "the caller's current device must be restored"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 4099, (1 << 20) + 3])
def test_count_nonfinite_matches_torch(device, gen, dtype, n):
    t = random_tensor(n, dtype, device, gen, scale=1e3)
    picks = torch.randint(0, n, (min(n, 37),), generator=gen)
    specials = torch.tensor([float("nan"), float("inf"), float("-inf"), 7.0], dtype=torch.float64)
    t[picks.to(device)] = specials[torch.arange(len(picks)) % 4].to(dtype).to(device)
    assert ops.count_nonfinite(t) == int((~torch.isfinite(t)).sum())
    # the largest finite values and the subnormals are finite
    edge = torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max, torch.finfo(dtype).tiny / 4],
                        dtype=dtype, device=device)
    assert ops.count_nonfinite(edge) == 0
