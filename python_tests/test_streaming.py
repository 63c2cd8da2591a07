"""The streamed exchange, with real Gloo ranks: fragments at their own phases of tau, sums applied
``delay`` steps after their send, the 8-bit wire with error feedback. Against a float64
simulation of the same schedule; centers bit-identical across ranks; exact resume from a
checkpoint taken with fragments in flight; a rank killed with a fragment in flight."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

import easgd_ext
from dist_harness import nccl_world_one, run_ranks, values
from easgd_ext._native import native, tensor_ref
from easgd_ext.ops import reference as ref
from easgd_ext.settings import GLOO_WIRE_CHUNK_BYTES

SHAPES = [(300,), (17, 33), (2000,), (5, 5, 3, 3)]
TAU = 4


def make_params(seed: int = 0, dtype=torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def local_step(params, rank: int, step: int, scale: float = 0.05) -> None:
    """A deterministic stand-in for an optimizer step, different on every rank."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype), alpha=scale)


def train(rank: int, world: int, steps: int, kwargs: dict) -> dict:
    params = make_params()
    avg = easgd_ext.ElasticAverager(params, tau=TAU, **kwargs)
    for t in range(1, steps + 1):
        local_step(params, rank, t)
        avg.step()
    plans = [(p.offset, [(p_.start, p_.end) for p_ in p.pieces]) for p in avg._center.plans]
    return {"x": avg.flat_parameters()[0].clone(), "center": avg.center_state()[0].clone(),
            "plans": plans, "stats": avg.stats, "in_flight": avg.in_flight, "alpha": avg.alpha}


def simulate(world: int, steps: int, fragments: list, delay: int, alpha: float) -> tuple:
    """The same schedule in float64: fragment j's d_i = alpha (x_i - c) at its send clock t,
    then at t + delay: x_i -= d_i and c += sum_i d_i (over the fragment's elements)."""
    from easgd_ext.flat_params import flatten

    def noise(rank: int, t: int) -> torch.Tensor:
        zeros = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
        flat = flatten(zeros)[0].flat  # the same slots as the averager's buffer
        local_step(zeros, rank, t)
        return flat.double()

    start = flatten(make_params())[0].flat.double()
    x = [start.clone() for _ in range(world)]
    c = start.clone()
    pending: list[tuple[int, list, list]] = []

    def complete(t: int) -> None:
        for item in [p for p in pending if p[0] <= t]:
            _, ranges, ds = item
            for k, (a, b) in enumerate(ranges):
                for rank in range(world):
                    x[rank][a:b] -= ds[rank][k]
                c[a:b] += sum(ds[rank][k] for rank in range(world))
            pending.remove(item)

    for t in range(1, steps + 1):
        for rank in range(world):
            x[rank] += noise(rank, t)
        complete(t)
        for offset, ranges in fragments:
            if (t - offset) % TAU == 0:
                ds = [[alpha * (x[rank][a:b] - c[a:b]) for a, b in ranges] for rank in range(world)]
                pending.append((t + delay, ranges, ds))
        complete(t)
    return x, c


@pytest.mark.parametrize("fragments,delay", [(1, 0), (4, 0), (4, 1), (3, 3)])
def test_fragments_and_delay_match_a_float64_simulation(fragments, delay):
    world, steps = 3, 23
    outs = values(run_ranks(world, train, steps, {"fragments": fragments, "delay": delay}))
    x, c = simulate(world, steps, outs[0]["plans"], delay, outs[0]["alpha"])
    for rank, out in enumerate(outs):
        assert torch.equal(out["center"], outs[0]["center"])  # replicas bit-identical
        scale = x[rank].abs() + c.abs() + 1
        assert ((out["x"].double() - x[rank]).abs() <= 1e-5 * scale).all()
        assert ((out["center"].double() - c).abs() <= 1e-5 * scale).all()
    # in flight at the end: the fragments sent in the last `delay` steps
    assert outs[0]["in_flight"] == sum(
        any(((steps - k) - off) % TAU == 0 for k in range(delay)) for off, _ in outs[0]["plans"])


