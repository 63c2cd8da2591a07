"""What another local user, a corrupt header or a closed terminal can do to a shared center
(issue 21), on real processes and real files in /dev/shm.

Every fault is tried several times, in a child process bounded by a timeout (this file run as a
script: see `main` at the end), so a hang or a SIGBUS fails the test instead of the suite. Each
attempt must end in a clear error, of the right type, naming what was wrong, within DEADLINE_S.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pwd
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import easgd_ext
from easgd_ext import ElasticAverager, SharedCenter
from easgd_ext.shared_center import unique_name

HERE = Path(__file__).resolve()
PYTHONPATH = os.pathsep.join([str(Path(easgd_ext.__file__).resolve().parents[1]), str(HERE.parent)])
RETRIES = 5         # each fault, by this user
USER_RETRIES = 3    # each fault involving another user
DEADLINE_S = 3.0    # per attempt: a clear error comes at once, a hang never does
CHILD_TIMEOUT_S = 60.0
PROBE_USER = "easgdprobe"

# The C struct layout of SegmentHeader (csrc/segment.h), little-endian: magic[8], version u32,
# header_bytes u32, total_bytes u64, dtype u32, max_workers u32, numel i64, chunk_numel i64,
# num_chunks i64, chunks/workers/data offsets u64, creator_pid i64.
HEADER = struct.Struct("<8sIIQIIqqqQQQq")
FIELDS = ("magic", "version", "header_bytes", "total_bytes", "dtype", "max_workers", "numel",
          "chunk_numel", "num_chunks", "chunks_offset", "workers_offset", "data_offset", "creator_pid")
FORMATS = dict(zip(FIELDS, ("8s", "I", "I", "Q", "I", "I", "q", "q", "q", "Q", "Q", "Q", "q")))


def shm_path(name: str) -> str:
    return f"/dev/shm/{name}"


def read_header(name: str) -> dict[str, Any]:
    with open(shm_path(name), "rb") as f:
        return dict(zip(FIELDS, HEADER.unpack(f.read(HEADER.size))))


def poke(name: str, **values: int) -> None:
    """Overwrites header fields of the file in place, at their offsets in the C struct."""
    offsets, at = {}, 0
    for field in FIELDS:
        offsets[field] = at
        at += struct.calcsize("<" + FORMATS[field])
    with open(shm_path(name), "r+b") as f:
        for field, value in values.items():
            f.seek(offsets[field])
            f.write(struct.pack("<" + FORMATS[field], value))


def remove_quietly(*names: str) -> None:
    for name in names:
        path = shm_path(name)
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        elif os.path.lexists(path):
            os.unlink(path)


# ---- the attempts (run in a child, or in this process where nothing can hang or crash) ----------
def _create(name: str) -> Any:
    SharedCenter.create(name, like=[torch.zeros(10)]).close()


def _open_or_create(name: str) -> Any:
    SharedCenter.open_or_create(name, like=[torch.zeros(10)]).close()


def _attach(name: str) -> Any:
    SharedCenter.attach(name).close()


def _attach_and_read(name: str) -> Any:
    """What `python -m easgd_ext.centers list` and a curious user do: the header, the workers."""
    center = SharedCenter.attach(name, allow_stale=True)
    center.info()
    return len(center.worker_info())


def _averager(name: str) -> Any:
    ElasticAverager([torch.nn.Parameter(torch.zeros(10))], mode="async", center=name).close()


def _listed(name: str) -> Any:
    return [{"name": c["name"], "corrupt": c.get("corrupt")} for c in SharedCenter.list()
            if c["name"] == name]


def _cli_list(name: str) -> Any:
    from easgd_ext.centers.__main__ import main as centers_cli
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        centers_cli(["list"])
    return [line for line in out.getvalue().splitlines() if name in line]


def _remove(name: str) -> Any:
    return SharedCenter.remove(name)


def _create_persistent(name: str) -> Any:
    SharedCenter.create(name, like=[torch.zeros(10)], persistent=True).close()


OPS: dict[str, Callable[[str], Any]] = {
    "create": _create, "open_or_create": _open_or_create, "attach": _attach,
    "attach_and_read": _attach_and_read, "averager": _averager, "list": _listed,
    "cli_list": _cli_list, "remove": _remove, "create_persistent": _create_persistent,
}


def attempt(op: str, name: str, retries: int) -> list[dict[str, Any]]:
    """`op` on `name`, `retries` times: what each attempt raised (or returned), and how long it
    took."""
    records = []
    for i in range(retries):
        start = time.monotonic()
        record: dict[str, Any] = {"op": op, "name": name, "attempt": i}
        try:
            record["result"] = OPS[op](name)
            record["type"] = None
        except Exception as exc:  # noqa: BLE001 -- the test decides what was expected
            record["type"], record["error"] = type(exc).__name__, str(exc)
        record["seconds"] = time.monotonic() - start
        records.append(record)
    return records


def in_child(plan: list[tuple[str, str, int]], as_user: str | None = None,
             timeout: float = CHILD_TIMEOUT_S) -> list[dict[str, Any]]:
    """Runs the (op, name, retries) of `plan` in a fresh process (as `as_user`, dropping root's
    privileges after the imports); a hang or a crash fails the test."""
    spec = json.dumps({"plan": plan, "user": as_user})
    proc = run_script(["attempts", spec], timeout)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def run_script(args: list[str], timeout: float, prefix: list[str] | None = None) -> Any:
    cmd = [*(prefix or []), sys.executable, str(HERE), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": PYTHONPATH})
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{args[0]} hung: no answer within {timeout:.0f} s (output so far: "
                    f"{exc.stdout!r})")
    if proc.returncode < 0:
        pytest.fail(f"{args[0]} crashed: killed by {signal.Signals(-proc.returncode).name}; "
                    f"stdout: {proc.stdout[-1500:]}\nstderr: {proc.stderr[-1500:]}")
    assert proc.returncode == 0, f"{args[0]} exited {proc.returncode}: {proc.stderr[-3000:]}"
    return proc


def expect(records: list[dict[str, Any]], op: str, name: str, error: str, *words: str,
           retries: int = RETRIES) -> float:
    """Every attempt of `op` on `name` raised `error` naming `words`, in time; returns the slowest."""
    mine = [r for r in records if r["op"] == op and r["name"] == name]
    assert len(mine) == retries, f"{op}: {len(mine)} attempts reported, {retries} expected"
    for r in mine:
        assert r["type"] == error, f"{op} attempt {r['attempt']}: {r['type']} ({r.get('error')}), not {error}"
        for word in words:
            assert word in r["error"], f"{op} attempt {r['attempt']}: {word!r} not in {r['error']!r}"
        assert r["seconds"] < DEADLINE_S, f"{op} attempt {r['attempt']} took {r['seconds']:.2f} s"
    slowest = max(r["seconds"] for r in mine)
    print(f"{op}: {len(mine)}/{retries} {error} within {slowest * 1e3:.1f} ms")  # shown with -s
    return slowest


# ---- 1. a FIFO, a directory or a symlink where a center should be --------------------------------
@pytest.mark.parametrize("kind,what,attach_error", [
    ("fifo", "is a FIFO, not an easgd_ext center", "ValueError"),
    ("directory", "is a directory, not an easgd_ext center", "IsADirectoryError"),
    ("symlink", "is a symbolic link, not an easgd_ext center", "ValueError"),
])
def test_a_non_regular_file_is_named_never_waited_on(kind, what, attach_error):
    """Anyone can make /dev/shm/<name> a FIFO: a blocking open to describe it hung create() and
    open_or_create() forever. Now nothing is opened without O_NONBLOCK | O_NOFOLLOW, and what is
    there is said."""
    name, target = unique_name(f"planted-{kind}"), unique_name("target")
    try:
        if kind == "fifo":
            os.mkfifo(shm_path(name), 0o600)
        elif kind == "directory":
            os.mkdir(shm_path(name), 0o700)
        else:
            SharedCenter.create(target, like=[torch.zeros(10)], persistent=True)
            os.symlink(shm_path(target), shm_path(name))  # even to a real center: not followed
        plan = [(op, name, RETRIES) for op in ("create", "open_or_create", "attach")]
        records = in_child(plan)
        expect(records, "create", name, "FileExistsError", f"'{name}'", what)
        expect(records, "open_or_create", name, "FileExistsError", f"'{name}'", what)
        expect(records, "attach", name, attach_error, f"'{name}'", what)
    finally:
        remove_quietly(name, target)


def probe_user() -> pwd.struct_passwd:
    """A throwaway unprivileged user for the faults made by someone else (root only)."""
    if os.geteuid() != 0:
        pytest.skip("another user's files need root to make a second user and act as it")
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(PROBE_USER)
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not available to make a throwaway user")
    made = subprocess.run(["useradd", "-M", "-r", "-s", "/usr/sbin/nologin", PROBE_USER],
                          capture_output=True, text=True, timeout=30)
    if made.returncode != 0 and "already exists" not in made.stderr:
        pytest.skip(f"useradd {PROBE_USER} failed: {made.stderr.strip()}")
    return pwd.getpwnam(PROBE_USER)


def as_probe(user: pwd.struct_passwd, *cmd: str) -> None:
    """Runs `cmd` as the probe user (a subprocess that drops root's privileges first)."""
    def drop() -> None:
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
    subprocess.run(list(cmd), check=True, timeout=30, preexec_fn=drop)


def test_a_fifo_planted_by_another_user_is_named_never_waited_on():
    """The attack of the issue: a FIFO at a fixed persistent name, made by someone else. Both
    ways: the probe user's FIFO met by root, and root's (world-writable) FIFO met by the probe
    user."""
    user = probe_user()
    theirs, roots = unique_name("job-42"), unique_name("job-43")
    ops = ("create", "open_or_create", "attach")
    what = "is a FIFO, not an easgd_ext center"
    try:
        as_probe(user, "mkfifo", "-m", "0666", shm_path(theirs))
        assert os.lstat(shm_path(theirs)).st_uid == user.pw_uid
        os.mkfifo(shm_path(roots))
        os.chmod(shm_path(roots), 0o666)
        for victim, name, owner in ((None, theirs, f"uid {user.pw_uid}"), (PROBE_USER, roots, "uid 0")):
            records = in_child([(op, name, USER_RETRIES) for op in ops], as_user=victim)
            for op, error in zip(ops, ("FileExistsError", "FileExistsError", "ValueError")):
                expect(records, op, name, error, f"'{name}'", what, f"it belongs to {owner}",
                       retries=USER_RETRIES)
    finally:
        remove_quietly(theirs, roots)


# ---- 2. a corrupt header ---------------------------------------------------------------------------
CORRUPTIONS = {
    # 0xFFFFFFFF workers: the size plan wrapped to the right size, then 4 billion slots were read
    "max_workers": lambda h: {"max_workers": 0xFFFFFFFF},
    # 2**62 elements: 2**64 bytes, which wraps to 0
    "numel": lambda h: {"numel": 2**62},
    # the wrap made consistent: numel * 4 wraps to the real data size, and two chunks of half
    # that (with their slot) fit the page the data starts on, so every other field agrees
    "numel wrapping to the real size": lambda h: {
        "numel": h["numel"] + 2**62, "chunk_numel": (h["numel"] + 2**62) // 2, "num_chunks": 2,
        "workers_offset": h["workers_offset"] + 64},
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_header_is_refused_naming_the_field(corruption):
    name = unique_name("corrupt")
    field = corruption.split()[0]
    center = SharedCenter.create(name, like=[torch.zeros(100)], workers=2)
    try:
        header = read_header(name)  # the layout the poke assumes, checked against the center
        assert header["magic"] == b"EASGDCTR" and header["numel"] == center.numel
        assert header["max_workers"] == 2 and header["num_chunks"] == center.num_chunks
        poke(name, **CORRUPTIONS[corruption](header))
        ops = ("attach_and_read", "averager", "create", "list", "cli_list")
        records = in_child([(op, name, RETRIES) for op in ops])
        expect(records, "attach_and_read", name, "ValueError", f"'{name}'", "corrupt", field)
        expect(records, "averager", name, "ValueError", f"'{name}'", "corrupt", field)
        expect(records, "create", name, "FileExistsError", f"'{name}'", "corrupt", field)
        for op in ("list", "cli_list"):  # reported, and the listing goes on
            mine = [r for r in records if r["op"] == op]
            assert len(mine) == RETRIES and all(r["type"] is None for r in mine), mine
            slowest = max(r["seconds"] for r in mine)
            assert slowest < DEADLINE_S
            print(f"{op}: {RETRIES}/{RETRIES} listed as corrupt within {slowest * 1e3:.1f} ms")
        for r in records:
            if r["op"] == "list":
                assert len(r["result"]) == 1 and field in r["result"][0]["corrupt"], r
            if r["op"] == "cli_list":
                assert len(r["result"]) == 1 and "corrupt" in r["result"][0], r
    finally:
        center.close()


def private_shm_prefix() -> list[str]:
    """A command prefix giving the child its own empty /dev/shm (a mount namespace), so that
    sweep there cannot remove what other runs on this machine keep."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("sweep is tested in a private /dev/shm, which needs root and unshare")
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=64m,mode=1777 tmpfs /dev/shm"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"no private /dev/shm here: {probe.stderr.strip()}")
    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs -o size=64m,mode=1777 tmpfs /dev/shm && exec "$@"', "sh"]


def test_list_and_sweep_report_corrupt_centers_and_go_on():
    """`centers list` and `sweep` (CLI and Python) on a /dev/shm holding two corrupt centers, a
    stale one and a live one: the corrupt ones are listed as such and kept, unless asked."""
    proc = run_script(["sweep_scenario"], CHILD_TIMEOUT_S, prefix=private_shm_prefix())
    out = json.loads(proc.stdout.splitlines()[-1])
    a, b, stale, live = out["names"]
    assert len(out["list_runs"]) == RETRIES and len(out["sweep_runs"]) == RETRIES
    for printed in out["list_runs"]:
        assert f"{a}" in printed and "max_workers" in printed and f"{b}" in printed
        assert "corrupt" in printed and live in printed
    assert out["python_list"] == {a: "max_workers", b: "numel", stale: None, live: None}
    assert out["swept"] == [stale]
    for printed in out["sweep_runs"]:
        assert "kept 2 corrupt center(s)" in printed and a in printed and b in printed
        assert "--include-corrupt" in printed and "centers remove" in printed
    assert sorted(out["swept_corrupt"]) == sorted([a, b])
    assert out["left"] == [live]


def sweep_scenario() -> None:
    """(In a private /dev/shm.) Two corrupt centers, a stale and a live one; list and sweep."""
    from easgd_ext.centers.__main__ import main as centers_cli
    a, b, stale, live = (unique_name(x) for x in ("bad-workers", "bad-numel", "stale", "live"))
    keep = [SharedCenter.create(n, like=[torch.zeros(10)], workers=2) for n in (a, b, stale, live)]
    poke(a, max_workers=0xFFFFFFFF)
    poke(b, numel=2**62)
    gone = subprocess.Popen(["true"])
    gone.wait()
    poke(stale, creator_pid=gone.pid)  # its creator is gone: left by a crashed run

    def cli(*args: str) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert centers_cli(list(args)) == 0
        return out.getvalue()

    result: dict[str, Any] = {"names": [a, b, stale, live]}
    result["list_runs"] = [cli("list") for _ in range(RETRIES)]
    corrupt = {c["name"]: c.get("corrupt") for c in SharedCenter.list()}
    result["python_list"] = {n: (next((f for f in ("max_workers", "numel") if f in corrupt[n]), "?")
                                 if corrupt[n] else None) for n in corrupt}
    result["swept"] = SharedCenter.sweep()
    result["sweep_runs"] = [cli("sweep") for _ in range(RETRIES)]
    result["swept_corrupt"] = SharedCenter.sweep(include_corrupt=True)
    result["left"] = sorted(os.listdir("/dev/shm"))
    del keep
    print(json.dumps(result))


# ---- 3. another user's center --------------------------------------------------------------------
def test_another_users_center_is_a_permission_error():
    """Both ways: the probe user attaching root's center (EACCES from shm_open), and root
    attaching the probe user's (it could open it, but the center is not its own)."""
    user = probe_user()
    mine, theirs = unique_name("root-owned"), unique_name("probe-owned")
    center = SharedCenter.create(mine, like=[torch.zeros(10)])
    try:
        plan = [("create_persistent", theirs, 1)] + [
            (op, mine, USER_RETRIES) for op in ("attach", "open_or_create", "create", "remove")]
        records = in_child(plan, as_user=PROBE_USER)
        assert records[0]["type"] is None, records[0]
        assert os.stat(shm_path(theirs)).st_uid == user.pw_uid
        owner = "belongs to uid 0 (root)"
        expect(records, "attach", mine, "PermissionError", f"'{mine}'", owner, retries=USER_RETRIES)
        expect(records, "open_or_create", mine, "PermissionError", owner, retries=USER_RETRIES)
        expect(records, "create", mine, "FileExistsError", owner, retries=USER_RETRIES)
        expect(records, "remove", mine, "PermissionError", owner, retries=USER_RETRIES)
        assert os.path.exists(shm_path(mine))

        owner = f"belongs to uid {user.pw_uid} ({PROBE_USER})"
        records = [r for op in ("attach", "open_or_create", "create")
                   for r in attempt(op, theirs, USER_RETRIES)]
        expect(records, "attach", theirs, "PermissionError", f"'{theirs}'", owner, retries=USER_RETRIES)
        expect(records, "open_or_create", theirs, "PermissionError", owner, retries=USER_RETRIES)
        expect(records, "create", theirs, "FileExistsError", owner, retries=USER_RETRIES)
    finally:
        center.close()
        remove_quietly(theirs)


# ---- 4. SIGHUP -----------------------------------------------------------------------------------
def test_sighup_removes_the_creators_center(tmp_path):
    """A closed terminal sends SIGHUP: the creator removes its center and still dies of the
    signal; a handler of the user's still runs; an ignored SIGHUP stays ignored (nothing is
    removed, the process lives on)."""
    runs = [("default", unique_name("hup")) for _ in range(RETRIES)]
    runs += [("own_handler", unique_name("hup-own")), ("ignored", unique_name("hup-ign"))]
    procs = []
    try:
        for i, (how, name) in enumerate(runs):
            ready = tmp_path / f"ready{i}"
            procs.append((subprocess.Popen(
                [sys.executable, str(HERE), "hup_creator", name, how, str(ready), str(tmp_path / f"mark{i}")],
                env={**os.environ, "PYTHONPATH": PYTHONPATH}, stderr=subprocess.PIPE, text=True), ready))
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while not all(r.exists() for _, r in procs):
            assert time.monotonic() < deadline, "a creator never got ready"
            assert all(p.poll() is None for p, _ in procs), "a creator died before it was ready"
            time.sleep(0.05)
        for (how, name), (p, _) in zip(runs, procs):
            assert os.path.exists(shm_path(name))
            p.send_signal(signal.SIGHUP)
        sent = time.monotonic()
        for i, ((how, name), (p, _)) in enumerate(zip(runs, procs)):
            if how == "ignored":
                with pytest.raises(subprocess.TimeoutExpired):
                    p.wait(timeout=1.0)
                assert os.path.exists(shm_path(name)), "an ignored SIGHUP removed the center"
                p.terminate()  # SIGTERM: now it dies, and removes its center
                assert p.wait(timeout=30) == -signal.SIGTERM
            else:
                code = p.wait(timeout=30)
                if how == "default":
                    assert code == -signal.SIGHUP, f"run {i}: exit {code}, {p.stderr.read()[-2000:]}"
                else:
                    assert code == 3 and (tmp_path / f"mark{i}").read_text() == "handled"
            assert not os.path.exists(shm_path(name)), f"run {i} ({how}): SIGHUP leaked the center"
            print(f"SIGHUP run {i} ({how}): exit {p.returncode}, center removed, "
                  f"{time.monotonic() - sent:.2f} s after the signal")  # shown with -s
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        remove_quietly(*(name for _, name in runs))


def hup_creator(name: str, how: str, ready: str, marker: str) -> None:
    if how == "ignored":
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    elif how == "own_handler":
        def handler(signum: int, frame: Any) -> None:
            Path(marker).write_text("handled")
            sys.exit(3)
        signal.signal(signal.SIGHUP, handler)
    SharedCenter.create(name, like=[torch.zeros(100)], workers=1)
    Path(ready).write_text("ready")
    time.sleep(120)


# ---- the child's side ------------------------------------------------------------------------------
def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "attempts":
        spec = json.loads(args[0])
        if spec["user"] is not None:  # imports done as root; from here on, that user
            user = pwd.getpwnam(spec["user"])
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
        for op, name, retries in spec["plan"]:
            for record in attempt(op, name, retries):
                print(json.dumps(record), flush=True)
    elif command == "sweep_scenario":
        sweep_scenario()
    elif command == "hup_creator":
        hup_creator(*args)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
