"""SharedCenter and the asynchronous averagers in one process: the exchange against the float64
reference, and every way of holding it wrong (names, layouts, stale or foreign segments,
truncation, layout versions, worker slots, locks, arguments)."""

from __future__ import annotations

import os
import stat
import struct
import warnings
from multiprocessing import shared_memory

import pytest
import torch

import async_workers as aw
from conftest import cuda_usable
from dist_harness import Processes
from easgd_ext import DownpourAverager, ElasticAverager, SharedCenter, StaleSegmentError, ops
from easgd_ext.ops import reference
from easgd_ext.shared_center import chunk_plan, unique_name


def mixed_params(seed: int) -> list[torch.nn.Parameter]:
    """float32 and bfloat16 parameters: two flat groups, so two ranges of the center."""
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5000, generator=g)),
            torch.nn.Parameter(torch.randn(3, 700, generator=g).to(torch.bfloat16)),
            torch.nn.Parameter(torch.randn(2100, generator=g))]


# ---- the exchange ----------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["easgd", "downpour"])
def test_exchange_matches_the_kernel_and_the_float64_reference(center_name, algo):
    params = mixed_params(0)
    center = SharedCenter.create(center_name, like=params, workers=2, chunk_mb=1024 * 4 / 2**20)
    assert center.num_chunks > 5  # 1K-element chunks: groups straddle chunk boundaries
    cls = ElasticAverager if algo == "easgd" else DownpourAverager
    kwargs = {"alpha": 0.37} if algo == "easgd" else {}
    avg = cls(params, tau=1, mode="async", center=center, **kwargs)
    g = torch.Generator().manual_seed(1)
    center.load_(torch.randn(center.numel, generator=g))  # fresh random center, never zeros
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
    x0 = [flat.clone() for flat in avg.flat_parameters()]
    last0 = [b.clone() for b in avg.worker_buffers("x_last")] if algo == "downpour" else None
    c0 = center.snapshot()
    avg.exchange()
    c1 = center.snapshot()
    for i, (flat, off) in enumerate(zip(avg.flat_parameters(), center.check_layout(params))):
        n = flat.numel()
        x, c = x0[i].clone(), c0[off:off + n].clone()
        if algo == "easgd":
            ops.async_exchange(x, c, 0.37)
            want = reference.async_exchange(x0[i], c0[off:off + n], 0.37)
            ref_x, ref_c = want["x"], want["center"]
        else:
            ops.downpour_async_exchange(x, last0[i].clone(), c)
            want = reference.downpour_async_exchange(x0[i], last0[i], c0[off:off + n])
            ref_x, ref_c = want["x"], want["center"]
        # Chunked under locks == one kernel call over the whole buffer, bit for bit ...
        assert torch.equal(flat, x) and torch.equal(c1[off:off + n], c)
        # ... and within a few roundings of the float64 reference, element by element (the
        # tolerances of test_kernels.py: magnitudes of the inputs times the epsilons).
        mag = x0[i].double().abs() + c0[off:off + n].double().abs()
        if last0 is not None:
            mag += last0[i].double().abs()
        tol = 2 * torch.finfo(flat.dtype).eps * mag + 8 * torch.finfo(torch.float32).eps * mag
        assert ((flat.double() - ref_x).abs() <= tol).all()
        assert ((c1[off:off + n].double() - ref_c).abs() <= tol).all()
    assert avg.stats.exchanges == 1 and avg.stats.bytes_sent == 0