@pytest.mark.parametrize("comm", ["int8", "int4", "int2", "bfloat16"])
def test_centers_stay_bit_identical_across_ranks(comm):
    outs = values(run_ranks(3, train, 30, {"fragments": 3, "delay": 2, "comm_dtype": comm}))
    for out in outs[1:]:
        assert torch.equal(out["center"], outs[0]["center"])
    assert not torch.equal(outs[0]["x"], outs[1]["x"])  # the workers differ, the center does not


def close_to_float_wire(rank: int, world: int) -> dict:
    return {**{q: train(rank, world, 40, {"comm_dtype": q})["center"] for q in ("int8", "int4", "int2")},
            "fp32": train(rank, world, 40, {})["center"]}


def test_the_quantized_wires_stay_close_to_the_float_wire():
    for out in values(run_ranks(2, close_to_float_wire)):
        err = {q: float((out[q] - out["fp32"]).abs().max()) for q in ("int8", "int4", "int2")}
        assert 0 < err["int8"] < 0.02, err
        # fewer levels, more error in flight (held in the residuals, not lost): bounded still
        assert err["int8"] < err["int4"] < 0.2 and err["int4"] < err["int2"] < 0.5, err


def resume(rank: int, world: int, comm: str | None, fragments: int, delay: int, cut: int) -> dict:
    """23 steps straight, and the same 23 steps with a checkpoint after `cut` of them, loaded
    into a new model and averager: bit for bit the same."""
    kwargs = {"fragments": fragments, "delay": delay, "comm_dtype": comm}
    straight = train(rank, world, 23, kwargs)
    params = make_params()
    avg = easgd_ext.ElasticAverager(params, tau=TAU, **kwargs)
    for t in range(1, cut + 1):
        local_step(params, rank, t)
        avg.step()
    in_flight = avg.in_flight
    saved = {"model": [p.detach().clone() for p in params], "avg": avg.state_dict()}
    del avg
    params = make_params(seed=7)  # a different start: everything must come from the checkpoint
    avg = easgd_ext.ElasticAverager(params, tau=TAU, **kwargs)
    with torch.no_grad():
        for p, s in zip(params, saved["model"]):
            p.copy_(s)
    avg.load_state_dict(saved["avg"])
    for t in range(cut + 1, 24):
        local_step(params, rank, t)
        avg.step()
    return {"same_x": torch.equal(avg.flat_parameters()[0], straight["x"]),
            "same_c": torch.equal(avg.center_state()[0], straight["center"]),
            "in_flight_at_cut": in_flight}


@pytest.mark.parametrize("comm", [None, "int8", "int2"])
def test_resume_from_a_checkpoint_with_fragments_in_flight_is_exact(comm):
    for out in values(run_ranks(2, resume, comm, 4, 2, 10)):
        assert out["in_flight_at_cut"] >= 1
        assert out["same_x"] and out["same_c"]


def killed_in_flight(rank: int, world: int) -> dict:
    params = make_params()
    avg = easgd_ext.ElasticAverager(params, tau=TAU, fragments=2, delay=2, exchange_timeout=20)
    t = 0
    while avg.in_flight == 0 or t < TAU:  # until a fragment has been sent and is in flight
        t += 1
        local_step(params, rank, t)
        avg.step()
    if rank == world - 1:
        os._exit(0)  # dies with a fragment in flight
    # The collective the dead rank had already posted may still complete; the first one it never
    # joined cannot. Step (no local steps: anything that changes x is an exchange) until then,
    # and check that the failing step applied nothing.
    start = time.monotonic()
    for _ in range(3 * TAU):
        before_x, before_c = avg.flat_parameters()[0].clone(), avg.center_state()[0].clone()
        try:
            avg.step()
        except easgd_ext.ExchangeError as exc:
            return {"error": str(exc), "seconds": time.monotonic() - start,
                    "same_x": torch.equal(avg.flat_parameters()[0], before_x),
                    "same_c": torch.equal(avg.center_state()[0], before_c), "in_flight": avg.in_flight}
    return {"error": None}


