"""Faults a real cluster produces, on real processes with real signals, each bounded by a
timeout so that a hang fails the test instead of stalling CI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_harness import run_ranks, values
from dist_workers import sync_fault


@pytest.mark.parametrize("fault,timeout,bound", [
    ("kill", 60.0, 20.0),    # a dead peer: Gloo notices at once, no waiting for the timeout
    ("stop", 3.0, 20.0),     # a frozen peer: the exchange timeout
    ("uneven", 60.0, 20.0),  # a peer that stopped calling step(): it left, Gloo notices
])
def test_a_dead_frozen_or_departed_rank_is_a_clear_error(fault, timeout, bound):
    steps = 5
    # The group's own timeout bounds the frozen collective left on Gloo's thread, which
    # destroy_process_group() waits for (60 s would be the test's time, not the fault's).
    results = run_ranks(3, sync_fault, fault, steps, timeout, casualties=(1,) if fault != "uneven" else (),
                        timeout=120, group_timeout=max(10.0, 3 * timeout) if fault == "stop" else 60.0)
    for rank in (0, 2):
        out = values([results[rank]])[0]
        assert out["error"] is not None, f"rank {rank} did not notice"
        assert out["step"] == steps
        assert f"the exchange at clock {steps} failed on rank {rank} of 3" in out["error"]
        assert out["silent"] == [1] and "rank 1 did not take part" in out["error"]
        assert f"The clock is back at {steps - 1}" in out["error"] and out["clock"] == steps - 1
        assert out["exchanges"] == steps - 1
        assert out["x_unchanged"] and out["center_unchanged"], "a failed exchange changed the state"
        assert out["seconds"] < bound
        if fault == "stop":
            assert out["seconds"] >= timeout * 0.9


RUNS = 3


@pytest.mark.parametrize("algo,mode", [("easgd", "sync"), ("average", "sync"),
                                       ("easgd", "async"), ("downpour", "async")])
def test_a_finished_job_exits_cleanly_under_torchrun(algo, mode, tmp_path):
    """A script that builds an averager and trains to the end must exit 0 every time. (A Gloo
    worker thread that released the last collective's tensors during interpreter shutdown
    aborted such jobs after they finished: exit code -6, in 3-6 of 8 runs.)"""
    script = Path(__file__).with_name("torchrun_script.py")
    for run in range(RUNS):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
             "--standalone", "--log-dir", str(tmp_path / f"logs{run}"), str(script), algo, mode],
            capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"run {run}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        assert proc.stdout.count("done") == 2


# ---- shared centers left behind -------------------------------------------------------------------
import os  # noqa: E402
import signal  # noqa: E402

import async_workers as aw  # noqa: E402
from dist_harness import Processes  # noqa: E402
from easgd_ext import SharedCenter  # noqa: E402
from easgd_ext.centers.__main__ import main as centers_cli  # noqa: E402
from easgd_ext.shared_center import unique_name  # noqa: E402


def test_sigterm_removes_the_creators_center():
    name = unique_name("sigterm")
    with Processes() as procs:
        ready = procs.ctx.Event()
        creator = procs.start(aw.create_and_die, name, 1000, ready)
        assert ready.wait(120)
        assert os.path.exists(f"/dev/shm/{name}")
        creator.terminate()  # SIGTERM, as torchrun, kill, docker stop and schedulers send
        creator.join(30)
    assert creator.exitcode == -signal.SIGTERM, "the process must still die of the signal"
    assert not os.path.exists(f"/dev/shm/{name}"), "SIGTERM leaked the shared center"


def test_sigterm_runs_the_users_own_handler_too(tmp_path):
    name, marker = unique_name("sigterm"), str(tmp_path / "handled")
    with Processes() as procs:
        ready = procs.ctx.Event()
        procs.start(aw.create_with_own_sigterm_handler, name, ready, marker)
        assert ready.wait(120)
        procs.procs[0].terminate()
        (result,) = procs.results(timeout=30)
    assert result.error_type == "SystemExit" and result.error == "3"  # the handler's sys.exit(3)
    assert open(marker).read() == "handled"
    assert not os.path.exists(f"/dev/shm/{name}")


def test_leftovers_of_dead_creators_are_listed_and_swept(capsys):
    stale, live, kept = unique_name("stale"), unique_name("live"), unique_name("kept")
    try:
        with Processes() as procs:
            for name, persistent in ((stale, False), (kept, True)):
                ready = procs.ctx.Event()
                victim = procs.start(aw.create_and_die, name, 1000, ready, persistent)
                assert ready.wait(120)
                victim.kill()  # SIGKILL: no handler can run, the name stays behind
                victim.join(30)
        mine = SharedCenter.create(live, like=[torch.zeros(10)])
        listed = {c["name"]: c for c in SharedCenter.list()}
        assert not listed[stale]["in_use"] and listed[live]["in_use"]
        assert listed[kept]["persistent"] and not listed[kept]["in_use"]
        assert centers_cli(["list"]) == 0
        out = capsys.readouterr().out
        assert stale in out and "stale (nobody uses it)" in out and "persistent, idle" in out
        assert centers_cli(["sweep"]) == 0
        assert stale in capsys.readouterr().out
        assert not os.path.exists(f"/dev/shm/{stale}")
        assert os.path.exists(f"/dev/shm/{live}") and os.path.exists(f"/dev/shm/{kept}")
        # (not sweep(include_persistent=True) here: it would also take a persistent center that
        # a test running beside this one keeps between two attempts of its job)
        assert centers_cli(["remove", kept]) == 0
        assert centers_cli(["remove", live]) == 0 and not os.path.exists(f"/dev/shm/{live}")
        assert centers_cli(["remove", live]) == 1
        mine.close()
    finally:
        for name in (stale, live, kept):
            SharedCenter.remove(name)


def test_torchrun_restart_continues_from_the_same_center(tmp_path):
    """Under `torchrun --max-restarts`, a crashed worker makes the agent restart the whole group
    (rank 0 included); with a named center the restarted workers re-attach to it and go on from
    where the job was, and the center is removed only when the job is done."""
    name = unique_name("restart")
    script = Path(__file__).with_name("torchrun_restart.py")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
             "--max-restarts", "1", "--log-dir", str(tmp_path / "logs"), str(script), name],
            capture_output=True, text=True, timeout=240)
        out = proc.stdout
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len(re.findall(r"attempt 0 rank \d: \d+ chunk updates", out)) == 2, out
        # the two ranks' lines may run into each other on one line of stdout
        restarted = re.findall(r"attempt 1 rank \d: (\d+) chunk updates at start, starts from "
                               r"the center: (True|False)", out)
        assert len(restarted) == 2, out
        for updates, from_center in restarted:
            assert int(updates) > 0, "the restarted job did not find the first attempt's center"
            assert from_center == "True"
        assert "done after attempt 1" in out
        assert not os.path.exists(f"/dev/shm/{name}")
    finally:
        SharedCenter.remove(name)
