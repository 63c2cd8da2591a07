"""The quantized wires as a collective over any rule's contribution: the wire around a rule's float
send and apply (native kernels, or torch ops under ``EASGD_EXT_KERNELS=torch``) against the fused
kernels bit for bit, the torch-level steps against the native ones, and DiLoCo and the outer
optimizer on every wire with real Gloo ranks."""

from __future__ import annotations

import os

import pytest
import torch

import easgd_ext
from dist_harness import run_ranks, values
from easgd_ext import algorithms
from easgd_ext._native import native, tensor_ref
from easgd_ext.centers import quantize_torch as qt
from easgd_ext.ops import reference as ref
from test_quantize import DEVICES, reduce, run, same_bytes, send
from test_streaming import TAU, local_step, make_params

BITS = [8, 4, 2]
WIRES = {8: torch.int8, 4: torch.int4, 2: torch.int2}


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def test_the_torch_layout_is_the_native_one():
    for bits in BITS:
        for world in (1, 2, 3, 8):
            for n in (1, 255, 256, 257, 1000, 4099, 70001):
                layout = qt.Layout(n, world, bits)
                assert (layout.chunk, layout.record) == native.prepare.quant_layout(n, world, bits)


def tied_values(n: int, gen: torch.Generator) -> torch.Tensor:
    """Values on a coarse grid: their sums over ranks land on half levels (ties) often."""
    return torch.randint(-8, 9, (n,), generator=gen).float() * 0.125


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,world", [(1000, 2), (3 * 256 * 3 + 77, 3), (70001, 2)])
def test_torch_steps_write_the_native_bytes(device, bits, n, world, gen):
    layout = qt.Layout(n, world, bits)
    for values_of in (lambda: torch.randn(n, generator=gen), lambda: tied_values(n, gen)):
        d = values_of().to(device)
        r = (torch.randn(n, generator=gen) * 1e-2).to(device)
        d[7] = 0.0  # zeros are exact
        want, want_flag = send(device, d, r, world, bits=bits)
        got, got_flag = torch.zeros_like(want), torch.zeros(1, device=device)
        qt.send(d, r, got, layout, got_flag)
        assert same_bytes(got, want) and torch.equal(got_flag, want_flag)
        # The owner's sum, with ties: each rank's records of a grid of values.
        received = torch.cat([send(device, values_of().to(device), torch.zeros(n, device=device), world,
                                   bits=bits)[0][:layout.record] for _ in range(world)])
        for policy in (0, 1):
            residual = (torch.randn(layout.chunk, generator=gen) * 1e-3).to(device)
            got_residual = residual.clone()
            want_own = reduce(device, received, residual, n, world, policy, bits)
            got_own = torch.zeros_like(want_own)
            qt.reduce(received, got_own, got_residual, layout, policy)
            assert same_bytes(got_own, want_own) and torch.equal(got_residual, residual)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("flagged,policy,me_bad", [(0.0, 0, 0.0), (1.0, 0, 0.0), (1.0, 1, 1.0), (1.0, 1, 0.0)])
def test_the_torch_apply_is_the_native_given_apply(device, bits, flagged, policy, me_bad, gen):
    n, world = 256 * 5 + 3, 2
    layout = qt.Layout(n, world, bits)
    d, r = torch.randn(n, generator=gen).to(device), (torch.randn(n, generator=gen) * 1e-2).to(device)
    sent, _ = send(device, d, r, world, bits=bits)
    gathered, _ = send(device, torch.randn(n, generator=gen).to(device), r, world, bits=bits)
    gathered[:4] = torch.tensor([flagged]).view(torch.uint8).to(device)
    status = torch.tensor([me_bad, 0.0, 0.0, 0.0], device=device)
    start = (torch.randn(n, generator=gen)).to(device)  # what the sum buffer held before
    native_sum, native_r = start.clone(), r.clone()
    guard = native.prepare.Guard(tensor_ref("bad_ranks", status[1:2]), tensor_ref("me_bad", status[0:1]),
                                 policy, world, tensor_ref("verdict", status[1:2]))
    run(device, native.prepare.quantized_apply(
        tensor_ref("x", native_sum), None, None, tensor_ref("residual", native_r), tensor_ref("sent", sent),
        tensor_ref("gathered", gathered), world, guard=guard, keep=tensor_ref("keep", d), bits=bits))
    torch_sum, torch_r = start.clone(), r.clone()
    qt.apply(torch_sum, torch_r, d, sent, gathered, layout, policy, status[0:1])
    assert torch.equal(native_r, torch_r)
    if not (flagged and policy == 0):  # a skipped exchange leaves the sum buffer unread
        assert torch.equal(native_sum, torch_sum)
        want = ref.dequantize_blocks(*ref._unrecord(gathered.cpu(), n, world, bits)[:2])[:n]
        assert torch.equal(torch_sum.cpu(), want)
    expect_r = r if (flagged and policy == 0) or me_bad else (d + r) - ref.dequantize_blocks(
        *[t.to(device) for t in ref._unrecord(sent.cpu(), n, world, bits)[:2]])[:n]
    assert torch.equal(torch_r, expect_r)


def test_the_given_contribution_is_checked():
    x, r = torch.randn(100), torch.zeros(100)
    _, record = native.prepare.quant_layout(100, 2)
    records = torch.zeros(2 * record, dtype=torch.uint8)
    with pytest.raises(TypeError, match="x, the contribution, must be float32"):
        native.prepare.quantized_send(tensor_ref("x", x.bfloat16()), None, None, tensor_ref("residual", r),
                                      tensor_ref("records", records), 2)
    with pytest.raises(ValueError, match="without a center, give keep"):
        native.prepare.quantized_apply(tensor_ref("x", x), None, None, tensor_ref("residual", r),
                                       tensor_ref("sent", records), tensor_ref("gathered", records), 2)