def test_a_rank_killed_with_a_fragment_in_flight_applies_nothing_of_it():
    results = run_ranks(3, killed_in_flight, casualties=(2,), timeout=120)
    for r in results[:2]:
        out = r.value
        assert r.error is None, r.traceback
        assert out["error"] is not None and "nothing was applied" in out["error"]
        assert out["same_x"] and out["same_c"] and out["in_flight"] == 0
        assert out["seconds"] < 25


# ---- error feedback ------------------------------------------------------------------------------
def repeated_exchanges(d: torch.Tensor, exchanges: int, feedback: bool) -> torch.Tensor:
    """The 8-bit wire's kernels, one rank, the same change ``d`` sent every time (DOWNPOUR's
    rule with x - x_last = d): the float64 sum of what the center received."""
    n = d.numel()
    chunk, record = native.prepare.quant_layout(n, 1)
    x, last, c = d.clone(), torch.zeros(n), torch.zeros(n)
    residual, server = torch.zeros(n), torch.zeros(chunk)
    sent = torch.zeros(record, dtype=torch.uint8)
    own = torch.zeros(record, dtype=torch.uint8)
    status = torch.zeros(4)
    refs = {k: tensor_ref(k, v) for k, v in dict(x=x, x_last=last, center=c, residual=residual,
                                                 records=sent, own=own, server_residual=server).items()}
    guard = native.prepare.Guard(tensor_ref("bad_ranks", status[1:2]), tensor_ref("me_bad", status[0:1]), 0, 1)
    launches = [native.prepare.quantized_send(refs["x"], None, refs["x_last"], refs["residual"], refs["records"], 1),
                native.prepare.quantized_reduce(refs["records"], refs["own"], refs["server_residual"], n, 1),
                native.prepare.quantized_apply(refs["x"], refs["center"], refs["x_last"], refs["residual"],
                                               refs["records"], tensor_ref("gathered", own), 1, guard=guard)]
    received = torch.zeros(n, dtype=torch.float64)
    for _ in range(exchanges):
        c.zero_()
        native.run(launches, 0, 2)
        received += c.double()  # this exchange's deq(sum)
        x.copy_(d)
        last.zero_()
        if not feedback:
            residual.zero_()
            server.zero_()
    return received


def test_error_feedback_keeps_the_cumulative_sum_within_one_quantization_step():
    g = torch.Generator().manual_seed(5)
    d = torch.randn(4096, generator=g) * torch.rand(4096, generator=g)  # blocks of mixed scales
    k = 1000
    exact = k * d.double()
    step = d.abs().reshape(-1, ref.QUANT_BLOCK).amax(1).repeat_interleave(ref.QUANT_BLOCK).double() / 127
    with_feedback = repeated_exchanges(d, k, feedback=True)
    assert ((with_feedback - exact).abs() <= 1.05 * step).all()
    without = repeated_exchanges(d, k, feedback=False)
    assert ((without - exact).abs() > 10 * step).float().mean() > 0.5  # visibly drifts


# ---- bytes and arguments -------------------------------------------------------------------------
def bytes_per_exchange(rank: int, world: int, comm: str | None, chunk: int | None = None) -> int:
    if chunk is not None:
        os.environ["EASGD_EXT_GLOO_CHUNK_BYTES"] = str(chunk)
    params = [torch.nn.Parameter(torch.randn(1_000_000))]
    avg = easgd_ext.ElasticAverager(params, tau=1, comm_dtype=comm)
    avg.exchange()
    return avg.stats.bytes_sent


