"""SharedCenter: the float32 center variable of asynchronous EASGD in named shared memory, for
worker processes on one machine.

The segment (built by the native core) holds a header (magic, version, dtype, element count,
chunk count, who created it and when, a digest of the parameter layout), the data, one robust
process-shared lock per chunk, and one slot per worker with its clock and exchange count. It is
created with owner-only permissions (0600) and never silently reused: creating a name that
exists fails, saying whether its creator still runs or crashed; attaching checks the layout
version, the size and the parameter layout, and refuses a center whose creator is gone.

Lifetime: the creator removes the name when it exits normally, leaves its ``with`` block or is
sent SIGTERM (what launchers, ``kill`` and schedulers send); a *persistent* center (made for
jobs that a launcher restarts) stays until it is removed explicitly. Centers left behind by
crashed runs are listed and removed with :meth:`SharedCenter.list` / :meth:`SharedCenter.sweep`
or ``python -m easgd_ext.centers list|sweep``.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import signal
import threading
import uuid
from typing import Any, Iterable, Iterator

import torch

from ._native import native
from .flat_params import ALIGN_ELEMENTS, collect_parameters, layout_of, plan

StaleSegmentError = native.StaleSegmentError
DEFAULT_CHUNK_MB = 4.0

__all__ = ["SharedCenter", "StaleSegmentError"]


def center_layout(params: list[torch.Tensor]) -> tuple[list[int], int, str]:
    """Where each (device, dtype) group of ``params`` starts in the center, its total length, and
    a digest of the layout (what attaching workers must agree on)."""
    offsets, total = [], 0
    for *_, group_total in plan(params):
        offsets.append(total)
        total += group_total
    digest = hashlib.sha256(json.dumps(layout_of(params)).encode()).hexdigest()
    return offsets, total, digest


def _parameters(like: Any) -> list[torch.Tensor]:
    if isinstance(like, torch.nn.Module):
        like = like.parameters()
    return collect_parameters(like)


def _chunk_numel(chunk_mb: object) -> int:
    if isinstance(chunk_mb, bool) or not isinstance(chunk_mb, (int, float)):
        raise TypeError(f"chunk_mb must be a number, got {type(chunk_mb).__name__}")
    if not 0 < chunk_mb < float("inf"):
        raise ValueError(f"chunk_mb must be positive and finite, got {chunk_mb}")
    elements = int(chunk_mb * 2**20 / 4)
    return max(ALIGN_ELEMENTS, elements // ALIGN_ELEMENTS * ALIGN_ELEMENTS)


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    return name


def chunk_plan(offset: int, n: int, chunk_numel: int, worker: int,
               workers: int) -> list[tuple[int, int, int]]:
    """The chunks of center[offset, offset + n) in the order worker ``worker`` of ``workers``
    visits them, as (chunk, start, end) with start/end relative to ``offset``: the native
    exchange's own order (it starts ``worker / workers`` of the way round and wraps once)."""
    return [tuple(span) for span in native.chunk_plan(offset, n, chunk_numel, worker, workers)]


def unique_name(prefix: str = "easgd") -> str:
    """A fresh segment name: two trainings on one machine never meet by accident."""
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


SHM_DIR = "/dev/shm"


class _OwnerCleanup:
    """Removes the names this process created when it exits normally or gets SIGTERM. A user's
    own SIGTERM handler still runs afterwards; otherwise the process then dies of the signal, as
    it would have."""

    def __init__(self) -> None:
        self._names: set[str] = set()
        self._pid = os.getpid()
        self._previous: Any = None
        self._installed = False
        atexit.register(self.remove_all)

    def own(self, name: str) -> None:
        if os.getpid() != self._pid:  # a forked child starts with its own set
            self._names, self._pid = set(), os.getpid()
        self._names.add(name)
        if not self._installed and threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True

    def disown(self, name: str) -> None:
        self._names.discard(name)

    def remove_all(self) -> None:
        if os.getpid() != self._pid:  # forked children inherit atexit handlers, not the names
            return
        for name in list(self._names):
            with contextlib.suppress(OSError, ValueError):
                native.SharedSegment.unlink(name)
        self._names.clear()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.remove_all()
        previous = self._previous
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)


_cleanup = _OwnerCleanup()


