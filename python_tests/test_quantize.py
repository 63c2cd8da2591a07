"""The 8-bit wire's kernels (csrc/quantize.h) against easgd_ext.ops.reference, bit for bit:
the block quantizer (ties, zeros, Inf/NaN, denormals, blocks at the tail), the send, the owner's
re-quantized sum and the apply, on the CPU and (where present) the GPU, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICES, cuda_usable
from easgd_ext._native import native, stream_of, tensor_ref
from easgd_ext.ops import reference as ref

B = ref.QUANT_BLOCK


def run(device: str, launch) -> None:
    native.run([launch], stream_of(torch.device(device)), 2)
    if device == "cuda":
        torch.cuda.synchronize()


def send(device, x, residual, world, alpha=0.3, center=None, x_last=None, keep=None):
    n = x.numel()
    _, record = native.prepare.quant_layout(n, world)
    records = torch.zeros(world * record, dtype=torch.uint8, device=device)
    flag = torch.zeros(1, device=device)
    run(device, native.prepare.quantized_send(
        tensor_ref("x", x), None if center is None else tensor_ref("center", center),
        None if x_last is None else tensor_ref("x_last", x_last), tensor_ref("residual", residual),
        tensor_ref("records", records), world, alpha, nonfinite=tensor_ref("nonfinite", flag),
        keep=None if keep is None else tensor_ref("keep", keep)))
    return records, flag


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))


def test_layout_matches_the_reference():
    for n in (0, 1, 255, 256, 257, 4099, 1 << 20):
        for world in (1, 2, 3, 8):
            assert native.prepare.quant_layout(n, world) == ref.quant_layout(n, world)


def block_with(values: list[float], absmax: float) -> torch.Tensor:
    """One block: ``values`` first, ``absmax`` (the block's maximum) last, zeros between."""
    v = torch.zeros(B)
    v[:len(values)] = torch.tensor(values)
    v[-1] = absmax
    return v


@pytest.mark.parametrize("device", DEVICES)
def test_quantizer_edge_cases_bit_for_bit(device):
    tiny = torch.finfo(torch.float32).tiny
    blocks = torch.cat([
        block_with([2.5, -3.5, 0.5, -0.5, 1.5, 126.5, -126.5], 127.0),  # ties, inv = 1: to even
        torch.zeros(B),                                                  # all zeros: scale 0
        block_with([1e-40, -3e-41], tiny * 4),                           # denormals, small max
        block_with([1e-40, -5e-32], 1e-31),                              # below 2^-100 -> zeros
        block_with([3.0e38, -3.4e38], 3.4e38),                           # near the float32 max
        block_with([0.1, -0.7, 0.33], 0.9),                               # ordinary
    ])
    residual = torch.zeros_like(blocks)
    x, c = blocks.to(device), torch.zeros_like(blocks, device=device)
    records, flag = send(device, x, residual.to(device), 1, alpha=1.0, center=c)
    q, scale = ref.quantize_blocks(blocks)
    want = ref._records(q, scale, 0.0, blocks.numel(), 1)
    assert same_bytes(records, want)
    assert flag.item() == 0.0
    assert q[:7].tolist() == [2, -4, 0, 0, 2, 126, -126]      # half to even
    assert scale[1] == 0 and scale[3] == 0 and not q[B:2 * B].any() and not q[3 * B:4 * B].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_value_is_flagged_and_quantizes_to_something_defined(device, bad):
    v = torch.randn(3 * B + 17)
    v[B + 5] = bad
    records, flag = send(device, v.to(device), torch.zeros_like(v, device=device), 2, alpha=1.0,
                         center=torch.zeros_like(v, device=device))
    assert flag.item() == 1.0
    q, scale, _ = ref._unrecord(records.cpu(), v.numel(), 2)
    want_q, want_scale = ref.quantize_blocks(torch.cat([v, torch.zeros(q.numel() - v.numel())]))
    # Every block is exact; the bad block sends zeros (its sender is withdrawn anyway).
    assert torch.equal(q, want_q) and torch.equal(scale, want_scale)
    assert scale[1] == 0 and not q[B:2 * B].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 255, 256, 1000, 4099, 70001])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_send_matches_the_reference_bit_for_bit(device, n, world, x_dtype, gen):
    x = torch.randn(n, generator=gen).to(x_dtype)
    c = torch.randn(n, generator=gen)
    r = torch.randn(n, generator=gen) * 1e-3
    keep = torch.full((n,), float("nan"), device=device)
    records, flag = send(device, x.to(device), r.to(device), world, alpha=0.225, center=c.to(device),
                         keep=keep)
    want = ref.quantized_send(x, c, None, r, world, 0.225)
    assert same_bytes(records, want["records"])
    assert torch.equal(keep.cpu(), want["d"])
    assert flag.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_downpour_send_quantizes_the_local_change(device, gen):
    n = 5000
    x, last, r = torch.randn(n, generator=gen), torch.randn(n, generator=gen), torch.zeros(n)
    records, _ = send(device, x.to(device), r.to(device), 2, x_last=last.to(device))
    assert same_bytes(records, ref.quantized_send(x, None, last, r, 2, 1.0)["records"])


