"""Every rule's torch-level path (what a new rule starts with, before its fused kernel exists)
against its fused kernels, through the whole synchronous exchange: bit for bit, in every policy,
with a rank that diverges, over real Gloo ranks. Also the rule forms the centers ask for."""

from __future__ import annotations

import os

import pytest
import torch

import easgd_ext
from dist_harness import run_ranks, values
from easgd_ext.algorithms import Averaging, Downpour, Elastic
from easgd_ext.settings import KERNELS_ENV

MAKERS = {"easgd": lambda p, **kw: easgd_ext.ElasticAverager(p, **kw),
          "downpour": lambda p, **kw: easgd_ext.DownpourAverager(p, **kw),
          "average": lambda p, **kw: easgd_ext.PeriodicAverager(p, **kw)}


def params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(3)
    shapes = [(33, 7), (130,), (5, 3, 3, 3), (4099,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def run_path(rank: int, path: str, algo: str, dtype: torch.dtype, comm: str | None,
             policy: str, bad_at: int) -> dict:
    """Six exchanges with identical local steps; at exchange ``bad_at`` rank 1 diverges."""
    os.environ[KERNELS_ENV] = path
    ps = params(dtype)
    avg = MAKERS[algo](ps, tau=1, comm_dtype=comm, on_nonfinite=policy, bucket_cap_mb=0.01)
    g = torch.Generator().manual_seed(100 + rank)
    for k in range(6):
        with torch.no_grad():
            for p in ps:
                p.add_(torch.randn(p.shape, generator=g).to(dtype), alpha=0.1)
            if k == bad_at and rank == 1:
                ps[-1][7] = float("nan")
        avg.exchange()
    stats = avg.stats
    return {"x": [f.clone() for f in avg.flat_parameters()],
            "center": [c.clone() for c in avg.center_state()] if algo != "average" else [],
            "stats": (stats.exchanges, stats.skipped_exchanges, stats.resets,
                      stats.overflowed_exchanges)}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN included (a skipped exchange leaves the diverged rank's NaN in place)."""
    ints = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(ints), b.view(ints))


def both_paths(rank: int, world: int, *args) -> dict:
    return {path: run_path(rank, path, *args) for path in ("fused", "torch")}


CASES = [("easgd", torch.float32, None), ("easgd", torch.bfloat16, "float16"),
         ("downpour", torch.float32, "bfloat16"), ("average", torch.float16, None)]


@pytest.mark.parametrize("algo,dtype,comm", CASES)
@pytest.mark.parametrize("policy", ["reset", "skip"])
def test_torch_path_equals_the_fused_kernels_bit_for_bit(algo, dtype, comm, policy):
    for out in values(run_ranks(2, both_paths, algo, dtype, comm, policy, 3)):
        fused, torch_level = out["fused"], out["torch"]
        assert fused["stats"] == torch_level["stats"]
        assert fused["stats"][1 if policy == "skip" else 0] >= 1
        for a, b in zip(fused["x"] + fused["center"], torch_level["x"] + torch_level["center"]):
            assert same_bits(a, b)


def test_torch_path_in_one_process_with_an_overflowing_float16_sum(monkeypatch):
    """No process group: the 'sum' is this worker's own wire; a float16 wire that overflows is
    left alone element by element on both paths alike."""
    results = {}
    for path in ("fused", "torch"):
        monkeypatch.setenv(KERNELS_ENV, path)
        ps = params(torch.float32)
        avg = easgd_ext.ElasticAverager(ps, tau=1, comm_dtype="float16")
        with torch.no_grad():
            ps[0][0, 0] = 1e9  # alpha (x - c) overflows float16
        avg.exchange()
        results[path] = (avg.flat_parameters()[0].clone(), avg.center_state()[0].clone(),
                         avg.stats.overflowed_exchanges)
    assert results["fused"][2] == results["torch"][2] == 0  # a rank's own inf is a flag, not a sum
    assert torch.equal(results["fused"][0], results["torch"][0])
    assert torch.equal(results["fused"][1], results["torch"][1])


def test_an_unknown_kernel_path_is_an_error(monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "triton")
    with pytest.raises(ValueError, match="EASGD_EXT_KERNELS must be 'fused' or 'torch'"):
        easgd_ext.ElasticAverager(params(torch.float32), tau=1)


def test_each_rule_offers_the_forms_its_centers_ask_for():
    for algorithm in (Elastic(0.2, 0.8), Downpour(), Averaging()):
        assert algorithm.sync is not None
    assert Averaging().asynchronous is None  # averaging all workers is synchronous by definition
    assert Elastic(0.2, 0.8).asynchronous is not None and Downpour().asynchronous is not None