def test_chunk_plan_tiles_the_range_once_and_staggers_the_start():
    """The CUDA pipeline's chunk order: every element exactly once, one wrap-around at most, and
    workers starting at different chunks."""
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        chunk = int(torch.randint(1, 50, (1,), generator=g)) * 64
        offset = int(torch.randint(0, 5000, (1,), generator=g)) * 64
        n = int(torch.randint(1, 20000, (1,), generator=g))
        workers = int(torch.randint(1, 9, (1,), generator=g))
        starts = set()
        for w in range(workers):
            plan = chunk_plan(offset, n, chunk, w, workers)
            covered = torch.zeros(n, dtype=torch.int32)
            for k, lo, hi in plan:
                assert k * chunk <= offset + lo < offset + hi <= (k + 1) * chunk
                covered[lo:hi] += 1
            assert bool((covered == 1).all())
            chunks = [k for k, _, _ in plan]
            assert sorted(chunks) == list(range(min(chunks), max(chunks) + 1))  # each chunk once
            assert sum(b < a for a, b in zip(chunks, chunks[1:])) <= 1  # one wrap-around
            starts.add(chunks[0])
        assert len(starts) == min(workers, len(plan))
    assert chunk_plan(0, 0, 64, 0, 1) == []


def test_workers_start_from_the_center_and_conserve_mass(center_name):
    params = mixed_params(2)
    center = SharedCenter.create(center_name, like=params, workers=1)
    other = mixed_params(3)  # another worker's different values: replaced by the center's
    avg = ElasticAverager(other, tau=2, mode="async", center=center_name, alpha=0.5)
    assert all(torch.equal(a.float(), b.float()) for a, b in zip(params, other))
    with torch.no_grad():
        for p in other:
            p.mul_(3)
    before = sum(float(p.detach().double().sum()) for p in other) + float(center.snapshot().double().sum())
    assert avg.step() is False and avg.step() is True  # tau = 2: an exchange at the second
    after = sum(float(p.detach().double().sum()) for p in other) + float(center.snapshot().double().sum())
    assert after == pytest.approx(before, rel=1e-5)
    info = center.worker_info()
    assert info[0]["exchanges"] == 1 and info[0]["clock"] == 2 and info[0]["pid"] == os.getpid()


def test_non_finite_parameters_skip_the_exchange(center_name):
    params = [torch.nn.Parameter(torch.randn(300))]
    avg = ElasticAverager(params, tau=1, mode="async", center=SharedCenter.create(center_name, like=params),
                          on_nonfinite="skip")
    before = avg.center.snapshot()
    with torch.no_grad():
        params[0][7] = float("nan")
    x = params[0].detach().clone()
    with pytest.warns(RuntimeWarning, match="the exchange at clock 0 was skipped: non-finite "
                                            "this worker's parameters"):
        avg.exchange()
    assert torch.equal(avg.center.snapshot(), before)
    assert torch.equal(params[0].detach(), x, ) or torch.equal(params[0].isnan(), x.isnan())
    assert avg.stats.skipped_exchanges == 1 and avg.stats.exchanges == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not cuda_usable(), reason="needs a CUDA GPU and easgd_ext built with CUDA"))])
@pytest.mark.parametrize("algo", ["easgd", "downpour"])
def test_non_finite_worker_restarts_from_the_center(center_name, device, algo):
    params = [torch.nn.Parameter(torch.randn(3000, device=device))]
    center = SharedCenter.create(center_name, like=params, chunk_mb=1024 * 4 / 2**20)
    cls = ElasticAverager if algo == "easgd" else DownpourAverager
    avg = cls(params, tau=1, mode="async", center=center)
    center.load_(torch.randn(center.numel))
    before = center.snapshot()
    with torch.no_grad():
        params[0][2500] = float("inf")
    with pytest.warns(RuntimeWarning, match="were reset to the center"):
        avg.exchange()
    assert torch.equal(center.snapshot(), before), "a diverged worker moved the center"
    assert torch.equal(params[0].detach().cpu(), before[:3000])
    if algo == "downpour":
        assert torch.equal(avg.worker_buffers("x_last")[0][:3000].cpu(), before[:3000])
    assert (avg.stats.resets, avg.stats.exchanges) == (1, 1)