def reduce(device, received, residual, n, world, policy=0):
    chunk, record = native.prepare.quant_layout(n, world)
    own = torch.zeros(record, dtype=torch.uint8, device=device)
    run(device, native.prepare.quantized_reduce(tensor_ref("received", received), tensor_ref("own", own),
                                                tensor_ref("server_residual", residual), n, world, policy))
    return own


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("flags", [False, True])
def test_owner_sum_matches_the_reference_bit_for_bit(device, world, flags, gen):
    n = 3 * B * world + 77
    chunk, record = ref.quant_layout(n, world)
    # What this owner receives: one record of its chunk from every rank.
    parts = []
    for w in range(world):
        q, scale = ref.quantize_blocks(torch.randn(chunk, generator=gen) * (w + 1))
        parts.append(ref._records(q, scale, 1.0 if (flags and w == world - 1) else 0.0, chunk, 1))
    received = torch.cat(parts)
    residual = torch.randn(chunk, generator=gen) * 0.01
    for policy, skip in ((0, True), (1, False)):  # skip keeps the residual when a rank flagged
        got_residual = residual.clone().to(device)
        own = reduce(device, received.to(device), got_residual, n, world, policy)
        want = ref.quantized_reduce(received, residual, n, world, skip=skip)
        assert same_bytes(own, want["own"])
        assert torch.equal(got_residual.cpu(), want["server_residual"])
        assert ref._unrecord(own.cpu(), chunk, 1)[2].item() == float(flags)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", ["easgd", "downpour"])
