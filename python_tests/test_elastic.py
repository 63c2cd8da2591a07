"""An elastic job (easgd_ext.init_process_group(elastic=True)): real processes on localhost,
the default Gloo group reconfigured in place by torch. A process started later joins at the
start of a window and the group grows; a killed rank is left behind and a replacement brings
the group back to its size; every process ends with the same center."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import easgd_ext

WORKER = Path(__file__).with_name("elastic_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out: Path, port: int, world: int, rank: int | None, *extra: str, wire: str = "",
           streamed: bool = False) -> subprocess.Popen:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": str(world), "WIRE": wire, "OMP_NUM_THREADS": "1",
           "FRAGMENTS": "3" if streamed else "1", "DELAY": "1" if streamed else "0"}
    if rank is None:
        env["EASGD_EXT_JOIN"] = "1"
        env.pop("RANK", None)
    else:
        env["RANK"] = str(rank)
    return subprocess.Popen([sys.executable, str(WORKER), str(out), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run_job(tmp_path: Path, world: int, kill: tuple[int, int] | None = None, wire: str = "",
             joiner_wire: str | None = None, joiner_code: int = 0,
             streamed: bool = False) -> tuple[list[dict], str]:
    port = _free_port()
    extra = tuple(map(str, kill)) if kill else ()
    members = [_start(tmp_path, port, world, r, *extra, wire=wire, streamed=streamed)
               for r in range(world)]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("started-*"))) < world and time.monotonic() < deadline:
        time.sleep(0.1)  # the members are training: now a process joins
    joiner = _start(tmp_path, port, world, None, wire=wire if joiner_wire is None else joiner_wire,
                    streamed=streamed)
    logs = []
    for p in members + [joiner]:
        try:
            logs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for q in members + [joiner]:
                q.kill()
            raise AssertionError("the elastic job hung:\n" + "\n".join(logs))
    codes = [p.returncode for p in members + [joiner]]
    expected = [3 if kill and r == kill[0] else 0 for r in range(world)] + [joiner_code]
    assert codes == expected, "\n".join(logs)
    return [json.loads(f.read_text()) for f in tmp_path.glob("[0-9]*.json")], logs[-1]


def _check_one_center(results: list[dict], world: int) -> None:
    assert len(results) == world and all(r["world"] == world for r in results), results
    assert sorted(r["rank"] for r in results) == list(range(world))
    centers = {json.dumps(r["center"]) for r in results}
    assert len(centers) == 1, "the centers differ across the ranks"
    assert len({r["clock"] for r in results}) == 1 and all(r["finite"] for r in results)


@pytest.mark.parametrize("wire,streamed", [("", False), ("int8", False), ("int8", True)])
def test_a_process_that_joins_grows_the_group_and_takes_the_center(tmp_path, wire, streamed):
    """``streamed``: 3 fragments, each applied a step after its send (the admission lands the
    ones in flight first)."""
    results, _ = _run_job(tmp_path, 3, wire=wire, streamed=streamed)
    _check_one_center(results, 4)
    joiner = next(r for r in results if r["joiner"])
    members = [r for r in results if not r["joiner"]]
    assert joiner["rank"] == 3 and joiner["workers_joined"] == 1
    assert all(r["workers_joined"] == 1 and r["failures_survived"] == 0 for r in members)
    # admitted at a window's start, with the members (whose clock then was the same)
    assert joiner["joined_at"] % 4 == 0 and {r["joined_at"] for r in members} == {joiner["joined_at"]}
    # it took part in every exchange since: the one due at its admission (a window's start)
    # and each fragment's once a window in the 40 steps after (the last landed by the flush)
    fragments = 3 if streamed else 1
    assert joiner["exchanges"] == 1 + fragments * 40 // 4


def test_a_replacement_brings_the_group_back_after_a_death(tmp_path):
    results, _ = _run_job(tmp_path, 4, kill=(3, 10))
    _check_one_center(results, 4)
    survivors = [r for r in results if not r["joiner"]]
    assert sorted(r["start_rank"] for r in survivors) == [0, 1, 2]
    assert all(r["failures_survived"] == 1 and r["workers_joined"] == 1 for r in survivors)


def test_a_joiner_built_otherwise_is_refused_and_the_job_goes_on_without_it(tmp_path):
    results, joiner_log = _run_job(tmp_path, 3, joiner_wire="bfloat16", joiner_code=1)
    assert "this process cannot join: the running job's averagers differ from its own: " \
           "settings.comm_dtype is None in the job but 'bfloat16' here" in joiner_log, joiner_log
    # the members had let it in: their next exchange failed, and they went on without it
    _check_one_center(results, 3)
    assert all(r["workers_joined"] == 1 and r["failures_survived"] == 1 for r in results)


def test_join_needs_an_elastic_job():
    with pytest.raises(ValueError, match="join=True joins an elastic job: pass elastic=True too"):
        easgd_ext.init_process_group(join=True)
    with pytest.raises(TypeError, match="join must be a bool or None, got str"):
        easgd_ext.init_process_group(elastic=True, join="yes")
    with pytest.raises(ValueError, match="elastic=True runs Gloo"):
        easgd_ext.init_process_group("nccl", elastic=True)
    env = {k: os.environ.pop(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
           if k in os.environ}
    try:
        with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE not set"):
            easgd_ext.init_process_group(elastic=True)
    finally:
        os.environ.update(env)
