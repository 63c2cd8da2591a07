"""The quantized wires' kernels (csrc/quantize.h: 8, 4 and 2 bits a value) against
easgd_ext.ops.reference, bit for bit: the block quantizer (ties, zeros, Inf/NaN, denormals,
blocks at the tail), the packing, the send, the owner's re-quantized sum and the apply, on the
CPU and (where present) the GPU, on fresh random inputs; and error feedback over many
exchanges of several simulated ranks."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICES, cuda_usable
from easgd_ext._native import native, stream_of, tensor_ref
from easgd_ext.ops import reference as ref

B = ref.QUANT_BLOCK
BITS = [8, 4, 2]


def run(device: str, launch) -> None:
    native.run([launch], stream_of(torch.device(device)), 2)
    if device == "cuda":
        torch.cuda.synchronize()


def send(device, x, residual, world, alpha=0.3, center=None, x_last=None, keep=None, bits=8):
    n = x.numel()
    _, record = native.prepare.quant_layout(n, world, bits)
    records = torch.zeros(world * record, dtype=torch.uint8, device=device)
    flag = torch.zeros(1, device=device)
    run(device, native.prepare.quantized_send(
        tensor_ref("x", x), None if center is None else tensor_ref("center", center),
        None if x_last is None else tensor_ref("x_last", x_last), tensor_ref("residual", residual),
        tensor_ref("records", records), world, alpha, nonfinite=tensor_ref("nonfinite", flag),
        keep=None if keep is None else tensor_ref("keep", keep), bits=bits))
    return records, flag


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))


def test_layout_matches_the_reference():
    for bits in BITS:
        for n in (0, 1, 255, 256, 257, 4099, 1 << 20):
            for world in (1, 2, 3, 8):
                assert native.prepare.quant_layout(n, world, bits) == ref.quant_layout(n, world, bits)
    # a value's bytes: 1, 1/2, 1/4 (+ 4 bytes of scale per 256 values, a 64-byte header)
    assert [ref.quant_layout(1 << 20, 1, b)[1] for b in BITS] == [64 + 16384 + (1 << 20) * b // 8 for b in BITS]
    with pytest.raises(ValueError, match="bits must be 8, 4 or 2"):
        native.prepare.quant_layout(100, 2, 3)


@pytest.mark.parametrize("bits", [4, 2])
def test_packing_round_trips_every_level(bits):
    top = ref.quant_clamp(bits)
    levels = torch.arange(-top, top + 1, dtype=torch.int8)
    q = levels.repeat(8 * B // levels.numel() + 1)[:8 * B]
    q = q[torch.randperm(q.numel())]
    packed = ref.pack_levels(q, bits)
    assert packed.numel() == q.numel() * bits // 8
    assert torch.equal(ref.unpack_levels(packed, bits), q)
    # the documented order: value j at bit (j % (8 / bits)) * bits, two's complement
    first = torch.tensor([-1, 1] + [0] * (8 // bits - 2), dtype=torch.int8)
    assert ref.pack_levels(first, bits).item() == (1 << bits) - 1 | (1 << bits)


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
@pytest.mark.parametrize("bits", [4, 2])
def test_narrow_quantizer_edge_cases_bit_for_bit(device, bits):
    tiny = torch.finfo(torch.float32).tiny
    top = float(ref.quant_levels(bits))  # a block maximum of L scales (4 bits: inv = 1, the ties exact)
    blocks = torch.cat([
        block_with([0.5, -0.5, 1.5, -1.5, 2.5, -top + 0.5, top - 0.5, 0.49], top),  # ties to even
        torch.zeros(B),
        block_with([1e-40, -3e-41], tiny * 4),
        block_with([1e-40, -5e-32], 1e-31),
        block_with([3.0e38, -3.4e38], 3.4e38),
        torch.randn(B),
    ])
    x, c = blocks.to(device), torch.zeros_like(blocks, device=device)
    records, flag = send(device, x, torch.zeros_like(x), 1, alpha=1.0, center=c, bits=bits)
    q, scale = ref.quantize_blocks(blocks, bits)
    assert same_bytes(records, ref._records(q, scale, 0.0, blocks.numel(), 1, bits))
    assert flag.item() == 0.0
    # to nearest, ties to even; 4 bits: inv = 7 / 7, clamped to -7..7; 2 bits: the block's
    # maximum (2.5) spans two scales, inv = 2 / 2.5, levels clamped to -1..1
    want = {4: [0, 0, 2, -2, 2, -6, 6, 0], 2: [0, 0, 1, -1, 1, -1, 1, 0]}[bits]
    assert q[:8].tolist() == want
    assert int(q.abs().max()) == ref.quant_clamp(bits) and scale[1] == 0 and scale[3] == 0
    if bits == 2:
        assert scale[0] == torch.tensor(2.5) / 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("bits", BITS)
def test_a_non_finite_value_is_flagged_and_quantizes_to_something_defined(device, bad, bits):
    v = torch.randn(3 * B + 17)
    v[B + 5] = bad
    records, flag = send(device, v.to(device), torch.zeros_like(v, device=device), 2, alpha=1.0,
                         center=torch.zeros_like(v, device=device), bits=bits)
    assert flag.item() == 1.0
    q, scale, _ = ref._unrecord(records.cpu(), v.numel(), 2, bits)
    want_q, want_scale = ref.quantize_blocks(torch.cat([v, torch.zeros(q.numel() - v.numel())]), bits)
    # Every block is exact; the bad block sends zeros (its sender is withdrawn anyway).
    assert torch.equal(q, want_q) and torch.equal(scale, want_scale)
    assert scale[1] == 0 and not q[B:2 * B].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 255, 256, 1000, 4099, 70001])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", BITS)
def test_send_matches_the_reference_bit_for_bit(device, n, world, x_dtype, bits, gen):
    x = torch.randn(n, generator=gen).to(x_dtype)
    c = torch.randn(n, generator=gen)
    r = torch.randn(n, generator=gen) * 1e-3
    keep = torch.full((n,), float("nan"), device=device)
    records, flag = send(device, x.to(device), r.to(device), world, alpha=0.225, center=c.to(device),
                         keep=keep, bits=bits)
    want = ref.quantized_send(x, c, None, r, world, 0.225, bits)
    assert same_bytes(records, want["records"])
    assert torch.equal(keep.cpu(), want["d"])
    assert flag.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", BITS)
def test_downpour_send_quantizes_the_local_change(device, bits, gen):
    n = 5000
    x, last, r = torch.randn(n, generator=gen), torch.randn(n, generator=gen), torch.zeros(n)
    records, _ = send(device, x.to(device), r.to(device), 2, x_last=last.to(device), bits=bits)
    assert same_bytes(records, ref.quantized_send(x, None, last, r, 2, 1.0, bits)["records"])


def reduce(device, received, residual, n, world, policy=0, bits=8):
    chunk, record = native.prepare.quant_layout(n, world, bits)
    own = torch.zeros(record, dtype=torch.uint8, device=device)
    run(device, native.prepare.quantized_reduce(tensor_ref("received", received), tensor_ref("own", own),
                                                tensor_ref("server_residual", residual), n, world, policy,
                                                bits=bits))
    return own


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("flags", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_owner_sum_matches_the_reference_bit_for_bit(device, world, flags, bits, gen):
    n = 3 * B * world + 77
    chunk, record = ref.quant_layout(n, world, bits)
    # What this owner receives: one record of its chunk from every rank.
    parts = []
    for w in range(world):
        q, scale = ref.quantize_blocks(torch.randn(chunk, generator=gen) * (w + 1), bits)
        parts.append(ref._records(q, scale, 1.0 if (flags and w == world - 1) else 0.0, chunk, 1, bits))
    received = torch.cat(parts)
    residual = torch.randn(chunk, generator=gen) * 0.01
    for policy, skip in ((0, True), (1, False)):  # skip keeps the residual when a rank flagged
        got_residual = residual.clone().to(device)
        own = reduce(device, received.to(device), got_residual, n, world, policy, bits)
        want = ref.quantized_reduce(received, residual, n, world, skip=skip, bits=bits)
        assert same_bytes(own, want["own"])
        assert torch.equal(got_residual.cpu(), want["server_residual"])
        assert ref._unrecord(own.cpu(), chunk, 1, bits)[2].item() == float(flags)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", ["easgd", "downpour"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [5000, 256 * 7 + 3])
def test_apply_matches_the_reference(device, x_dtype, rule, bits, n, gen):
    world, alpha = 2, 0.3
    x = torch.randn(n, generator=gen).to(x_dtype)
    c, r = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 1e-3
    last = torch.randn(n, generator=gen).to(x_dtype) if rule == "downpour" else None
    sent = ref.quantized_send(x, c if last is None else None, last, r, world, alpha, bits)["records"]
    other = ref.quantized_send(torch.randn(n, generator=gen), c, None, r, world, alpha, bits)["records"]
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
        tensor_ref("gathered", gathered.to(device)), world, alpha, guard=guard, bits=bits))
    want = ref.quantized_apply(x, c, last, r, sent, gathered, world, alpha, bits=bits)
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
    with pytest.raises(ValueError, match="give center .EASGD., x_last .DOWNPOUR. or neither"):
        native.prepare.quantized_send(tensor_ref("x", x), tensor_ref("center", c), tensor_ref("x_last", x),
                                      tensor_ref("residual", r),
                                      tensor_ref("records", torch.zeros(2 * record, dtype=torch.uint8)), 2, 0.3)


@pytest.mark.skipif(not cuda_usable(), reason="needs a CUDA GPU and easgd_ext built with CUDA")
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_cuda_and_cpu_store_the_same_bytes(bits, offset, gen):
    n, world = 100_003, 4  # views at odd element offsets: the kernels assume no alignment
    x = torch.randn(n + offset, generator=gen).bfloat16()[offset:]
    c, r = torch.randn(n + offset, generator=gen)[offset:], torch.randn(n + offset, generator=gen)[offset:]
    a, _ = send("cpu", x, r, world, center=c, bits=bits)
    b, _ = send("cuda", x.cuda(), r.cuda(), world, center=c.cuda(), bits=bits)
    assert same_bytes(a, b)


def simulated_exchange(xs, center, residuals, server_residuals, alpha, bits, feedback=True):
    """One synchronous exchange of len(xs) ranks through the native kernels in one process:
    each rank's send, the all-to-all (record w to owner w), each owner's reduce, the
    all-gather, each rank's apply (the centers are one tensor per rank, all equal)."""
    world, n = len(xs), xs[0].numel()
    chunk, record = native.prepare.quant_layout(n, world, bits)
    sends = []
    for i in range(world):
        if not feedback:
            residuals[i].zero_()
        rec, _ = send("cpu", xs[i], residuals[i], world, alpha=alpha, center=center[i], bits=bits)
        sends.append(rec)
    owners = []
    for w in range(world):
        received = torch.cat([sends[i][w * record:(w + 1) * record] for i in range(world)])
        if not feedback:
            server_residuals[w].zero_()
        owners.append(reduce("cpu", received, server_residuals[w], n, world, 0, bits))
    gathered = torch.cat(owners)
    for i in range(world):
        status = torch.zeros(4)
        guard = native.prepare.Guard(tensor_ref("bad_ranks", status[1:2]), tensor_ref("me_bad", status[0:1]),
                                     0, world, tensor_ref("verdict", status[1:2]))
        run("cpu", native.prepare.quantized_apply(
            tensor_ref("x", xs[i]), tensor_ref("center", center[i]), None, tensor_ref("residual", residuals[i]),
            tensor_ref("sent", sends[i]), tensor_ref("gathered", gathered), world, alpha, guard=guard, bits=bits))