def test_center_parameters_state_dict_and_close(center_name):
    params = mixed_params(4)
    avg = ElasticAverager(params, tau=1, mode="async",
                          center=SharedCenter.create(center_name, like=params), alpha=0.5)
    with torch.no_grad():
        for p in params:
            p.add_(1)
    avg.exchange()
    state = avg.state_dict()
    mine = [p.detach().clone() for p in params]
    with avg.center_parameters():
        inside = [p.detach().clone() for p in params]
    assert all(torch.equal(p, m) for p, m in zip(params, mine))
    snapshot = avg.center.snapshot()
    for off, p in zip(avg.center.check_layout(params), inside[:1]):
        assert torch.equal(p.float().reshape(-1), snapshot[off:off + p.numel()])
    avg.exchange()
    assert not torch.equal(avg.center.snapshot(), snapshot)
    avg.load_state_dict(state)
    assert torch.equal(avg.center.snapshot(), snapshot) and avg.clock == state["clock"]
    with avg:
        pass
    with pytest.raises(RuntimeError, match="after close"):
        avg.exchange()


@pytest.mark.skipif(not cuda_usable(), reason="needs a CUDA GPU and easgd_ext built with CUDA")
@pytest.mark.parametrize("algo", ["easgd", "downpour"])
def test_cuda_parameters_match_cpu_parameters(algo):
    """The chunked copy-in / kernel / copy-back pipeline equals the CPU exchange bit for bit."""
    results = []
    for device in ("cpu", "cuda"):
        params = [torch.nn.Parameter(p.detach().to(device)) for p in mixed_params(5)]
        with SharedCenter.create(unique_name("cuda"), like=params, workers=1,
                                 chunk_mb=64 * 1024 * 4 / 2**20) as center:
            cls = ElasticAverager if algo == "easgd" else DownpourAverager
            avg = cls(params, tau=1, mode="async", center=center,
                      **({"alpha": 0.4} if algo == "easgd" else {}))
            center.load_(torch.randn(center.numel, generator=torch.Generator().manual_seed(6)))
            with torch.no_grad():
                for p in params:
                    p.mul_(-2)
            for _ in range(3):
                avg.exchange()
            torch.cuda.synchronize()
            results.append(([p.detach().cpu() for p in params], center.snapshot()))
    (cpu_x, cpu_c), (gpu_x, gpu_c) = results
    assert all(torch.equal(a, b) for a, b in zip(cpu_x, gpu_x)) and torch.equal(cpu_c, gpu_c)


# ---- the segment -------------------------------------------------------------------------------
def test_owner_only_permissions_and_removal_at_close(center_name):
    with SharedCenter.create(center_name, like=[torch.randn(10)]) as center:
        mode = stat.S_IMODE(os.stat(f"/dev/shm/{center_name}").st_mode)
        assert mode == 0o600
        assert center.info()["creator_pid"] == os.getpid()
    assert not os.path.exists(f"/dev/shm/{center_name}")
    with pytest.raises(FileNotFoundError, match="no shared center named"):
        SharedCenter.attach(center_name)


def test_a_name_in_use_is_not_taken_twice(center_name):
    center = SharedCenter.create(center_name, like=[torch.randn(10)])
    with pytest.raises(FileExistsError, match="in use"):
        SharedCenter.create(center_name, like=[torch.randn(10)])
    attached = SharedCenter.attach(center_name, like=[torch.randn(10)])
    assert attached.numel == center.numel and not attached.owner


def test_a_stale_center_is_reported_not_reused(center_name):
    with Processes() as procs:
        ready = procs.ctx.Event()
        creator = procs.start(aw.create_and_die, center_name, 100, ready)
        assert ready.wait(60)
        creator.kill()
        creator.join(10)
    assert os.path.exists(f"/dev/shm/{center_name}")  # killed: no clean exit, the name stayed
    with pytest.raises(StaleSegmentError, match="stale.*SharedCenter.remove"):
        SharedCenter.attach(center_name)
    with pytest.raises(FileExistsError, match="stale: it was left by a run that crashed"):
        SharedCenter.create(center_name, like=[torch.zeros(100)])
    assert SharedCenter.attach(center_name, allow_stale=True).numel == 128  # on purpose: allowed
    assert SharedCenter.remove(center_name) is True
    SharedCenter.create(center_name, like=[torch.zeros(100)]).close()