@pytest.mark.parametrize("world,chunk", [(2, None), (4, None), (2, 1 << 20)])
def test_the_quantized_wires_send_a_quarter_an_eighth_a_sixteenth_of_the_float32_bytes(world, chunk):
    fp32 = values(run_ranks(world, bytes_per_exchange, None))[0]
    assert fp32 == 2 * (world - 1) * (4 * (1_000_000 + 64)) // world  # a ring all-reduce
    for comm, bits in (("int8", 8), ("int4", 4), ("int2", 2)):
        sent = values(run_ranks(world, bytes_per_exchange, comm, chunk))[0]
        # Over Gloo the wire cuts the buffer into quantized units whose values take
        # GLOO_WIRE_CHUNK_BYTES (or EASGD_EXT_GLOO_CHUNK_BYTES) per peer (whole blocks per
        # owner), each with its own record.
        unit = ref.QUANT_BLOCK * world
        cut = (chunk or GLOO_WIRE_CHUNK_BYTES) * (8 // bits) * world // unit * unit
        lengths = [min(cut, 1_000_000 - lo) for lo in range(0, 1_000_000, cut)]
        records = sum(ref.quant_layout(n, world, bits)[1] for n in lengths)
        assert sent == 2 * (world - 1) * records  # all-to-all out, all-gather out
        # the values' bits plus 4 bytes of scale per 256 values (and the padding)
        assert sent <= (bits / 32 + 1 / 256 + 0.002) * fp32


def build_with_chunk(rank: int, world: int, chunks: list[str]) -> str:
    os.environ["EASGD_EXT_GLOO_CHUNK_BYTES"] = chunks[rank]
    try:
        easgd_ext.ElasticAverager([torch.nn.Parameter(torch.randn(4096))], tau=1, comm_dtype=torch.int4)
    except (ValueError, RuntimeError) as exc:
        return str(exc)
    return "built"


def test_the_gloo_piece_size_must_be_valid_and_alike_on_every_rank():
    # different pieces would pair one rank's all_to_all with another's of another size
    said = values(run_ranks(2, build_with_chunk, ["65536", "1048576"]))
    assert all("ranks disagree: gloo_chunk_bytes" in s and "65536" in s for s in said), said
    said = values(run_ranks(2, build_with_chunk, ["65536", "64k"]))
    assert all("EASGD_EXT_GLOO_CHUNK_BYTES must be a whole number of bytes" in s for s in said), said
    assert values(run_ranks(2, build_with_chunk, ["1048576", "1048576"])) == ["built", "built"]


def test_arguments_of_the_streamed_exchange_are_checked():
    p = make_params()
    with pytest.raises(ValueError, match=r"delay must be in \[0, tau\)"):
        easgd_ext.ElasticAverager(p, tau=4, delay=4)
    with pytest.raises(TypeError, match="fragments must be an int"):
        easgd_ext.ElasticAverager(make_params(), tau=4, fragments=2.0)
    with pytest.raises(ValueError, match="fragments must be >= 1"):
        easgd_ext.ElasticAverager(make_params(), tau=4, fragments=0)
    with pytest.raises(ValueError, match="delay=1: DownpourAverager cannot apply"):
        easgd_ext.DownpourAverager(make_params(), tau=4, delay=1)
    with pytest.raises(ValueError, match="PeriodicAverager has no quantized wire .*sends the parameters themselves"):
        easgd_ext.PeriodicAverager(make_params(), tau=4, comm_dtype=torch.int8)
    with pytest.raises(ValueError, match="fragments, delay apply to mode='sync'"):
        easgd_ext.ElasticAverager(make_params(), tau=4, mode="async", fragments=2, delay=1)


def test_downpour_and_averaging_stream_their_fragments():
    for make in (easgd_ext.DownpourAverager, easgd_ext.PeriodicAverager):
        params = make_params()
        avg = make(params, tau=4, fragments=4)
        for t in range(1, 9):
            local_step(params, 0, t)
            assert avg.step()  # one fragment every step
        assert avg.stats.exchanges == 8


def test_flush_and_close_apply_what_is_in_flight():
    params = make_params()
    avg = easgd_ext.ElasticAverager(params, tau=4, fragments=4, delay=3)
    for t in range(1, 4):
        local_step(params, 0, t)
        avg.step()
    assert avg.in_flight == 3
    avg.flush()
    assert avg.in_flight == 0 and avg.stats.exchanges == 3
    local_step(params, 0, 4)
    avg.step()
    assert avg.in_flight == 1
    avg.close()
    assert avg.in_flight == 0 and avg.stats.exchanges == 4


# ---- where the host (or the stream) waits -------------------------------------------------------
class CountedWaits:
    """Wraps the collectives' works so that each wait() is recorded with the clock it came at."""

    def __init__(self, avg) -> None:
        self.avg, self.waits, self.saved = avg, [], {}

    def __enter__(self):
        for name in ("all_reduce", "all_to_all_single", "all_gather_into_tensor", "all_gather_single"):
            if hasattr(dist, name):
                self.saved[name] = getattr(dist, name)
                setattr(dist, name, self.wrap(self.saved[name]))
        import easgd_ext._dist as d
        self.saved_gather, d._all_gather = d._all_gather, self.wrap(d._all_gather)
        return self

    def wrap(self, fn):
        def call(*args, **kwargs):
            work = fn(*args, **kwargs)
            if work is None:
                return None
            counter = self

            class Work:
                def wait(self, *a):
                    counter.waits.append(counter.avg.clock)
                    return work.wait(*a)
            return Work()
        return call

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)
        import easgd_ext._dist as d
        d._all_gather = self.saved_gather