@pytest.mark.parametrize("bits", BITS)
def test_error_feedback_keeps_the_cumulative_center_update_within_one_step(bits, gen):
    """Over 1,000 exchanges the center's total change stays within one quantization step per
    element of the exact sum of every rank's d (what the wire has not delivered yet sits in
    the residuals); without feedback the error grows far beyond that."""
    world, n, alpha, exchanges = 2, 2 * B, 0.45, 1000
    q_max = ref.quant_levels(bits)
    errors = {}
    for feedback in (True, False):
        g = torch.Generator().manual_seed(1234)
        xs = [torch.randn(n, generator=g) for _ in range(world)]
        start = torch.zeros(n)
        center = [start.clone() for _ in range(world)]
        residuals = [torch.zeros(n) for _ in range(world)]
        server = [torch.zeros(native.prepare.quant_layout(n, world, bits)[0]) for _ in range(world)]
        exact = torch.zeros(n, dtype=torch.float64)
        step = torch.zeros(n, dtype=torch.float64)  # the largest quantization step seen, per element
        for _ in range(exchanges):
            for x in xs:  # local progress: each worker drifts its own way
                x.add_(torch.randn(n, generator=g) * 0.05 + 0.01)
            ds = [alpha * (x.double() - center[0].double()) for x in xs]
            exact += sum(ds)
            block_max = torch.stack([d.reshape(-1, B).abs().amax(1) for d in ds]).sum(0)
            step = torch.maximum(step, (block_max / q_max).repeat_interleave(B))
            simulated_exchange(xs, center, residuals, server, alpha, bits, feedback)
        assert all(torch.equal(center[0], c) for c in center[1:])  # replicas bit-identical
        errors[feedback] = ((center[0].double() - start.double()) - exact).abs() / step
    assert errors[True].max() <= 1.0, errors[True].max()
    worst = float(errors[False].max())
    assert worst > 1.0 and worst > 10 * float(errors[True].max()), (worst, errors[True].max())
