"""Many short 2-rank asynchronous jobs, for the test that no job dies at exit
(python exit_race.py JOBS PARALLEL [--stress] [--plain] [--destroy] [--patience S]
[--budget S --min-jobs N]).

Each rank is a child forked from this process (torch and easgd_ext imported once, so a job
costs a fraction of a second, not an interpreter start) that joins a Gloo group, builds an
``ElasticAverager(mode="async")``, steps a few times, calls close() (and, with ``--destroy``,
``destroy_process_group()``), and then leaves through the interpreter's normal shutdown, the
way a user's script ends. ``--patience 0`` gives Gloo's thread no time to let go within each
collective, so that every release is left to the wait at exit (a loaded machine's case). The parent prints one JSON line: the jobs started, the exit code of
every rank, the ranks that hung (killed after 120 s) and the time taken. With ``--budget``, no
job starts after that many seconds once ``--min-jobs`` have started (a loaded machine runs fewer).

What used to go wrong: Gloo's worker thread dropped its reference to a finished collective a
moment after wait() returned; when the temporaries of the construction-time collectives were
gone from Python by then, that thread had to release their Python objects itself, needing the
GIL, and if the interpreter was shutting down the thread was made to exit inside a C++
destructor: std::terminate, SIGABRT. ``--stress`` makes that interleaving common instead of
rare: each rank runs on one CPU and its Gloo threads (the threads ``init_process_group``
starts) get the SCHED_IDLE policy, so a Gloo thread that wakes the main thread is preempted by
it at once and resumes only when the main thread blocks, as on a machine with more runnable
threads than cores. ``--plain`` runs torch's own object collectives and nothing else (no
easgd_ext): a check that the stress still produces the failure on this machine.

Without the fix, under ``--stress`` (2 jobs at a time, 2 shared cores): 22 of 80 ranks (40
jobs) died of SIGABRT; ``--plain``: 24 of 80. With ``--destroy`` the old code passed 80 of 80
under the stress: destroy_process_group() blocks the main thread, which lets the starved Gloo
thread finish first (jobs with it failed too, 4 of 26, but only under natural timing).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import sys
import tempfile
import time

import torch
import torch.distributed as dist

import easgd_ext

WORLD = 2
RANK_DEADLINE_S = 120.0  # a rank still running after this is hung


def rank_main(store: str, rank: int, cpu: int | None, plain: bool, destroy: bool,
              patience: float | None) -> int:
    torch.set_num_threads(1)
    if patience is not None:
        easgd_ext._dist._RELEASE_PATIENCE = patience
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})  # the threads started from here on inherit it
    before = set(os.listdir("/proc/self/task"))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD)
    if cpu is not None:
        for tid in set(os.listdir("/proc/self/task")) - before:
            try:
                os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
            except OSError:  # a thread that has already ended
                pass
    if plain:  # what create_or_attach and agree() did before
        box = [("name", None, "host")] if rank == 0 else [None]
        dist.broadcast_object_list(box, src=0)
        everyone: list = [None] * WORLD
        dist.all_gather_object(everyone, {"value": box[0], "error": None})
        return 0
    params = [torch.nn.Parameter(torch.randn(100))]
    avg = easgd_ext.ElasticAverager(params, tau=1, mode="async")
    for _ in range(3):
        with torch.no_grad():
            params[0].add_(0.01)
        avg.step()
    avg.close()
    if destroy:
        dist.destroy_process_group()
    return 0


def main(argv: list[str]) -> tuple[str, int, int | None, bool, bool, float | None] | None:
    """Runs the jobs; returns (what a child runs) in a child, None in the parent."""
    parser = argparse.ArgumentParser(prog="exit_race.py")
    parser.add_argument("jobs", type=int, help="at most this many jobs")
    parser.add_argument("parallel", type=int, help="jobs at a time")
    parser.add_argument("--stress", action="store_true")
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--destroy", action="store_true")
    parser.add_argument("--patience", type=float, default=None,
                        help="seconds a collective waits for Gloo's thread to let go")
    parser.add_argument("--budget", type=float, default=None,
                        help="start no job after this many seconds, once --min-jobs have started")
    parser.add_argument("--min-jobs", type=int, default=0)
    args = parser.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    tmp = tempfile.mkdtemp(prefix="easgd-exit-race-")
    running: dict[int, float] = {}  # pid: when its job started
    codes: list[int] = []
    started, hung = 0, 0
    t0 = time.monotonic()

    def may_start() -> bool:
        within = args.budget is None or time.monotonic() - t0 < args.budget
        return started < args.jobs and (within or started < args.min_jobs)

    while may_start() or running:
        while may_start() and len(running) < args.parallel * WORLD:
            for rank in range(WORLD):
                cpu = cpus[(started * WORLD + rank) % len(cpus)] if args.stress else None
                pid = os.fork()
                if pid == 0:
                    return (f"{tmp}/store{started}", rank, cpu, args.plain, args.destroy,
                            args.patience)
                running[pid] = time.monotonic()
            started += 1
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for pid, since in list(running.items()):
                if time.monotonic() - since > RANK_DEADLINE_S:  # hung: a failure too
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    _remove_centers_of(pid)
                    running.pop(pid)
                    hung += 1
            time.sleep(0.01)
            continue
        running.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        codes.append(code)
        if code != 0:
            _remove_centers_of(pid)  # a rank 0 that died leaves its center behind
    for path in glob.glob(f"{tmp}/*"):
        os.remove(path)
    os.rmdir(tmp)
    print(json.dumps({"jobs": started, "codes": codes, "hung": hung,
                      "seconds": round(time.monotonic() - t0, 1)}))
    return None


def _remove_centers_of(pid: int) -> None:
    for path in glob.glob(f"/dev/shm/easgd-{pid}-*"):
        os.remove(path)


if __name__ == "__main__":
    child = main(sys.argv[1:])
    if child is not None:
        # A child leaves through the interpreter's normal shutdown (SystemExit unwinds to the
        # top level), as a user's script does; nothing above encloses the fork in a finally.
        raise SystemExit(rank_main(*child))
