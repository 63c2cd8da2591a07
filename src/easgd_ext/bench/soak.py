"""Training through many failures (a soak): an elastic job (``init_process_group(elastic=True)``)
of --world Gloo ranks trains the main job's CNN (scikit-learn's digits) with EASGD and
``on_failure="continue"`` while this driver, which hosts the job's store as torchrun's agent
does, injects --faults faults at random ranks, by PID: SIGKILL, or SIGSTOP (the others leave
the rank behind after --exchange-timeout; SIGCONT then lets it find itself left out, and it
exits). After each fault a replacement joins from the center and the group is whole again
before the next one. At the end every rank stops at the same clock, and the driver checks: no
hang (each phase within --exchange-timeout + 30 s), one center on every rank (the same bytes),
a finite model; it reports the faults survived and, per fault, the seconds until the others
went on and until the group was whole again.

    python -m easgd_ext.bench soak                          # 4 ranks, 300 faults (~25 min)
    python -m easgd_ext.bench soak --faults 20 --world 3    # the test suite's short form
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

from .cli import prog

STATUS, STOP, STOP_AT = "soak/status", "soak/stop", "soak/stop-at"
MARGIN = 30.0  # seconds past the exchange timeout that a phase may take before it is a hang


# ---- one rank ------------------------------------------------------------------------------------
def rank_process(out: Path, tau: int, timeout: float, go: Path | None) -> None:
    """One rank of the soak's job; with ``go``, a standby that waits (torch imported) until the
    driver writes that file, then joins the running job."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import easgd_ext
    from easgd_ext import data, elastic

    torch.set_num_threads(1)
    split = data.digits(0)
    torch.manual_seed(0)
    model = data.DigitsCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    while go is not None and not go.exists():  # a standby is ready but for the group
        time.sleep(0.02)
    easgd_ext.init_process_group(elastic=True, join=go is not None,
                                 timeout=timedelta(seconds=timeout))
    warnings.simplefilter("ignore")  # the survivors' and the admissions' warnings: counted instead
    avg = easgd_ext.ElasticAverager(model.parameters(), tau=tau, on_failure="continue",
                                    exchange_timeout=timeout)
    store = elastic.state().store
    stream = data.Stream(split.train_x, split.train_y, 32, seed=os.getpid())
    stop_at = None
    while stop_at is None or avg.clock < stop_at:
        xb, yb = stream.next()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
        avg.step()
        if avg.clock % tau == 0:
            stop_at = _window_start(store, avg, dist.get_rank(), elastic.state().generation)
    avg.flush()
    center = torch.cat([c.reshape(-1) for c in avg.center_state()])
    with avg.center_parameters():
        error = data.test_error(model, split.test_x, split.test_y)
    (out / f"result-{os.getpid()}.json").write_text(json.dumps({
        "pid": os.getpid(), "rank": dist.get_rank(), "world": avg.world_size, "clock": avg.clock,
        "center_sha256": hashlib.sha256(center.numpy().tobytes()).hexdigest(),
        "test_error": error, "failures_survived": avg.stats.failures_survived,
        "workers_joined": avg.stats.workers_joined,
        "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters())}))
    dist.destroy_process_group()


def _window_start(store: Any, avg: Any, rank: int, generation: int) -> int | None:
    """Rank 0 reports the group to the driver and, once asked to stop, plans the stop two
    windows ahead (so every rank has seen the plan: as an admission, see the averager); every
    rank reads the plan. Returns the clock to stop at, if planned."""
    if rank == 0:
        store.set(STATUS, json.dumps({"world": avg.world_size, "clock": avg.clock,
                                      "generation": generation}))
        if store.check([STOP]) and not store.check([STOP_AT]):
            store.set(STOP_AT, str(avg.clock + 2 * avg.tau))
    return int(store.get(STOP_AT).decode()) if store.check([STOP_AT]) else None


# ---- the driver -----------------------------------------------------------------------------------
class Job:
    """The soak's processes: members (in the group, or leaving it) and standbys (torch imported,
    waiting to replace one)."""

    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        import torch.distributed as dist

        self.args, self.folder = args, folder
        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=60))
        # The ranks' view of this store: under the elastic job's namespace.
        from easgd_ext import elastic

        self.view = dist.PrefixStore(f"{elastic.NAMESPACE}attempt-0", self.store)
        self.members: list[subprocess.Popen] = []
        self.standbys: list[tuple[subprocess.Popen, Path]] = []
        self.exits: dict[int, int] = {}
        self.logs: list[Any] = []  # one per process, closed in close()
        for rank in range(args.world):
            self.members.append(self._spawn(rank, None))
        for _ in range(2):
            self._add_standby()

    def _spawn(self, rank: int | None, go: Path | None) -> subprocess.Popen:
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(self.store.port),
               "WORLD_SIZE": str(self.args.world), "TORCHELASTIC_USE_AGENT_STORE": "True",
               "OMP_NUM_THREADS": "1"}
        env.pop("TORCHELASTIC_RESTART_COUNT", None)
        if rank is not None:
            env["RANK"] = str(rank)
        command = [sys.executable, "-m", "easgd_ext.bench.soak", "--rank-process", str(self.folder),
                   str(self.args.tau), str(self.args.exchange_timeout)]
        if go is not None:
            command.append(str(go))
        log = open(self.folder / f"process-{len(self.logs)}.log", "w")  # noqa: SIM115
        self.logs.append(log)
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def _add_standby(self) -> None:
        go = self.folder / f"go-{len(self.exits)}-{time.monotonic_ns()}"
        self.standbys.append((self._spawn(None, go), go))

    def replace(self) -> None:
        """A standby joins; another is started in its place."""
        process, go = self.standbys.pop(0)
        go.write_text("1")
        self.members.append(process)
        self._add_standby()

    def status(self) -> dict[str, Any] | None:
        if not self.view.check([STATUS]):
            return None
        return json.loads(self.view.get(STATUS).decode())

    def reap(self) -> None:
        for p in list(self.members):
            if p.poll() is not None:
                self.exits[p.pid] = p.returncode
                self.members.remove(p)

    def live_members(self) -> list[subprocess.Popen]:
        self.reap()
        return [p for p in self.members if p.poll() is None]

    def close(self) -> None:
        for p in self.members + [s for s, _ in self.standbys]:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
        for log in self.logs:
            log.close()


