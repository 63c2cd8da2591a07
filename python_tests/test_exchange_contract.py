"""What the synchronous exchange promises a GPU training loop, checked where it can be: no
host read of a tensor in steady state (on any device), exactly one collective per bucket, the
kernels as custom ops that torch.compile traces with fullgraph=True and that pass opcheck, and
(with a GPU) no synchronizing call and a whole exchange captured and replayed in a CUDA graph."""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch
import torch.distributed as dist

import easgd_ext
from conftest import DEVICES, cuda_usable
from dist_harness import nccl_world_one, run_ranks, values
from easgd_ext import ops

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def no_host_reads() -> Iterator[None]:
    """Every way of reading a tensor's values on the host raises inside the block."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def forbidden(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name}() was called inside exchange()")
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, forbidden(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@contextlib.contextmanager
def counted_collectives() -> Iterator[dict[str, int]]:
    """Counts the torch.distributed collectives and point-to-point calls made in the block."""
    names = ("all_reduce", "broadcast", "all_gather", "all_gather_object", "reduce_scatter",
             "barrier", "send", "recv", "isend", "irecv", "all_to_all", "gather", "scatter")
    counts = {name: 0 for name in names}
    saved = {name: getattr(dist, name) for name in names}

    def counting(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return saved[name](*args, **kwargs)
        return call

    for name in names:
        setattr(dist, name, counting(name))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def layout(device: str) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 3, 7, 7), (64,), (256, 64), (1000,), (10, 1000)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]


def steady_state_exchange(rank: int, world: int, device: str, comm: str | None,
                          policy: str) -> dict:
    params = layout(device)
    cap_mb = 0.02
    avg = easgd_ext.ElasticAverager(params, tau=1, comm_dtype=comm, bucket_cap_mb=cap_mb,
                                    on_nonfinite=policy)
    avg.exchange()  # warm-up: allocations, connections, the first status read
    with no_host_reads(), counted_collectives() as counts:
        for _ in range(3):
            avg.exchange()
    stats = avg.stats
    wire_elements = 64 + sum(f.numel() for f in avg.flat_parameters())  # the flag's header
    element = torch.finfo(comm and getattr(torch, comm) or torch.float32).bits // 8
    per_bucket = -(-(int(cap_mb * 2**20) // element) // 64) * 64  # aligned to 64 elements
    buckets = -(-wire_elements // per_bucket)
    return {"counts": counts, "buckets": buckets, "exchanges": stats.exchanges}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("comm,policy", [(None, "reset"), ("bfloat16", "skip")])
def test_exchange_reads_nothing_back_and_makes_one_collective_per_bucket(device, comm, policy):
    for out in values(run_ranks(2, steady_state_exchange, device, comm, policy)):
        counts = {k: v for k, v in out["counts"].items() if v}
        assert out["buckets"] > 1
        assert counts == {"all_reduce": 3 * out["buckets"]}, counts
        assert out["exchanges"] == 4


def test_one_process_reads_nothing_back_either():
    avg = easgd_ext.ElasticAverager(layout("cpu"), tau=1)
    avg.exchange()
    with no_host_reads(), counted_collectives() as counts:
        avg.exchange()
    assert not any(counts.values())  # no process group: nothing to talk to
    assert avg.stats.exchanges == 2


def test_the_host_read_guard_itself_works():
    with no_host_reads(), pytest.raises(AssertionError, match="Tensor.item"):
        torch.ones(1).item()


# ---- the kernel table: every row is a custom op that passes opcheck and matches its reference -----
SCALARS = {"alpha": 0.3, "scale": 0.5, "lr": 0.7, "mu": 0.9, "nesterov": 1.0, "pull_to_new": 0.0}


def row_samples(spec: ops.KernelSpec, device: str, param: torch.dtype, wire: torch.dtype) -> tuple:
    """Fresh random arguments for a table row: each tensor in the dtype of its role."""
    g = torch.Generator()
    g.seed()
    tensors = [torch.randn(1000, generator=g, dtype=torch.float64).to(spec.dtype_of(t, param, wire))
               .to(device) for t in spec.tensors]
    return (*tensors, *(SCALARS[s] for s in spec.scalars))


ROWS = sorted(ops.KERNELS)


def test_the_table_holds_every_kernel():
    assert set(ROWS) == {"elastic_difference", "sync_apply", "outer_apply", "async_exchange",
                         "downpour_push", "downpour_pull", "downpour_async_exchange", "average_apply"}
    for spec in ops.KERNELS.values():
        assert spec.op is getattr(torch.ops.easgd_ext, spec.name)
        assert spec.function is getattr(ops, spec.name)
        assert set(spec.mutates) <= set(spec.tensors)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ROWS)
def test_custom_ops_pass_opcheck(device, name):
    spec = ops.KERNELS[name]
    torch.library.opcheck(spec.op, row_samples(spec, device, torch.float16, torch.bfloat16))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ROWS)
@pytest.mark.parametrize("param,wire", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16)])
def test_custom_ops_match_their_float64_reference(device, name, param, wire):
    """The op, called as torch.compile calls it, writes what the row's reference says, every
    element, and nothing else."""
    spec = ops.KERNELS[name]
    args = row_samples(spec, device, param, wire)
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    want = spec.reference(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in before])
    spec.op(*args)
    assert set(want) == set(spec.mutates)
    magnitude = sum(a.double().abs().cpu() for a in before if isinstance(a, torch.Tensor))
    # An output may carry another output's rounding (async_exchange's center gains x - x_new, with
    # x_new rounded to the parameters' dtype; near a tie float32 and float64 round it one ulp
    # apart), so the bound is the coarsest dtype of the call's tensors, not the output's own.
    coarsest = max(torch.finfo(a.dtype).eps for a in args if isinstance(a, torch.Tensor))
    for i, t in enumerate(spec.tensors):
        got = args[i].double().cpu()
        if t in spec.mutates:
            tol = 4 * (coarsest + torch.finfo(torch.float32).eps) * magnitude
            err = (got - want[t]).abs()
            assert torch.isfinite(got).all() and (err <= tol).all(), (name, t, float(err.max()))
        else:
            assert torch.equal(args[i], before[i]), f"{name} wrote {t}, which it does not declare"


def sync_exchange_step(x, c, wire, alpha):
    """A loop body a user might compile: a local update, then the exchange's two kernels (the
    all-reduce between them is the identity in one process)."""
    x.mul_(0.99)
    ops.elastic_difference(x, c, wire, alpha)
    ops.sync_apply(x, c, wire, alpha)
    return (x.float() - c).abs().sum()


@pytest.mark.parametrize("device", DEVICES)
def test_fullgraph_compile_traces_through_the_kernels(device):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(4096, generator=g).to(device), torch.randn(4096, generator=g).to(device)
    wire = torch.empty_like(x)
    x2, c2, wire2 = x.clone(), c.clone(), wire.clone()
    compiled = torch.compile(sync_exchange_step, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        got = compiled(x, c, wire, 0.25)
        want = sync_exchange_step(x2, c2, wire2, 0.25)
    assert torch.equal(x, x2) and torch.equal(c, c2)
    assert torch.allclose(got, want)


# ---- GPU only ------------------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(not cuda_usable(), reason="needs a CUDA GPU and easgd_ext built with CUDA")


def graph_replay(comm: str | None) -> dict:
    eager_params = layout("cuda")
    eager = easgd_ext.ElasticAverager(eager_params, tau=1, comm_dtype=comm)
    captured_params = layout("cuda")
    graphed = easgd_ext.ElasticAverager(captured_params, tau=1, comm_dtype=comm)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph asks
        graphed.exchange()
        eager.exchange()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.exchange()
    for _ in range(5):
        with torch.no_grad():
            for a, b in zip(captured_params, eager_params):  # the same local step on both
                a.mul_(1.01)
                b.mul_(1.01)
        graph.replay()
        eager.exchange()
    torch.cuda.synchronize()
    same_x = all(torch.equal(a, b) for a, b in zip(graphed.flat_parameters(), eager.flat_parameters()))
    same_c = all(torch.equal(a, b) for a, b in zip(graphed.center_state(), eager.center_state()))
    return {"same_x": same_x, "same_c": same_c}


@needs_gpu
@pytest.mark.parametrize("comm", [None, "bfloat16"])
def test_exchange_is_captured_and_replayed_in_a_cuda_graph(comm):
    (out,) = values(run_ranks(1, nccl_world_one, graph_replay, comm))
    assert out["same_x"] and out["same_c"]


def no_sync_exchange() -> int:
    avg = easgd_ext.ElasticAverager(layout("cuda"), tau=1)
    avg.exchange()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            avg.exchange()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return avg.stats.exchanges


@needs_gpu
def test_cuda_exchange_makes_no_synchronizing_call():
    (exchanges,) = values(run_ranks(1, nccl_world_one, no_sync_exchange))
    assert exchanges == 4