def waits_of_a_delayed_exchange(rank: int, world: int, device: str, comm: str | None) -> dict:
    params = [torch.nn.Parameter(torch.randn(10_000, device=device))]
    avg = easgd_ext.ElasticAverager(params, tau=4, fragments=2, delay=3, comm_dtype=comm)
    sent = {}
    with CountedWaits(avg) as counted:
        for t in range(1, 9):
            before = avg.in_flight
            avg.step()
            if avg.in_flight > before:
                sent[t] = True
    return {"waits": counted.waits, "sent": sorted(sent)}


@pytest.mark.parametrize("comm", [None, "int8"])
def test_a_delayed_fragment_is_waited_for_only_at_its_apply_step(comm):
    """Fragments (offsets 0 and 2 of tau 4) are sent at clocks 2, 4, 6, 8 and applied three
    steps later: nothing waits at the send (Gloo's host moves an 8-bit exchange on one step
    after its send, at the same clock on every rank)."""
    for out in values(run_ranks(2, waits_of_a_delayed_exchange, "cpu", comm)):
        assert out["sent"] == [2, 4, 6, 8]
        allowed = {5, 7} | ({3, 5, 7, 9} if comm == "int8" else set())
        assert set(out["waits"]) <= allowed and 5 in out["waits"] and 7 in out["waits"]


def waits_for_a_late_peer(rank: int, world: int, delay: int) -> dict:
    """tau 2, one fragment, sent at even clocks; rank 1 computes 0.3 s before each send. With
    delay=1 rank 0 computes 0.6 s and rank 1 0.3 s between the send and the apply."""
    params = [torch.nn.Parameter(torch.randn(10_000))]
    avg = easgd_ext.ElasticAverager(params, tau=2, delay=delay)
    for t in range(1, 8):  # sends at 2, 4, 6; with delay=1 applied at 3, 5, 7
        if t % 2 == 0:
            time.sleep(0.3 if rank == 1 else 0.0)
        elif delay:
            time.sleep(0.6 if rank == 0 else 0.3)
        avg.step()
    in_flight = avg.in_flight
    stats = avg.stats
    return {"wait": stats.wait_seconds, "comm": stats.comm_seconds, "exchanges": stats.exchanges,
            "in_flight": in_flight}


