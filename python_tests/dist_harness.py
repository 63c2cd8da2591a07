"""Real multi-process runs for the tests: p spawned processes joined in a Gloo group on
localhost (a FileStore, so no port can collide), each calling ``fn(rank, world, *args)``.

A rank's return value or exception comes back to the test; a rank that neither returns nor
raises within the deadline is a hang, and every process is killed.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass
class RankResult:
    value: Any = None
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None


def _entry(rank: int, world: int, store_path: str, out_dir: str, fn: Callable[..., Any],
           args: tuple, group_timeout: float = 60.0) -> None:
    torch.set_num_threads(1)  # p processes share a few cores
    os.environ.pop("WORLD_SIZE", None)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=group_timeout))
    try:
        result = RankResult(value=fn(rank, world, *args))
    except BaseException as exc:  # noqa: BLE001 -- reported to the test, which decides
        result = RankResult(error_type=type(exc).__name__, error=str(exc),
                            traceback=traceback.format_exc())
    torch.save(result.__dict__, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run_ranks(world: int, fn: Callable[..., Any], *args: Any, timeout: float = 240.0,
              casualties: tuple[int, ...] = (), group_timeout: float = 60.0) -> list[RankResult]:
    """Runs ``fn(rank, world, *args)`` on ``world`` processes; returns each rank's result.
    Raises ``TimeoutError`` if any process is still running after ``timeout`` seconds. The
    ``casualties`` are expected to die or freeze: once the others are done they are killed, and
    their result is an empty RankResult. ``group_timeout``: the process group's, which bounds
    a collective left on Gloo's thread (a frozen peer's), and so ``destroy_process_group``."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(r, world, store, tmp, fn, args, group_timeout),
                             daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for r, p in enumerate(procs):
            if r not in casualties:
                p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive() and r not in casualties]
        for r in casualties:
            procs[r].kill()
            procs[r].join(10)
        if hung:
            for p in procs:
                p.kill()
            raise TimeoutError(f"ranks {hung} of {world} hung (still running after the deadline)")
        results = []
        for r, p in enumerate(procs):
            if r in casualties:
                results.append(RankResult())
                continue
            path = Path(tmp) / f"rank{r}.pt"
            if not path.exists():
                raise RuntimeError(f"rank {r} died with exit code {p.exitcode} without a result")
            results.append(RankResult(**torch.load(path, weights_only=False)))
        return results


def _plain_entry(out_path: str, fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)
    try:
        result = RankResult(value=fn(*args))
    except BaseException as exc:  # noqa: BLE001 -- reported to the test, which decides
        result = RankResult(error_type=type(exc).__name__, error=str(exc),
                            traceback=traceback.format_exc())
    torch.save(result.__dict__, out_path)


class Processes:
    """Plain spawned processes (no process group), each running ``fn(*args)``; for code that
    needs the test to act in between (kill one of them, say)."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self._tmp = tempfile.TemporaryDirectory()
        self.procs: list[Any] = []

    def start(self, fn: Callable[..., Any], *args: Any) -> Any:
        out = os.path.join(self._tmp.name, f"proc{len(self.procs)}.pt")
        p = self.ctx.Process(target=_plain_entry, args=(out, fn, args), daemon=True)
        p.start()
        p.out_path = out
        self.procs.append(p)
        return p

    def results(self, timeout: float = 240.0, skip: tuple[Any, ...] = ()) -> list[RankResult]:
        """Waits for every process not in ``skip``; returns their results in start order."""
        deadline = time.monotonic() + timeout
        wanted = [p for p in self.procs if p not in skip]
        for p in wanted:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [i for i, p in enumerate(self.procs) if p in wanted and p.is_alive()]
        if hung:
            self.close()
            raise TimeoutError(f"processes {hung} hung (still running after the deadline)")
        out = []
        for p in wanted:
            if not Path(p.out_path).exists():
                raise RuntimeError(f"a process died with exit code {p.exitcode} without a result")
            out.append(RankResult(**torch.load(p.out_path, weights_only=False)))
        return out

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        self._tmp.cleanup()

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def values(results: list[RankResult]) -> list[Any]:
    """Every rank's return value; re-raises the first rank's failure with its traceback."""
    for r, res in enumerate(results):
        if res.error_type is not None:
            raise AssertionError(f"rank {r} raised {res.error_type}: {res.error}\n{res.traceback}")
    return [res.value for res in results]


def nccl_world_one(rank: int, world: int, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a world-1 NCCL group, for GPU tests run through :func:`run_ranks` (which
    made a Gloo one: it is replaced for the call, then restored)."""
    dist.destroy_process_group()
    dist.init_process_group("nccl", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    torch.cuda.set_device(0)
    try:
        return fn(*args)
    finally:
        dist.destroy_process_group()
        dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
