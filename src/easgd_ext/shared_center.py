"""SharedCenter: the float32 center variable of asynchronous EASGD in named shared memory, for
worker processes on one machine.

The segment (built by the native core) holds a header (magic, version, dtype, element count,
chunk count, who created it and when, a digest of the parameter layout), the data, one robust
process-shared lock per chunk, and one slot per worker with its clock and exchange count. It is
created with owner-only permissions (0600) and never silently reused: creating a name that
exists fails, saying whether its creator still runs or crashed; attaching checks the layout
version, the size and the parameter layout, and refuses a center whose creator is gone.

Lifetime: the creator removes the name when it exits normally, leaves its ``with`` block or is
sent SIGTERM (what launchers, ``kill`` and schedulers send) or SIGHUP (a closed terminal); a
*persistent* center (made for jobs that a launcher restarts) stays until it is removed
explicitly. Centers left behind by crashed runs are listed and removed with
:meth:`SharedCenter.list` / :meth:`SharedCenter.sweep` or ``python -m easgd_ext.centers
list|sweep``; a corrupt one is listed as such and removed only when asked.

Whatever else is at ``/dev/shm/<name>`` (a FIFO, a directory, a symlink, another user's file,
a corrupt header) is named in the error, never waited on, followed or read past its end.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import signal
import stat
import threading
import uuid
from typing import Any, Iterable, Iterator

import torch

from ._native import native
from .flat_params import ALIGN_ELEMENTS, collect_parameters, layout_of, plan

StaleSegmentError = native.StaleSegmentError
StaleSegmentError.__doc__ = (
    "A shared center's segment whose creator is gone (left by a crashed run): attaching to it "
    "is refused; remove it (SharedCenter.remove, or python -m easgd_ext.centers sweep).")
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
_MAGIC = b"EASGDCTR"  # SegmentHeader::magic (csrc/segment.h)


def _shm_path(name: str) -> str:
    return os.path.join(SHM_DIR, name[1:] if name.startswith("/") else name)


def _is_regular_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _looks_like_center(path: str) -> bool:
    """Whether ``path`` is a regular file of this user that starts with a center's magic: only
    those are attached by :meth:`SharedCenter.list` (and reported when they fail to attach).
    Opened without blocking or following a link, as the native side does."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return False
        return os.pread(fd, len(_MAGIC), 0) == _MAGIC
    finally:
        os.close(fd)


def _unusable(name: str, error: str) -> dict[str, Any]:
    """A :meth:`SharedCenter.list` entry for a center that cannot be attached: ``corrupt`` is
    attach's reason without the name and the advice around it (the listing gives its own)."""
    try:
        size = os.stat(_shm_path(name)).st_size
    except OSError:
        size = 0
    why = error.split(" cannot be attached: ", 1)[-1].split(". If nothing uses it, ", 1)[0]
    return {"name": name, "total_bytes": size, "corrupt": why}