@pytest.mark.parametrize("delay", [0, 1])
def test_the_host_wait_for_collectives_is_counted_apart(delay):
    """stats.wait_seconds is the part of comm_seconds the host spent waiting for collectives.
    Blocking, rank 0 waits 0.3 s for rank 1 at each of the 3 exchanges; with delay=1 the
    collective has arrived 0.3 s before either rank applies it, and nobody waits."""
    early, late = values(run_ranks(2, waits_for_a_late_peer, delay))
    for out in (early, late):
        assert out["exchanges"] == 3 and out["in_flight"] == 0
        assert 0 <= out["wait"] <= out["comm"] + 1e-6
    if delay == 0:
        assert early["wait"] > 0.6 and late["wait"] < 0.15
    else:
        assert early["wait"] < 0.15 and late["wait"] < 0.15


def int8_middle_step_waits(rank: int, world: int) -> dict:
    """The 8-bit wire, tau 4, one fragment sent at clocks 4, 8, 12 and applied 2 steps later;
    the host moves it on (waits for its all-to-all) one step after the send. Rank 1 computes
    0.3 s before each send, rank 0 never."""
    params = [torch.nn.Parameter(torch.randn(10_000))]
    avg = easgd_ext.ElasticAverager(params, tau=4, delay=2, comm_dtype=torch.int8)
    for t in range(1, 15):
        if t % 4 == 0 and rank == 1:
            time.sleep(0.3)
        avg.step()
    return {"wait": avg.stats.wait_seconds, "exchanges": avg.stats.exchanges, "in_flight": avg.in_flight}


def test_the_wait_of_the_8bit_wires_middle_step_is_counted():
    early, late = values(run_ranks(2, int8_middle_step_waits))
    assert early["exchanges"] == late["exchanges"] == 3 and early["in_flight"] == 0
    assert early["wait"] > 0.6 and late["wait"] < 0.15


def checkpoint_waits(rank: int, world: int) -> dict:
    """A checkpoint taken with a fragment in flight whose peer is 0.5 s late: state_dict()
    waits for the sum (without applying it), and that wait is not the exchange's."""
    params = [torch.nn.Parameter(torch.randn(10_000))]
    avg = easgd_ext.ElasticAverager(params, tau=2, delay=1)
    avg.step()
    if rank == 1:
        time.sleep(0.5)
    avg.step()  # clock 2: sent
    start = time.perf_counter()
    avg.state_dict()
    waited_in_save = time.perf_counter() - start
    avg.step()  # clock 3: applied, nothing left to wait for
    return {"save": waited_in_save, "wait": avg.stats.wait_seconds, "exchanges": avg.stats.exchanges}


def test_a_checkpoints_wait_is_not_counted_as_the_exchanges():
    early, _ = values(run_ranks(2, checkpoint_waits))
    assert early["exchanges"] == 1
    assert early["save"] > 0.3 and early["wait"] < 0.15


needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and easgd_ext.build_info()["cuda"] and easgd_ext.build_info()["cuda_devices"]),
    reason="needs a CUDA GPU and easgd_ext built with CUDA")