def test_foreign_truncated_and_other_version_segments_are_refused(center_name):
    foreign = shared_memory.SharedMemory(name=center_name, create=True, size=8192)
    try:
        with pytest.raises(ValueError, match="not an easgd_ext shared center"):
            SharedCenter.attach(center_name)
        with pytest.raises(FileExistsError, match="not an easgd_ext center"):
            SharedCenter.create(center_name, like=[torch.zeros(3)])
    finally:
        foreign.close()
        foreign.unlink()
    tiny = shared_memory.SharedMemory(name=center_name, create=True, size=16)
    try:
        with pytest.raises(ValueError, match="too small"):
            SharedCenter.attach(center_name)
    finally:
        tiny.close()
        tiny.unlink()

    SharedCenter.create(center_name, like=[torch.zeros(5000)])
    path = f"/dev/shm/{center_name}"
    size = os.path.getsize(path)
    os.truncate(path, size - 4096)
    with pytest.raises(ValueError, match="truncated"):
        SharedCenter.attach(center_name)
    os.truncate(path, size)
    with open(path, "r+b") as f:  # the version field follows the 8-byte magic
        f.seek(8)
        f.write(struct.pack("<I", 99))
    with pytest.raises(ValueError, match="layout version 99"):
        SharedCenter.attach(center_name)


def test_attaching_with_another_layout_is_an_error(center_name):
    SharedCenter.create(center_name, like=[torch.zeros(10, 10)])
    for other in ([torch.zeros(100)], [torch.zeros(10, 10, dtype=torch.bfloat16)],
                  [torch.zeros(10, 10), torch.zeros(1)]):
        with pytest.raises(ValueError, match="made for another model"):
            SharedCenter.attach(center_name, like=other)
    with pytest.raises(ValueError, match="made for another model"):
        ElasticAverager([torch.nn.Parameter(torch.zeros(99))], mode="async", center=center_name)


@pytest.mark.parametrize("bad,error,match", [
    ("a/b", ValueError, "may only contain"), ("", ValueError, "1 to 200"),
    ("x" * 201, ValueError, "1 to 200"), ("..", ValueError, "not allowed"),
    (5, TypeError, "name must be a str"),
])
def test_bad_names(bad, error, match):
    with pytest.raises(error, match=match):
        SharedCenter.create(bad, like=[torch.zeros(3)])
    with pytest.raises(error, match=match):
        SharedCenter.attach(bad)


def test_names_are_quoted_back_safely():
    """A huge or binary name is shortened and escaped in the error, never echoed in full or cut
    off at a NUL byte."""
    with pytest.raises(ValueError) as huge:
        SharedCenter.attach("y" * 10_000)
    assert len(str(huge.value)) < 200 and "(10000 characters)" in str(huge.value)
    with pytest.raises(ValueError) as binary:
        SharedCenter.attach("abc\x00def")
    assert "'abc\\x00def'" in str(binary.value) and "character 3 is not" in str(binary.value)


def test_another_model_says_what_differs(center_name):
    SharedCenter.create(center_name, like=[torch.zeros(128)])
    with pytest.raises(ValueError, match="it holds 128 elements, these 1 parameters need 192"):
        SharedCenter.attach(center_name, like=[torch.zeros(129)])
    with pytest.raises(ValueError, match=r"another model of the same size \(128 elements\): the "
                                         "parameters' count, shapes"):
        SharedCenter.attach(center_name, like=[torch.zeros(2, 64)])


def test_bad_create_arguments(center_name):
    with pytest.raises(ValueError, match="workers must be >= 1"):
        SharedCenter.create(center_name, like=[torch.zeros(3)], workers=0)
    with pytest.raises(TypeError, match="workers must be an int"):
        SharedCenter.create(center_name, like=[torch.zeros(3)], workers=2.0)
    with pytest.raises(ValueError, match="chunk_mb must be positive"):
        SharedCenter.create(center_name, like=[torch.zeros(3)], chunk_mb=-1)
    with pytest.raises(TypeError, match="params"):
        SharedCenter.create(center_name, like=[torch.zeros(3, dtype=torch.int32)])
    with pytest.raises(ValueError, match="params is empty"):
        SharedCenter.create(center_name, like=[])
    assert not os.path.exists(f"/dev/shm/{center_name}")


