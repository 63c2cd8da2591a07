"""The bf16/f16 <-> float32 conversions inside every kernel, exhaustively and bit for bit
against torch's own conversions (round to nearest even, Inf, NaN, subnormals), and the CPU
kernels bit-identical across the ISA levels they are compiled for."""

from __future__ import annotations

import pytest
import torch

from conftest import FLOAT_DTYPES, random_tensor
from easgd_ext import build_info, ops
from easgd_ext._native import native

HALF_TYPES = [torch.bfloat16, torch.float16]


def all_bit_patterns(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)


def assert_same_values(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-identical, except that any NaN matches any NaN."""
    a, e = actual.cpu(), expected.cpu()
    nan = torch.isnan(e)
    assert torch.equal(torch.isnan(a), nan)
    bits = torch.int32 if a.element_size() == 4 else torch.int16
    mismatch = (a[~nan].view(bits) != e[~nan].view(bits)).nonzero()
    assert mismatch.numel() == 0, (
        f"{mismatch.numel()} values differ; first input index {int(mismatch[0])}: "
        f"got {a[~nan][mismatch[0]].item()!r}, want {e[~nan][mismatch[0]].item()!r}")


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_widening_every_16_bit_pattern(device, dtype):
    src = all_bit_patterns(dtype).to(device)
    out = torch.full(src.shape, 7.0, dtype=torch.float32, device=device)
    ops.average_apply(out, src, 1.0)
    assert_same_values(out, src.float())


def float32_probe_values(gen: torch.Generator) -> torch.Tensor:
    """Random floats over the whole exponent range, exact rounding ties, subnormals of the
    target types, their overflow boundaries, Inf and NaN."""
    bits = torch.randint(-(1 << 31), (1 << 31) - 1, (1 << 20,), generator=gen, dtype=torch.int64)
    random_bits = bits.to(torch.int32).view(torch.float32)
    halves = all_bit_patterns(torch.float16).float()
    bhalves = all_bit_patterns(torch.bfloat16).float()
    # Midpoints between neighbouring 16-bit values: the round-to-nearest-even ties.
    ties = torch.cat([(halves[:-1].double() + halves[1:].double()) / 2,
                      (bhalves[:-1].double() + bhalves[1:].double()) / 2]).float()
    specials = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 65536.0, -65520.0, 2.0 ** -24,
                             2.0 ** -25, 2.0 ** -25 * 1.0001, 2.0 ** -14, 6.1e-5, 3.0e38,
                             float("inf"), float("-inf"), float("nan"), 1e-45, -1e-40])
    return torch.cat([random_bits, ties, specials])


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_rounding_float32_to_16_bits(device, gen, dtype):
    src = float32_probe_values(gen).to(device)
    out = torch.zeros(src.shape, dtype=dtype, device=device)
    ops.average_apply(out, src, 1.0)
    assert_same_values(out, src.to(dtype))


def _run_every_kernel(gen_seed: int) -> list[torch.Tensor]:
    """All kernels, all dtype combinations, on one set of seeded inputs; returns all outputs."""
    g = torch.Generator().manual_seed(gen_seed)
    n = 70_001  # above the threshold where the CPU kernels go multi-threaded
    outputs = []
    for xd in FLOAT_DTYPES:
        for wd in FLOAT_DTYPES:
            x, c = random_tensor(n, xd, "cpu", g), random_tensor(n, torch.float32, "cpu", g)
            last = random_tensor(n, xd, "cpu", g)
            wire = torch.empty(n, dtype=wd)
            ops.elastic_difference(x, c, wire, 0.3)
            ops.sync_apply(x, c, wire, 0.3)
            ops.async_exchange(x, c, 0.3)
            ops.downpour_push(x, last, wire)
            ops.downpour_pull(c, wire, x, last)
            ops.downpour_async_exchange(x, last, c)
            ops.average_apply(x, wire, 0.25)
            outputs += [x, c, last, wire]
    return outputs


def test_cpu_isa_levels_agree_bit_for_bit(gen):
    levels = build_info()["cpu_isas_available"].split(",")
    if len(levels) < 2:
        pytest.skip(f"only one CPU ISA level available here ({levels})")
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    default = build_info()["cpu_isa"]
    try:
        results = {}
        for level in levels:
            native.set_cpu_isa(level)
            assert build_info()["cpu_isa"] == level
            results[level] = _run_every_kernel(seed)
    finally:
        native.set_cpu_isa(default)
    base = results[levels[0]]
    for level in levels[1:]:
        for i, (a, b) in enumerate(zip(base, results[level])):
            assert_same_values(b, a), f"output {i} differs between {levels[0]} and {level}"


def test_unknown_cpu_isa_level_is_rejected():
    with pytest.raises(ValueError, match="expected baseline, v3 or v4"):
        native.set_cpu_isa("avx9000")