class SharedCenter:
    """A center in named shared memory. Make one with :meth:`create` (the owner, which removes
    the name when it exits normally or leaves its ``with`` block) or :meth:`attach`.

    ``tensor`` is a zero-copy float32 view of the data (read it only under :meth:`lock`, or use
    :meth:`snapshot`). Workers exchange through
    ``ElasticAverager(params, mode="async", center=...)``.
    """

    def __init__(self, segment: Any, owner: bool) -> None:
        self._segment = segment
        self.owner = owner
        info = segment.info()
        self.name: str = segment.name
        self.numel: int = info["numel"]
        self.chunk_numel: int = info["chunk_numel"]
        self.num_chunks: int = info["num_chunks"]
        self.workers: int = info["max_workers"]
        self.layout_digest: str = info["layout_digest"]
        self.persistent: bool = bool(info.get("persistent", False))
        self.tensor: torch.Tensor = torch.frombuffer(segment, dtype=torch.float32)
        self._pid = os.getpid()
        if owner and not self.persistent:
            _cleanup.own(self.name)

    # ---- making and finding one ----------------------------------------------------------------
    @classmethod
    def create(cls, name: str, like: Iterable[torch.Tensor] | torch.nn.Module, *,
               workers: int = 1, chunk_mb: float = DEFAULT_CHUNK_MB,
               persistent: bool = False) -> "SharedCenter":
        """Creates the segment ``name`` holding a center shaped like ``like`` (the model's
        parameters, laid out as the averager flattens them) and initialized from their values.

        Args:
            name: letters, digits, ``-``, ``_``, ``.`` (``/dev/shm/<name>`` on Linux).
            like: the parameters (or the module) every worker will exchange.
            workers: how many workers will attach (sets the default moving rate
                ``alpha = 0.9 / workers`` and the number of worker slots).
            chunk_mb: size of one locked chunk; smaller chunks let more workers exchange at once.
            persistent: outlive this process (attaching never calls it stale) until removed
                with :meth:`remove`: for jobs a launcher restarts (``torchrun --max-restarts``).

        Raises ``FileExistsError`` if ``name`` exists (saying whether it is in use or stale).
        """
        name = _check_name(name)
        params = _parameters(like)
        if isinstance(workers, bool) or not isinstance(workers, int):
            raise TypeError(f"workers must be an int, got {type(workers).__name__}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not isinstance(persistent, bool):
            raise TypeError(f"persistent must be a bool, got {type(persistent).__name__}")
        offsets, total, digest = center_layout(params)
        segment = native.SharedSegment.create(name, total, _chunk_numel(chunk_mb), workers, digest,
                                              persistent)
        center = cls(segment, owner=True)
        with torch.no_grad():
            for offset, (_, members, slots, _) in zip(offsets, plan(params)):
                for p, slot in zip(members, slots):
                    start = offset + slot
                    # in the parameter's memory order, as the averager's flat buffers hold it
                    center.tensor.as_strided(p.shape, p.stride(), start).copy_(p.detach())
        return center

    @classmethod
    def attach(cls, name: str, like: Iterable[torch.Tensor] | torch.nn.Module | None = None, *,
               allow_stale: bool = False) -> "SharedCenter":
        """Opens an existing center. With ``like``, checks that it was made for parameters of
        this layout. Raises ``FileNotFoundError`` (no such name), ``ValueError`` (not a center,
        another layout version, truncated, another owner, another parameter layout) or
        :class:`StaleSegmentError` (its creator is gone: left by a crashed run)."""
        name = _check_name(name)
        if not isinstance(allow_stale, bool):
            raise TypeError(f"allow_stale must be a bool, got {type(allow_stale).__name__}")
        center = cls(native.SharedSegment.attach(name, allow_stale), owner=False)
        if like is not None:
            center.check_layout(_parameters(like))
        return center

    @classmethod
    def open_or_create(cls, name: str, like: Iterable[torch.Tensor] | torch.nn.Module, *,
                       workers: int = 1, chunk_mb: float = DEFAULT_CHUNK_MB) -> "SharedCenter":
        """The persistent center ``name``: attached if it exists (a restarted job continues
        from it, whoever created it), else created from ``like``'s values."""
        try:
            return cls.create(name, like, workers=workers, chunk_mb=chunk_mb, persistent=True)
        except FileExistsError:
            center = cls.attach(name, like=like)
            if not center.persistent:
                raise FileExistsError(f"shared center '{name}' exists but is not persistent (another "
                                      "job's, made with create()); pick another name") from None
            return center

    @staticmethod
    def list() -> list[dict[str, Any]]:
        """This user's centers in /dev/shm, each with its header (:meth:`info`), its workers and
        ``in_use``: whether its creator or any registered worker still runs."""
        found = []
        for name in sorted(os.listdir(SHM_DIR)) if os.path.isdir(SHM_DIR) else []:
            try:
                segment = native.SharedSegment.attach(name, True)
            except (ValueError, OSError, RuntimeError):
                continue  # not a center, not ours, or gone meanwhile
            info = dict(segment.info())
            workers = [dict(w) for w in segment.workers()]
            info["workers"] = workers
            info["in_use"] = info["creator_alive"] or any(
                w["alive"] and w["state"] == "active" for w in workers)
            found.append(info)
        return found

    @classmethod
    def sweep(cls, include_persistent: bool = False) -> list[str]:
        """Removes this user's centers that nobody uses any more (left by crashed or killed
        runs); persistent ones only with ``include_persistent``. Returns the names removed."""
        removed = []
        for info in cls.list():
            if info["in_use"] or (info["persistent"] and not include_persistent):
                continue
            if cls.remove(info["name"]):
                removed.append(info["name"])
        return removed

    @staticmethod
    def remove(name: str) -> bool:
        """Removes the name ``name`` (e.g. a stale center); processes that have it mapped keep
        using it. Returns whether it existed."""
        return bool(native.SharedSegment.unlink(_check_name(name)))

    def check_layout(self, params: list[torch.Tensor]) -> list[int]:
        """Raises ``ValueError`` unless this center was made for ``params``' layout; returns
        where each (device, dtype) group starts in it."""
        offsets, total, digest = center_layout(params)
        if total != self.numel:
            raise ValueError(
                f"shared center '{self.name}' was made for another model: it holds "
                f"{self.numel} elements, these {len(params)} parameters need {total} (laid out "
                "as the averager flattens them); count, shapes, dtypes and device types must "
                "match the creator's")
        if digest != self.layout_digest:
            raise ValueError(
                f"shared center '{self.name}' was made for another model of the same size "
                f"({total} elements): the parameters' count, shapes, dtypes or device types "
                f"differ from the creator's (layout digest {digest[:12]}, the center's "
                f"{self.layout_digest[:12]})")
        return offsets

    # ---- using it ---------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._segment is None

    @property
    def segment(self) -> Any:
        if self._segment is None:
            raise RuntimeError(f"shared center '{self.name}' is closed")
        return self._segment

    @contextlib.contextmanager
    def lock(self, chunk: int, timeout: float = 0.0) -> Iterator[int]:
        """Holds chunk ``chunk``'s lock in the block (``timeout`` seconds at most, 0: no limit).
        Yields 0, or 1/2 when the lock was recovered from a dead holder that was between/inside
        updates."""
        recovered = self.segment.lock(chunk, float(timeout))
        try:
            yield recovered
        finally:
            self.segment.unlock(chunk)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_numel
        return start, min(start + self.chunk_numel, self.numel)

    def snapshot(self) -> torch.Tensor:
        """A copy of the whole center, each chunk read under its lock (no torn chunk)."""
        out = torch.empty(self.numel, dtype=torch.float32)
        for k in range(self.num_chunks):
            s, e = self.chunk_range(k)
            with self.lock(k):
                out[s:e].copy_(self.tensor[s:e])
        return out

    def load_(self, values: torch.Tensor) -> None:
        """Overwrites the center with ``values`` (``numel`` float32 elements), chunk by chunk
        under the locks (e.g. to resume from a checkpoint)."""
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
        if values.numel() != self.numel:
            raise ValueError(f"values has {values.numel()} elements, the center {self.numel}")
        flat = values.detach().reshape(-1).to("cpu", torch.float32)
        for k in range(self.num_chunks):
            s, e = self.chunk_range(k)
            with self.lock(k):
                self.tensor[s:e].copy_(flat[s:e])

    def info(self) -> dict[str, Any]:
        """The header: sizes, creator (pid, host, time, alive), layout digest, recovered locks."""
        return dict(self.segment.info())

    def worker_info(self) -> list[dict[str, Any]]:
        """Per registered worker: id, state, pid, alive, clock, exchanges, last exchange time,
        and ``lock_wait_s``: seconds spent waiting for chunk locks held by other workers."""
        return [dict(w) for w in self.segment.workers()]

    def pin_for_cuda(self) -> bool:
        """Page-locks the segment (cudaHostRegister) for fast asynchronous copies; returns
        whether it is pinned now (False without a GPU or a CUDA build)."""
        return bool(self.segment.pin_for_cuda())

    # ---- lifetime -----------------------------------------------------------------------------------
    def unlink(self) -> bool:
        """Removes the name (mapped processes keep working); returns whether it still existed."""
        self.owner = False
        _cleanup.disown(self.name)
        return bool(native.SharedSegment.unlink(self.name))

    def close(self) -> None:
        """Drops this handle; the mapping goes away once no tensor views it. The owner's close
        also removes the name (not a persistent center's)."""
        if self.owner and not self.persistent and os.getpid() == self._pid:
            self.unlink()
        self._segment = None
        self.tensor = torch.empty(0)  # views handed out earlier keep the mapping alive

    def __enter__(self) -> "SharedCenter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._segment is None else ("owner" if self.owner else "attached")
        return (f"SharedCenter('{self.name}', numel={self.numel}, chunks={self.num_chunks}, "
                f"workers={self.workers}, {state})")
