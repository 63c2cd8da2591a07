"""Asynchronous EASGD and DOWNPOUR on real processes: the shared-memory center (conservation
over hundreds of exchanges by 4 processes, no torn chunk, a worker killed while holding a lock)
and the sharded center on server ranks over Gloo."""

from __future__ import annotations

import os
import time

import pytest
import torch

import async_workers as aw
from dist_harness import Processes, run_ranks, values
from easgd_ext import SharedCenter

NUMEL = 50_000 + 17


def rel_error(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    return float(((a - b).abs() / (1 + scale.abs())).max())


def make_center(name: str, workers: int, seed: int = 99, dtype=torch.float32) -> SharedCenter:
    return SharedCenter.create(name, like=aw.model_params(NUMEL, dtype, seed), workers=workers,
                               chunk_mb=aw.CHUNK_MB)


def assert_conserved(initial: list[torch.Tensor], final: list[torch.Tensor], c0: torch.Tensor,
                     c1: torch.Tensor) -> None:
    """Element by element, sum_i x_i + center is what it was, to the float32 rounding of the
    center over the exchanges (a few hundred roundings of |x|-sized values: < 1e-4 relative);
    a lost update (an unlocked race, a missed chunk) is off by a whole e ~ 0.3 |x - c|."""
    before = sum(initial) + c0
    after = sum(final) + c1
    scale = torch.stack(list(initial) + list(final) + [c0, c1]).abs().amax(0)
    assert rel_error(before, after, scale) < 2e-4
    assert torch.isfinite(c1).all()


def assert_downpour_center(results: list[dict], c0: torch.Tensor, c1: torch.Tensor) -> None:
    """DOWNPOUR without gradient steps: the center gains each worker's one change (from where it
    started, the center when it joined, to its perturbed values), once."""
    expected = c0 + sum(r["initial"] - r["start"] for r in results)
    assert rel_error(c1, expected, expected) < 1e-5


@pytest.mark.parametrize("algo,dtype", [("easgd", torch.float32), ("easgd", torch.bfloat16),
                                        ("downpour", torch.float32)])
def test_four_processes_conserve_the_mass(center_name, algo, dtype):
    exchanges = 300
    center = make_center(center_name, workers=4, dtype=dtype)
    c0 = center.snapshot().double()
    with Processes() as procs:
        for seed in range(4):
            procs.start(aw.shared_worker, center_name, NUMEL, dtype, seed, exchanges, algo)
        results = values(procs.results())
    c1 = center.snapshot().double()
    # Every worker starts at the center; what it adds is its perturbation (and what it holds).
    initial = [r["initial"] for r in results]
    if algo == "easgd":
        assert_conserved(initial, [r["final"] for r in results], c0, c1)
    else:
        assert_downpour_center(results, c0, c1)
    # Every exchange counted, once per worker and once per chunk it covered.
    assert sorted(r["worker_id"] for r in results) == [0, 1, 2, 3]
    assert [r["exchanges"] for r in results] == [exchanges] * 4
    info = {w["id"]: w for w in center.worker_info()}
    assert all(info[i]["exchanges"] == exchanges and info[i]["state"] == "finished" for i in range(4))
    assert sum(center.segment.chunk_updates()) == 4 * exchanges * center.num_chunks
    assert center.info()["clean_recoveries"] == center.info()["partial_recoveries"] == 0


def test_no_torn_chunk_under_concurrent_exchanges(center_name):
    # Whole chunks only (the worker's single parameter is exactly the center).
    center = SharedCenter.create(center_name, like=[torch.zeros(3 * 16 * 1024)], workers=3,
                                 chunk_mb=aw.CHUNK_MB)
    with torch.no_grad():  # uniform on every chunk to start with
        for k in range(center.num_chunks):
            s, e = center.chunk_range(k)
            center.tensor[s:e] = float(k)
    with Processes() as procs:
        stop = procs.ctx.Event()  # the reader reads until both workers are done
        reader = procs.start(aw.locked_reader, center_name, stop, 100)
        workers = [procs.start(aw.uniform_chunk_worker, center_name, seed, 400) for seed in range(2)]
        made = [r.value for r in procs.results(skip=(reader,))]
        stop.set()
        (reads, torn), = values(procs.results(skip=tuple(workers)))
    assert made == [400, 400]
    assert reads >= 100
    assert torn == 0
    # and the center really moved (so the reads saw updates, not a frozen center)
    assert not torch.equal(center.snapshot()[: center.chunk_numel], torch.zeros(center.chunk_numel))
    assert reader.exitcode == 0


@pytest.mark.parametrize("dirty", [False, True])
def test_worker_killed_holding_a_lock(center_name, dirty, tmp_path):
    """The victim exchanges, then dies (kill -9) holding chunk 2's lock; the survivors, already
    exchanging and blocked on that chunk, recover it and finish; the center stays finite and
    conserves the survivors' mass plus the victim's last contribution."""
    exchanges = 150
    center = make_center(center_name, workers=4)
    c0 = center.snapshot().double()
    report = str(tmp_path / "victim.pt")
    with Processes() as procs:
        ready = procs.ctx.Event()
        victim = procs.start(aw.victim, center_name, NUMEL, 3, 20, 2, dirty, report, ready)
        assert ready.wait(120), "the victim never took the lock"
        for seed in range(3):
            procs.start(aw.shared_worker, center_name, NUMEL, torch.float32, seed, exchanges)
        deadline = time.monotonic() + 120  # every survivor registered (and running into the lock)
        while len(center.worker_info()) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        victim.kill()
        victim.join(10)
        results = values(procs.results(skip=(victim,)))
    c1 = center.snapshot().double()
    assert torch.isfinite(c1).all()
    assert [r["exchanges"] for r in results] == [exchanges] * 3
    info = center.info()
    # The victim held the lock but wrote nothing since its last exchange; a `dirty` victim
    # is reported as a partial recovery (a real one would have left whole old/new floats).
    assert (info["partial_recoveries"], info["clean_recoveries"]) == ((1, 0) if dirty else (0, 1))
    assert_conserved([r["initial"] for r in results] + [torch.load(report + ".initial")],
                     [r["final"] for r in results] + [torch.load(report)], c0, c1)
    crashed = [w for w in center.worker_info() if w["state"] == "active" and not w["alive"]]
    assert len(crashed) == 1 and crashed[0]["exchanges"] == 20


def test_distinct_chunks_do_not_share_a_lock(center_name):
    """One process holds chunk 0 until the test lets go: another gets chunk 1 meanwhile, and
    waits in vain for chunk 0 (a TimeoutError naming the chunk and the holder). No verdict
    depends on how fast the processes start."""
    make_center(center_name, workers=2)
    with Processes() as procs:
        ready, release = procs.ctx.Event(), procs.ctx.Event()
        holder = procs.start(aw.hold_lock, center_name, 0, ready, release)
        assert ready.wait(120)
        procs.start(aw.try_lock, center_name, 1, 120.0)
        procs.start(aw.try_lock, center_name, 0, 0.5)
        fast, slow = procs.results(skip=(holder,))
        release.set()
        (held,) = procs.results(skip=procs.procs[1:])
    assert fast.error_type is None, fast.traceback
    assert slow.error_type == "TimeoutError" and "chunk 0" in slow.error and "pid" in slow.error
    assert held.error_type is None, held.traceback


# ---- under torch.distributed ----------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["easgd", "downpour"])
def test_torchrun_style_rank_zero_creates_and_the_others_attach(algo):
    world, exchanges = 3, 100
    results = values(run_ranks(world, aw.auto_center, NUMEL, exchanges, algo))
    names = {r["name"] for r in results}
    assert len(names) == 1 and [r["owner"] for r in results] == [True, False, False]
    assert not os.path.exists(f"/dev/shm/{names.pop()}")  # rank 0 removed it at exit
    c0, c1 = results[0]["center0"], results[0]["center"]
    assert all(torch.equal(r["center"], c1) for r in results)
    initial = [r["initial"] for r in results]
    if algo == "easgd":
        assert results[0]["workers"] == world and results[0]["alpha"] == pytest.approx(0.9 / world)
        assert_conserved(initial, [r["final"] for r in results], c0, c1)
    else:
        assert_downpour_center(results, c0, c1)


def test_two_trainings_never_share_a_center():
    first = values(run_ranks(2, aw.auto_center, 1000, 3, "easgd"))
    second = values(run_ranks(2, aw.auto_center, 1000, 3, "easgd"))
    assert first[0]["name"] != second[0]["name"]


def test_a_center_named_on_one_rank_only_is_an_error_on_every_rank():
    results = run_ranks(3, aw.missing_center, timeout=120)
    for r in results:
        assert r.error_type == "AgreementError", r.traceback
        assert "settings.center is None on rank 0 but 'no-such-center-easgd-test' on rank 1" in r.error


def test_servers_serve_and_workers_exchange():
    server, worker = values(run_ranks(2, aw.server_misuse, timeout=120))
    assert len(server) == 1 and "is a server of the sharded center: it calls serve()" in server[0]
    assert len(worker) == 1 and "serve() is for server ranks" in worker[0]


def test_mode_may_be_given_by_position():
    from easgd_ext import ElasticAverager

    avg = ElasticAverager([torch.nn.Parameter(torch.randn(5))], 1, None, 0.5, "async")
    assert type(avg) is ElasticAverager and avg.mode == "async" and avg.alpha == 0.5
    avg.close()


def test_ranks_on_different_machines_are_told_to_use_servers():
    results = run_ranks(2, aw.other_host)
    for r in results:
        assert r.error_type == "ValueError", r.traceback
        assert "servers=" in r.error and "another-machine" in r.error


@pytest.mark.parametrize("world,servers,algo,dtype", [
    (4, [0], "easgd", torch.float32),
    (5, [0, 4], "easgd", torch.float32),
    (4, [1], "easgd", torch.bfloat16),
    (4, [0, 1], "downpour", torch.float32),
])
def test_sharded_center_on_server_ranks(world, servers, algo, dtype):
    exchanges = 60
    results = values(run_ranks(world, aw.sharded, servers, 3001, exchanges, algo, dtype))
    workers = [r for i, r in enumerate(results) if i not in servers]
    served = [r["served"] for i, r in enumerate(results) if i in servers]
    worker_ranks = [i for i in range(world) if i not in servers]
    expected_exchanges = [exchanges + 7 * i for i in worker_ranks]
    assert [w["exchanges"] for w in workers] == expected_exchanges
    for s in served:  # every server saw every exchange of every worker
        assert s["exchange"] == sum(expected_exchanges)
    c0 = workers[0]["center0"]
    c1 = workers[0]["center"]
    assert all(torch.equal(w["center"], c1) for w in workers)
    initial = [w["initial"] for w in workers]
    if algo == "easgd":
        assert_conserved(initial, [w["final"] for w in workers], c0, c1)
    else:
        assert_downpour_center(workers, c0, c1)
    element = 2 if dtype == torch.bfloat16 else 4
    assert workers[0]["bytes"] == expected_exchanges[0] * workers[0]["final"].numel() * element


@pytest.mark.parametrize("algo,sharded", [("easgd", False), ("downpour", False),
                                          ("easgd", True), ("downpour", True)])
def test_async_checkpoint_resumes_exactly(algo, sharded):
    """Every rank saves its own state: rank 0 the shared center (or each server its shards),
    every worker its clock and buffers; a rebuilt job that loads them continues exactly as the
    uninterrupted one (the exchanges are put in a fixed order, so both runs are deterministic)."""
    world = 3
    straight = values(run_ranks(world, aw.async_checkpoint, algo, sharded, None))
    resumed = values(run_ranks(world, aw.async_checkpoint, algo, sharded, 3))
    for rank, (a, b) in enumerate(zip(straight, resumed)):
        if a.get("server"):
            continue
        assert a["clock"] == b["clock"] == 6 and a["exchanges"] == b["exchanges"] == 6
        assert torch.equal(a["x"], b["x"]), f"rank {rank}: parameters differ after the resume"
        assert torch.equal(a["center"], b["center"]), f"rank {rank}: the center differs"


def test_async_checkpoint_roles():
    """The shared center is the job's: only rank 0's state holds it, so loading cannot race
    (it was 'the last rank to load wins'); each rank loads its own state."""
    outs = values(run_ranks(3, aw.async_checkpoint_roles))
    assert [o["has_center"] for o in outs] == [True, False, False]
    for rank, o in enumerate(outs):
        assert f"state was saved by rank {(rank + 1) % 3}, this is rank {rank}" in o["error"]