def test_worker_slots_and_locks(center_name):
    center = SharedCenter.create(center_name, like=[torch.zeros(3)], workers=1)
    params = [torch.nn.Parameter(torch.zeros(3))]
    ElasticAverager(params, mode="async", center=center)
    with pytest.raises(ValueError, match="all 1 worker slots"):
        ElasticAverager([torch.nn.Parameter(torch.zeros(3))], mode="async", center=center)
    with center.lock(0) as recovered:
        assert recovered == 0
        with pytest.raises(RuntimeError, match="already locked by this thread"):
            center.segment.lock(0, 1.0)
    with pytest.raises(RuntimeError, match="not locked by this thread"):
        center.segment.unlock(0)
    with pytest.raises(IndexError, match="out of range"):
        center.segment.lock(1, 1.0)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"comm_dtype": torch.bfloat16}, ValueError, "comm_dtype applies to mode='sync'"),
    ({"servers": [0]}, ValueError, "servers= needs torch.distributed"),
    ({"center": "x", "servers": [0]}, ValueError, "not both"),
    ({"center": 3}, TypeError, "center must be a SharedCenter"),
    ({"lock_timeout": 0}, ValueError, "lock_timeout must be positive"),
    ({"lock_timeout": "1"}, TypeError, "lock_timeout must be a number"),
    ({"tau": 0}, ValueError, "tau must be >= 1"),
    ({"alpha": 1.5}, ValueError, "stability"),
])
def test_bad_async_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ElasticAverager([torch.nn.Parameter(torch.zeros(3))], mode="async", **kwargs)


def test_mode_is_checked():
    with pytest.raises(ValueError, match="mode must be 'sync' or 'async'"):
        ElasticAverager([torch.nn.Parameter(torch.zeros(3))], mode="asynchronous")
    with pytest.raises(ValueError, match="center applies to mode='async', not mode='sync'"):
        DownpourAverager([torch.nn.Parameter(torch.zeros(3))], center="x")
    with pytest.raises(ValueError, match="servers applies to mode='async', not mode='sync'"):
        ElasticAverager([torch.nn.Parameter(torch.zeros(3))], servers=[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        avg = DownpourAverager([torch.nn.Parameter(torch.zeros(3))], mode="async")
        assert type(avg) is DownpourAverager and avg.mode == "async"
        assert avg.center is not None and avg.worker_id == 0
        avg.close()


def test_without_torch_distributed_only_the_creator_keeps_the_center(center_name):
    """Workers that attach to a named center made elsewhere save none of it, and loading their
    state leaves the center alone; the creator's state holds it and restores it."""
    params = mixed_params(5)
    creator = ElasticAverager(params, tau=1, mode="async",
                              center=SharedCenter.create(center_name, like=params, workers=2), alpha=0.3)
    other = mixed_params(5)
    attached = ElasticAverager(other, tau=1, mode="async", center=center_name, alpha=0.3)
    creator_state, attached_state = creator.state_dict(), attached.state_dict()
    assert "center" in creator_state["buffers"] and "center" not in attached_state["buffers"]
    before = creator.center.snapshot()
    with torch.no_grad():
        for p in other:
            p.add_(3)
    attached.exchange()
    moved = creator.center.snapshot()
    assert not torch.equal(moved, before)
    attached.load_state_dict(attached_state)  # the worker's own state: the center stays
    assert torch.equal(creator.center.snapshot(), moved)
    creator.load_state_dict(creator_state)    # the creator's: the center comes back
    assert torch.equal(creator.center.snapshot(), before)
    attached.close()
    creator.close()