class Hang(RuntimeError):
    """A phase of the soak took longer than its bound."""


def wait_for(job: Job, what: str, condition: Any, limit: float) -> float:
    """Seconds until ``condition(status)`` holds (status read from the job's store); a
    :class:`Hang` naming ``what`` after ``limit`` seconds."""
    start = time.monotonic()
    while True:
        status = job.status()
        if status is not None and condition(status):
            return time.monotonic() - start
        if time.monotonic() - start > limit:
            raise Hang(f"{what}: not within {limit:.0f} s (last status {status})")
        time.sleep(0.02)


def inject(job: Job, kind: str, rng: random.Random) -> dict[str, Any]:
    """One fault at a random member, then its replacement; the seconds of each phase."""
    args, world = job.args, job.args.world
    limit = args.exchange_timeout + MARGIN
    victim = rng.choice(job.live_members())
    before = job.status()["clock"]
    start = time.monotonic()
    victim.send_signal(signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
    went_on = wait_for(job, f"the others going on after a {kind}",
                       lambda s: s["world"] == world - 1 and s["clock"] > before, limit)
    if kind == "freeze":  # it finds itself left out and exits
        victim.send_signal(signal.SIGCONT)
        try:
            victim.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            raise Hang(f"a frozen rank (pid {victim.pid}) did not exit after SIGCONT") from None
    job.replace()
    whole = wait_for(job, "the replacement joining", lambda s: s["world"] == world,
                     limit + 20)  # + a standby's start
    return {"kind": kind, "pid": victim.pid, "went_on_seconds": went_on,
            "whole_seconds": time.monotonic() - start, "join_seconds": whole}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from easgd_ext.progress import bar

    rng = random.Random(args.seed)
    folder = Path(tempfile.mkdtemp(prefix="easgd_soak_"))
    job = Job(args, folder)
    faults: list[dict[str, Any]] = []
    problem = None
    start = time.monotonic()
    progress = bar(total=args.faults, desc="faults", unit="fault", file=sys.stderr)
    try:
        wait_for(job, "the job starting", lambda s: s["world"] == args.world and s["clock"] >= 4 * args.tau,
                 120)
        for _ in range(args.faults):
            kind = "kill" if rng.random() < args.kill_share else "freeze"
            faults.append(inject(job, kind, rng))
            progress.update(1)
            # a few windows of the whole group between faults
            clock = job.status()["clock"]
            wait_for(job, "the group stepping on", lambda s: s["clock"] >= clock + 2 * args.tau,
                     args.exchange_timeout + MARGIN)
        job.view.set(STOP, "1")
        for p in job.live_members():
            p.wait(timeout=args.exchange_timeout + MARGIN)
        job.reap()
    except (Hang, subprocess.TimeoutExpired) as exc:
        problem = str(exc)
    finally:
        progress.close()
        job.close()
    results = [json.loads(f.read_text()) for f in folder.glob("result-*.json")]
    return summarize(args, faults, results, job.exits, problem, time.monotonic() - start, folder)


def summarize(args: argparse.Namespace, faults: list[dict], results: list[dict],
              exits: dict[int, int], problem: str | None, seconds: float, folder: Path) -> dict[str, Any]:
    """The soak's record and its verdict (``problems``: empty when it passed)."""
    problems = [problem] if problem else []
    if not problem:
        if len(results) != args.world:
            problems.append(f"{len(results)} ranks finished, not {args.world}")
        if len({r["center_sha256"] for r in results}) > 1:
            problems.append("the ranks' centers differ")
        if len({r["clock"] for r in results}) > 1:
            problems.append("the ranks stopped at different clocks")
        if not all(r["finite"] and r["world"] == args.world for r in results):
            problems.append("a rank ended with a non-finite model or a smaller group")
        victims = {f["pid"] for f in faults}
        stray = {pid: code for pid, code in exits.items() if code != 0 and pid not in victims}
        if stray:
            problems.append(f"ranks that were not faulted exited with errors: {stray} "
                            f"(see the process-*.log files in {folder})")

    def spread(key: str) -> dict[str, float]:
        values = [f[key] for f in faults]
        return {"median": statistics.median(values), "max": max(values)} if values else {}

    return {"world": args.world, "tau": args.tau, "exchange_timeout": args.exchange_timeout,
            "faults": len(faults), "kills": sum(f["kind"] == "kill" for f in faults),
            "freezes": sum(f["kind"] == "freeze" for f in faults),
            "hangs": int(problem is not None and "not within" in problem),
            "went_on_seconds": spread("went_on_seconds"), "whole_seconds": spread("whole_seconds"),
            "final_test_error": results[0]["test_error"] if results else None,
            "seconds": seconds, "problems": problems, "logs": str(folder),
            "per_fault": faults}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("soak"), description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--world", type=int, default=4, help="ranks in the group (at least 2)")
    p.add_argument("--faults", type=int, default=300, help="faults to inject (at least 1)")
    p.add_argument("--kill-share", type=float, default=0.6,
                   help="share of the faults that are SIGKILLs; the others are SIGSTOPs")
    p.add_argument("--tau", type=int, default=4, help="local steps between exchanges")
    p.add_argument("--exchange-timeout", type=float, default=3.0,
                   help="seconds before a frozen rank is left behind (the group's timeout too)")
    p.add_argument("--seed", type=int, default=0, help="seed of the choice of faults and ranks")
    p.add_argument("--json", type=Path, default=None, help="write the record here")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.world < 2:
        p.error(f"--world must be at least 2, got {args.world}")
    if args.faults < 1:
        p.error(f"--faults must be at least 1, got {args.faults}")
    if not 0 <= args.kill_share <= 1:
        p.error(f"--kill-share must be in [0, 1], got {args.kill_share}")
    if args.tau < 1:
        p.error(f"--tau must be at least 1, got {args.tau}")
    if not args.exchange_timeout > 0:
        p.error(f"--exchange-timeout must be positive, got {args.exchange_timeout}")
    record = run(args)
    print(f"soak: {record['faults']} faults ({record['kills']} SIGKILL, {record['freezes']} "
          f"SIGSTOP) on {args.world} Gloo ranks, EASGD tau {args.tau}, exchange timeout "
          f"{args.exchange_timeout:g} s, {record['seconds']:.0f} s")
    for key, what in (("went_on_seconds", "fault -> the others go on"),
                      ("whole_seconds", "fault -> a replacement joined")):
        if record[key]:
            print(f"  {what}: median {record[key]['median']:.2f} s, max {record[key]['max']:.2f} s")
    if record["final_test_error"] is not None:
        print(f"  final test error of the center: {record['final_test_error']:.4f}")
    print(f"  hangs: {record['hangs']}; problems: {'; '.join(record['problems']) or 'none'}")
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
        print(f"json: {args.json}")
    return 0 if not record["problems"] else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-process":
        folder, tau, timeout = Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
        rank_process(folder, tau, timeout, Path(sys.argv[5]) if len(sys.argv) > 5 else None)
    else:
        sys.exit(main())
