"""Shared fixtures: the devices to test on (CUDA only where a GPU and a CUDA build exist) and
the comparison helpers used against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import easgd_ext
from easgd_ext import SharedCenter
from easgd_ext.shared_center import unique_name

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, 7, 4099, (1 << 20) + 3]


def cuda_usable() -> bool:
    return (torch.cuda.is_available() and easgd_ext.build_info()["cuda"]
            and easgd_ext.build_info()["cuda_devices"] > 0)


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(
        not cuda_usable(), reason="needs a CUDA GPU and easgd_ext built with CUDA")),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh, differently seeded generator per test: inputs are new random numbers each run."""
    g = torch.Generator()
    g.seed()
    return g


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


EPS32 = torch.finfo(torch.float32).eps


def random_tensor(n: int, dtype: torch.dtype, device: str, gen: torch.Generator,
                  offset: int = 0, scale: float = 1.0) -> torch.Tensor:
    """n fresh N(0, scale^2) values stored in `dtype` on `device`; with offset > 0 the tensor is
    a view `offset` elements into a larger buffer, so its pointer is not vector-aligned."""
    values = torch.randn(n + offset, generator=gen, dtype=torch.float64) * scale
    return values.to(dtype).to(device)[offset:]


def poisoned(n: int, dtype: torch.dtype, device: str, offset: int = 0) -> torch.Tensor:
    """An output buffer full of NaN, so any element the kernel fails to write is caught."""
    return torch.full((n + offset,), float("nan"), dtype=dtype, device=device)[offset:]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor,
                 what: str) -> None:
    """Every element of `actual` within `tol` of `expected`; NaN and Inf always fail."""
    actual = actual.detach().double().cpu()
    expected = expected.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite output (unwritten or poisoned element)"
    err = (actual - expected).abs()
    bad = err > tol.double().cpu() + 1e-300
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {actual.numel()} elements off; first at {i}: "
            f"got {actual[i].item()!r}, want {expected[i].item()!r}, tol {tol[i].item():.3g}")


@pytest.fixture
def center_name():
    """A fresh shared-center name, removed after the test (whatever the test left there)."""
    name = unique_name("test")
    yield name
    SharedCenter.remove(name)