def nccl_delayed_steps_do_not_sync(comm: str | None) -> dict:
    params = [torch.nn.Parameter(torch.randn(1_000_000, device="cuda"))]
    avg = easgd_ext.ElasticAverager(params, tau=4, fragments=4, delay=1, comm_dtype=comm)
    for _ in range(8):
        avg.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    blocked = []
    try:
        with CountedWaits(avg) as counted:
            for t in range(8):
                start = time.perf_counter()
                avg.step()
                blocked.append(time.perf_counter() - start)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    avg.flush()
    torch.cuda.synchronize()
    return {"waits": counted.waits, "clock": avg.clock, "blocked_ms": sorted(blocked)[len(blocked) // 2] * 1e3}


@needs_gpu
@pytest.mark.parametrize("comm", [None, "int8"])
def test_nccl_streamed_steps_make_no_synchronizing_call_and_wait_only_when_applying(comm):
    (out,) = values(run_ranks(1, nccl_world_one, nccl_delayed_steps_do_not_sync, comm))
    # every step sends one fragment and applies the previous one: its works are waited for (by
    # the stream, not the host) one step after their send, never at it
    assert all(w >= 10 for w in out["waits"])
    assert out["blocked_ms"] < 1.0


def int8_graph_replay() -> dict:
    import torchvision

    shapes = [p.shape for p in torchvision.models.resnet50(weights=None).parameters()]
    make = lambda: [torch.nn.Parameter(torch.randn(s, device="cuda", generator=torch.Generator("cuda").manual_seed(i)))
                    for i, s in enumerate(shapes)]
    eager_p, graph_p = make(), make()
    eager = easgd_ext.ElasticAverager(eager_p, tau=1, comm_dtype=torch.int8)
    graphed = easgd_ext.ElasticAverager(graph_p, tau=1, comm_dtype=torch.int8)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graphed.exchange()
        eager.exchange()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.exchange()
    for _ in range(3):
        with torch.no_grad():
            for a, b in zip(eager_p, graph_p):
                a.mul_(1.01)
                b.mul_(1.01)
        graph.replay()
        eager.exchange()
    torch.cuda.synchronize()
    refused = None
    delayed = easgd_ext.ElasticAverager(make()[:3], tau=2, fragments=2, delay=1)
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            delayed.step()
            delayed.step()
    except RuntimeError as exc:
        refused = str(exc)
    return {"same_x": all(torch.equal(a, b) for a, b in zip(eager.flat_parameters(), graphed.flat_parameters())),
            "same_c": all(torch.equal(a, b) for a, b in zip(eager.center_state(), graphed.center_state())),
            "refused": refused}


@needs_gpu
def test_the_8bit_exchange_of_resnet50_is_captured_in_a_cuda_graph():
    (out,) = values(run_ranks(1, nccl_world_one, int8_graph_replay))
    assert out["same_x"] and out["same_c"]
    assert out["refused"] is not None and "cannot be waited for inside one graph" in out["refused"]


def second_gpu_outcomes() -> dict:
    """Parameters on cuda:1 while cuda:0 is current: what the exchanges did must still be read
    (the status is copied and the events recorded on cuda:1's stream)."""
    torch.cuda.set_device(0)
    params = [torch.nn.Parameter(torch.randn(5000, device="cuda:1"))]
    avg = easgd_ext.ElasticAverager(params, tau=1, on_nonfinite="skip")
    avg.exchange()
    with torch.no_grad():
        params[0][3] = float("nan")
    avg.exchange()
    stats = avg.stats
    avg.close()
    return {"exchanges": stats.exchanges, "skipped": stats.skipped_exchanges,
            "seconds": stats.comm_seconds}


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not easgd_ext.build_info()["cuda"],
                    reason="needs two GPUs and easgd_ext built with CUDA")
def test_outcomes_of_parameters_on_a_second_gpu_are_read_on_its_stream():
    out = second_gpu_outcomes()
    assert out["exchanges"] == 1 and out["skipped"] == 1 and out["seconds"] > 0


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available() or not easgd_ext.build_info()["cuda"],
        reason="needs a CUDA GPU and easgd_ext built with CUDA"))])
def test_a_flushed_fragment_is_reported_as_itself_when_exchange_resends_it(device):
    # The skipped fragment in flight is completed by exchange(), which then sends it again:
    # its record must still say "skipped" (on CUDA the status is read later, after the re-send
    # has zeroed the wire's own vector).
    params = [torch.nn.Parameter(torch.randn(4096, device=device))]
    avg = easgd_ext.ElasticAverager(params, tau=2, fragments=2, delay=1, on_nonfinite="skip")
    ends = [0, 4095]  # one element in each fragment
    with torch.no_grad():
        saved = params[0][ends].clone()
        params[0][ends] = float("nan")  # the fragment that leaves now is not finite
    avg.step()  # one fragment leaves
    with torch.no_grad():
        params[0][ends] = saved
    avg.exchange()  # completes it (skipped), then both fragments afresh (applied)
    stats = avg.stats
    assert stats.skipped_exchanges == 1
    assert stats.exchanges == 2
    assert torch.isfinite(params[0]).all()