class _OwnerCleanup:
    """Removes the names this process created when it exits normally or is killed by SIGTERM
    (launchers, ``kill``, schedulers) or SIGHUP (a closed terminal, a run without nohup). A
    user's own handler of that signal still runs afterwards; otherwise the process then dies of
    the signal, as it would have. An ignored signal (``nohup`` ignores SIGHUP) stays ignored:
    the process lives on, so nothing is removed."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self._names: set[str] = set()
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}
        self._installed = False
        atexit.register(self.remove_all)

    def own(self, name: str) -> None:
        if os.getpid() != self._pid:  # a forked child starts with its own set
            self._names, self._pid = set(), os.getpid()
        self._names.add(name)
        if not self._installed and threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                previous = signal.getsignal(signum)
                if previous == signal.SIG_IGN:
                    continue  # the process survives it: its centers must stay
                self._previous[signum] = previous
                signal.signal(signum, self._on_signal)
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

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.remove_all()
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)
        else:  # die of the signal, as without this handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


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

        Raises ``FileExistsError`` if ``name`` exists, saying what is there: a center in use, a
        stale or corrupt one (and how to remove it), another user's file, or something that is
        not a center at all (a FIFO, a directory, a symlink: never opened in a way that could
        block or follow it). ``PermissionError`` if /dev/shm refuses the new name.
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
        this layout.

        Raises:
            FileNotFoundError: no such name.
            PermissionError: it belongs to another user (centers are private to their
                creator's user, mode 0600); the message names the owner's uid.
            IsADirectoryError: ``/dev/shm/<name>`` is a directory.
            ValueError: not a center (a foreign file, a FIFO, a symlink), another layout
                version, truncated, a corrupt header (naming the field), another parameter
                layout.
            StaleSegmentError: its creator is gone (left by a crashed run).
        """
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
        from it, whoever created it), else created from ``like``'s values. Raises what
        :meth:`attach` raises, and ``FileExistsError`` when something that is not a file (a
        FIFO, a directory, a symlink) holds the name."""
        try:
            return cls.create(name, like, workers=workers, chunk_mb=chunk_mb, persistent=True)
        except FileExistsError:
            if not _is_regular_file(_shm_path(name)):
                raise  # create's error says what is there; attach has nothing to add
            center = cls.attach(name, like=like)
            if not center.persistent:
                raise FileExistsError(f"shared center '{name}' exists but is not persistent (another "
                                      "job's, made with create()); pick another name") from None
            return center

    @staticmethod
    def list() -> list[dict[str, Any]]:
        """This user's centers in /dev/shm, each with its header (:meth:`info`), its workers,
        ``in_use``: whether its creator or any registered worker still runs, and ``corrupt``:
        None. A center this build cannot use (a corrupt header, another layout version,
        truncated, never finished) is listed as ``{"name", "total_bytes", "corrupt": why}``,
        and the listing goes on."""
        found = []
        for name in sorted(os.listdir(SHM_DIR)) if os.path.isdir(SHM_DIR) else []:
            if not _looks_like_center(_shm_path(name)):
                continue  # not a center, or not ours
            try:
                segment = native.SharedSegment.attach(name, True)
            except ValueError as exc:  # a center's magic, but the validator refused the rest
                found.append(_unusable(name, str(exc)))
                continue
            except (OSError, RuntimeError):
                continue  # gone or replaced meanwhile
            info = dict(segment.info())
            workers = [dict(w) for w in segment.workers()]
            info["workers"] = workers
            info["in_use"] = info["creator_alive"] or any(
                w["alive"] and w["state"] == "active" for w in workers)
            info["corrupt"] = None
            found.append(info)
        return found

    @classmethod
    def sweep(cls, include_persistent: bool = False, include_corrupt: bool = False) -> list[str]:
        """Removes this user's centers that nobody uses any more (left by crashed or killed
        runs); persistent ones only with ``include_persistent``, corrupt ones (see :meth:`list`:
        nobody can use them, but what they held may still matter) only with
        ``include_corrupt``. Returns the names removed."""
        removed = []
        for info in cls.list():
            if info["corrupt"] is not None:
                if not include_corrupt:
                    continue
            elif info["in_use"] or (info["persistent"] and not include_persistent):
                continue
            if cls.remove(info["name"]):
                removed.append(info["name"])
        return removed

    @staticmethod
    def remove(name: str) -> bool:
        """Removes the name ``name`` (e.g. a stale center); processes that have it mapped keep
        using it. Returns whether it existed; ``PermissionError`` if it is another user's."""
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

    def pin_for_cuda(self, device: int | torch.device = 0) -> bool:
        """Page-locks the segment (cudaHostRegister) for fast asynchronous copies; returns
        whether it is pinned now (False without a GPU or a CUDA build)."""
        index = device.index if isinstance(device, torch.device) else device
        return bool(self.segment.pin_for_cuda(0 if index is None else int(index)))

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