def test_apply_matches_the_reference(device, x_dtype, rule, gen):
    n, world, alpha = 5000, 2, 0.3
    x = torch.randn(n, generator=gen).to(x_dtype)
    c, r = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 1e-3
    last = torch.randn(n, generator=gen).to(x_dtype) if rule == "downpour" else None
    sent = ref.quantized_send(x, c if last is None else None, last, r, world, alpha)["records"]
    other = ref.quantized_send(torch.randn(n, generator=gen), c, None, r, world, alpha)["records"]
    gathered = sent.clone()  # any valid records: the sum the owners published
    gathered[len(gathered) // 2:] = other[len(other) // 2:]
    status = torch.zeros(4, device=device)
    tx, tc, tr = x.clone().to(device), c.clone().to(device), r.clone().to(device)
    tl = None if last is None else last.clone().to(device)
    guard = native.prepare.Guard(tensor_ref("bad_ranks", status[1:2]), tensor_ref("me_bad", status[0:1]),
                                 0, world, tensor_ref("verdict", status[1:2]))
    run(device, native.prepare.quantized_apply(
        tensor_ref("x", tx), tensor_ref("center", tc), None if tl is None else tensor_ref("x_last", tl),
        tensor_ref("residual", tr), tensor_ref("sent", sent.to(device)),
        tensor_ref("gathered", gathered.to(device)), world, alpha, guard=guard))
    want = ref.quantized_apply(x, c, last, r, sent, gathered, world, alpha)
    assert torch.equal(tx.cpu(), want["x"]) and torch.equal(tc.cpu(), want["center"])
    assert torch.equal(tr.cpu(), want["residual"])
    if last is not None:
        assert torch.equal(tl.cpu(), want["x_last"])


@pytest.mark.parametrize("device", DEVICES)
def test_apply_skips_everything_when_a_rank_flagged_under_skip(device, gen):
    n, world = 3000, 2
    x, c, r = torch.randn(n, generator=gen), torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    sent = ref.quantized_send(x, c, None, r, world, 0.3)["records"]
    gathered = sent.clone()
    gathered[:4] = torch.tensor([1.0]).view(torch.uint8)  # one rank flagged
    status = torch.zeros(4, device=device)
    before = [t.clone() for t in (x, c, r)]
    tx, tc, tr = (t.to(device) for t in (x, c, r))
    guard = native.prepare.Guard(tensor_ref("bad_ranks", status[1:2]), tensor_ref("me_bad", status[0:1]),
                                 0, world, tensor_ref("verdict", status[1:2]))
    run(device, native.prepare.quantized_apply(
        tensor_ref("x", tx), tensor_ref("center", tc), None, tensor_ref("residual", tr),
        tensor_ref("sent", sent.to(device)), tensor_ref("gathered", gathered.to(device)), world, 0.3,
        guard=guard))
    assert all(torch.equal(a.cpu(), b) for a, b in zip((tx, tc, tr), before))
    assert status[1].item() == 1.0  # the verdict is recorded


@pytest.mark.parametrize("device", DEVICES)
def test_publish_withdraws_a_flagged_rank(device, gen):
    n, world = 2000, 3
    records = ref.quantized_send(torch.randn(n, generator=gen), torch.zeros(n), None, torch.zeros(n),
                                 world, 1.0)["records"].to(device)
    for bad in (0.0, 1.0):
        rec = records.clone()
        me_bad = torch.tensor([bad], device=device)  # held: the launch keeps only its address
        run(device, native.prepare.publish_records(tensor_ref("records", rec), n, world,
                                                   tensor_ref("me_bad", me_bad)))
        q, scale, flags = ref._unrecord(rec.cpu(), n, world)
        assert flags.tolist() == [bad] * world
        if bad:
            assert not q.any() and not scale.any()
        else:
            assert torch.equal(rec, records)  # the headers were 0 already: nothing changes


def test_byte_buffers_are_checked():
    x, c, r = torch.randn(100), torch.randn(100), torch.zeros(100)
    _, record = native.prepare.quant_layout(100, 2)
    with pytest.raises(ValueError, match="records must hold"):
        native.prepare.quantized_send(tensor_ref("x", x), tensor_ref("center", c), None, tensor_ref("residual", r),
                                      tensor_ref("records", torch.zeros(record, dtype=torch.uint8)), 2, 0.3)
    with pytest.raises(TypeError, match="records must be uint8"):
        native.prepare.quantized_send(tensor_ref("x", x), tensor_ref("center", c), None, tensor_ref("residual", r),
                                      tensor_ref("records", torch.zeros(2 * record)), 2, 0.3)
    with pytest.raises(ValueError, match="give center"):
        native.prepare.quantized_send(tensor_ref("x", x), None, None, tensor_ref("residual", r),
                                      tensor_ref("records", torch.zeros(2 * record, dtype=torch.uint8)), 2, 0.3)


@pytest.mark.skipif(not cuda_usable(), reason="needs a CUDA GPU and easgd_ext built with CUDA")
def test_cuda_and_cpu_store_the_same_bytes(gen):
    n, world = 100_003, 4
    x, c, r = torch.randn(n, generator=gen).bfloat16(), torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    a, _ = send("cpu", x, r, world, center=c)
    b, _ = send("cuda", x.cuda(), r.cuda(), world, center=c.cuda())
    assert same_bytes(a, b)