# ---- with real ranks --------------------------------------------------------------------------------
def _train(rank: int, cls: type, kwargs: dict, steps: int, path: str) -> dict:
    """``path``: "fused" (the rule's fused kernels), "around" (the wire around the rule's float
    steps, native), "torch" (every step in torch ops)."""
    os.environ["EASGD_EXT_KERNELS"] = "torch" if path == "torch" else "fused"
    saved = algorithms.ElasticSync.quantized_send, algorithms.DownpourSync.quantized_send
    if path == "around":  # as a rule without fused kernels is run
        algorithms.ElasticSync.quantized_send = algorithms.SyncRule.quantized_send
        algorithms.DownpourSync.quantized_send = algorithms.SyncRule.quantized_send
    try:
        params = make_params()
        avg = cls(params, tau=TAU, **kwargs)
        for t in range(1, steps + 1):
            local_step(params, rank, t)
            avg.step()
        avg.flush()
        return {"x": avg.flat_parameters()[0].clone(), "center": avg.center_state()[0].clone(),
                "exchanges": avg.stats.exchanges}
    finally:
        algorithms.ElasticSync.quantized_send, algorithms.DownpourSync.quantized_send = saved
        os.environ.pop("EASGD_EXT_KERNELS")


def three_paths(rank: int, world: int, bits: int) -> dict:
    wire = WIRES[bits]
    cases = {"easgd": (easgd_ext.ElasticAverager, {"fragments": 3, "delay": 1, "comm_dtype": wire}),
             "downpour": (easgd_ext.DownpourAverager, {"fragments": 2, "comm_dtype": wire})}
    return {name: {path: _train(rank, cls, kw, 21, path) for path in ("fused", "around", "torch")}
            for name, (cls, kw) in cases.items()}


@pytest.mark.parametrize("bits", BITS)
def test_the_wire_around_a_rules_float_steps_is_its_fused_wire_bit_for_bit(bits):
    for out in values(run_ranks(3, three_paths, bits)):
        for name, paths in out.items():
            for path in ("around", "torch"):
                assert torch.equal(paths[path]["x"], paths["fused"]["x"]), (name, path)
                assert torch.equal(paths[path]["center"], paths["fused"]["center"]), (name, path)


def outer_rules(rank: int, world: int, bits: int) -> dict:
    wire = WIRES[bits]
    cases = {"diloco": (easgd_ext.DiLoCoAverager, {"fragments": 2}),
             "streaming": (easgd_ext.DiLoCoAverager, {"fragments": 2, "delay": 1, "fragment_update_alpha": 0.5}),
             "outer": (easgd_ext.ElasticAverager, {"outer_momentum": 0.9, "fragments": 2, "delay": 1})}
    out = {}
    for name, (cls, kw) in cases.items():
        out[name] = {"float": _train(rank, cls, kw, 24, "fused"),
                     "native": _train(rank, cls, {**kw, "comm_dtype": wire}, 24, "fused"),
                     "torch": _train(rank, cls, {**kw, "comm_dtype": wire}, 24, "torch")}
    return out


@pytest.mark.parametrize("bits", BITS)
def test_diloco_and_the_outer_optimizer_ride_every_quantized_wire(bits):
    outs = values(run_ranks(3, outer_rules, bits))
    bound = {8: 0.02, 4: 0.2, 2: 0.5}[bits]
    for name in ("diloco", "streaming", "outer"):
        for out in outs:
            runs = out[name]
            assert runs["native"]["exchanges"] > 0
            assert torch.equal(runs["native"]["center"], outs[0][name]["native"]["center"])  # every rank
            assert torch.equal(runs["torch"]["center"], runs["native"]["center"])  # torch ops, same bytes
            assert torch.equal(runs["torch"]["x"], runs["native"]["x"])
            err = float((runs["native"]["center"] - runs["float"]["center"]).abs().max())
            assert 0 < err < bound, (name, bits, err)


def diloco_resume(rank: int, world: int) -> dict:
    kwargs = {"comm_dtype": torch.int4, "fragments": 2, "delay": 1}
    straight = _train(rank, easgd_ext.DiLoCoAverager, kwargs, 23, "fused")
    params = make_params()
    avg = easgd_ext.DiLoCoAverager(params, tau=TAU, **kwargs)
    for t in range(1, 11):
        local_step(params, rank, t)
        avg.step()
    in_flight = avg.in_flight
    saved = {"model": [p.detach().clone() for p in params], "avg": avg.state_dict()}
    params = make_params(seed=5)
    avg = easgd_ext.DiLoCoAverager(params, tau=TAU, **kwargs)
    with torch.no_grad():
        for p, s in zip(params, saved["model"]):
            p.copy_(s)
    avg.load_state_dict(saved["avg"])
    for t in range(11, 24):
        local_step(params, rank, t)
        avg.step()
    avg.flush()
    return {"same_x": torch.equal(avg.flat_parameters()[0], straight["x"]),
            "same_c": torch.equal(avg.center_state()[0], straight["center"]), "in_flight": in_flight}


def test_a_quantized_streaming_diloco_resumes_exactly_with_a_fragment_in_flight():
    for out in values(run_ranks(2, diloco_resume)):
        assert out["in_flight"] == 1
        assert out["same_x"] and out["same_c"]
