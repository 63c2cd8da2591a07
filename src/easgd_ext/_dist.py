"""torch.distributed plumbing shared by the averagers: which group, who am I, and a
construction-time agreement that turns a local mistake into the same error on every rank
(instead of one rank raising while the others wait forever in the next collective)."""

from __future__ import annotations

import atexit
import json
import os
import pickle
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from . import elastic as elastic_job
from .settings import DEFAULT_EXCHANGE_TIMEOUT

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class Comm:
    """A process group (``None``: a single process without torch.distributed) and this rank's
    place in it, with the collectives the averagers use (so a group simulated in one process,
    :mod:`easgd_ext.simulate`, can stand in for a real one)."""
    group: Any
    rank: int
    world_size: int

    @property
    def distributed(self) -> bool:
        return self.group is not None

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank) if self.distributed else group_rank

    def backend(self) -> str:
        return dist.get_backend(self.group)

    def backend_for(self, device: torch.device) -> str:
        """The backend this group runs collectives of ``device`` tensors on ("nccl", "gloo"):
        a group of one backend uses it for every device; one made with several, or by
        ``init_process_group()`` without a backend, the one its configuration names for the
        device's type (``"cpu:gloo,cuda:nccl"``), which ``get_backend`` does not tell."""
        config = str(dist.get_backend_config(self.group))
        table = dict(part.split(":", 1) for part in config.split(",") if ":" in part)
        return table.get(device.type, self.backend())

    def host_waits(self, device: torch.device) -> bool:
        """Whether the host must wait for this group's collectives on ``device`` tensors (Gloo,
        or any backend but NCCL; CUDA tensors through Gloo are staged through the host); NCCL
        only enqueues them on the stream."""
        return self.distributed and (device.type == "cpu" or self.backend_for(device) != "nccl")

    def all_reduce(self, t: torch.Tensor, async_op: bool = False) -> Any:
        return dist.all_reduce(t, group=self.group, async_op=async_op)

    def all_to_all_single(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False) -> Any:
        return dist.all_to_all_single(out, inp, group=self.group, async_op=async_op)

    def all_gather_single(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False) -> Any:
        return _all_gather(out, inp, group=self.group, async_op=async_op)

    # Construction-time collectives: through _collective (below), which leaves nothing to
    # Gloo's threads that could abort the process at exit.
    def broadcast(self, t: torch.Tensor, src: int = 0) -> None:
        """``t`` becomes group rank ``src``'s."""
        root = self.global_rank(src)
        _collective(self, [t], lambda: dist.broadcast(t, src=root, group=self.group, async_op=True))

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in group rank order."""
        return all_gather_objects(self, obj)

    def broadcast_object(self, obj: Any) -> Any:
        """Group rank 0's ``obj`` (picklable) on every rank."""
        return broadcast_object(self, obj)


def init_process_group(backend: str | None = None, timeout: timedelta | None = None, *,
                       elastic: bool = False, join: bool | None = None) -> None:
    """``torch.distributed.init_process_group`` for a job that a launcher may restart (the
    environment variables of torchrun: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or whose
    membership changes while it runs (``elastic``).

    Under ``torchrun --max-restarts``, every attempt of the job joins its group through the
    launcher's own store under a namespace of its own (``TORCHELASTIC_RESTART_COUNT``): with
    plain ``init_process_group`` a restarted Gloo group finds the previous attempt's addresses
    in that store and can fail to connect (6 of 8 restarts of a plain torch script failed so
    here, torch 2.14). Outside a restarting launcher it is
    ``init_process_group(backend, timeout=timeout)``.

    ``elastic=True`` (Gloo): the default group is made in torch's reconfigure regime, so that
    averagers built with ``on_failure="continue"`` over it shrink it in place after a failure
    and grow it when a process joins. ``join=True`` (default: the ``EASGD_EXT_JOIN``
    environment variable) makes this process such a joiner: with the running job's MASTER_ADDR
    and MASTER_PORT it takes a ticket in the job's store, and its averager's construction waits
    until the running averagers admit it at the start of a window, hands it the center and
    returns with it in the group. ``timeout`` (default 300 s) bounds each collective on the
    backend's thread; give the averagers' ``exchange_timeout`` the same, so that a collective
    stuck on a frozen rank is over when the survivors go on."""
    if join is not None and not isinstance(join, bool):
        raise TypeError(f"join must be a bool or None, got {type(join).__name__}")
    if join and not elastic:
        raise ValueError("join=True joins an elastic job: pass elastic=True too")
    if elastic:
        if backend not in (None, "gloo"):
            raise ValueError(f"elastic=True runs Gloo (torch's reconfigurable process groups), "
                             f"got backend={backend!r}")
        elastic_job.init(timeout or timedelta(seconds=DEFAULT_EXCHANGE_TIMEOUT),
                         elastic_job.wants_to_join(join))
        return
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    if attempt is None or "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, **kwargs)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=False, **kwargs)
    dist.init_process_group(backend, store=dist.PrefixStore(f"easgd_ext-attempt-{attempt}", store),
                            rank=rank, world_size=world, **kwargs)


def resolve(process_group: Any = None) -> Comm:
    """The given group, else the default one; a single process where torch.distributed is not
    initialized and no launcher asked for more than one. A one-dimensional ``DeviceMesh``
    (``mesh["replicate"]``) stands for its group. A :class:`Comm` (a simulated group's rank,
    :mod:`easgd_ext.simulate`) is taken as it is."""
    if isinstance(process_group, Comm):
        return process_group
    if _is_device_mesh(process_group):
        if process_group.ndim != 1:
            names = process_group.mesh_dim_names
            raise ValueError(
                f"process_group is a {process_group.ndim}-dimensional DeviceMesh"
                f"{'' if names is None else f' {names}'}; pass the dimension to average over, "
                "the replicate one: process_group=mesh['replicate'] (its ranks hold the same "
                "shards in different replicas)")
        process_group = process_group.get_group()
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            launched = int(os.environ.get("WORLD_SIZE", "1"))
            if launched > 1:
                raise RuntimeError(
                    f"WORLD_SIZE is {launched} but torch.distributed is not initialized: call "
                    "torch.distributed.init_process_group() before building the averager")
            return Comm(None, 0, 1)
        process_group = dist.group.WORLD
    return Comm(process_group, dist.get_rank(process_group), dist.get_world_size(process_group))


def _is_device_mesh(value: Any) -> bool:
    # A DeviceMesh exists only once its module was imported: looked up, not imported here.
    mesh_type = getattr(sys.modules.get("torch.distributed.device_mesh"), "DeviceMesh", None)
    return mesh_type is not None and isinstance(value, mesh_type)


class AgreementError(ValueError):
    """Raised on every rank when the ranks disagree or one of them failed at construction."""


def agree(comm: Comm, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Runs ``build()`` (local validation; returns what must be identical on every rank), then
    compares across ranks. Any exception on any rank, or any difference, is raised on every
    rank with the same message, naming the rank and the first thing that differs."""
    try:
        local, error = build(), None
    except (TypeError, ValueError, RuntimeError, OSError) as exc:
        if not comm.distributed:
            raise
        local, error = None, (type(exc).__name__, str(exc))
    if not comm.distributed:
        return local
    everyone = comm.all_gather_object({"value": local, "error": error})
    for rank, item in enumerate(everyone):
        if item["error"] is not None:
            kind, message = item["error"]
            exc_type = {"TypeError": TypeError, "ValueError": ValueError,
                        "FileNotFoundError": FileNotFoundError, "FileExistsError": FileExistsError,
                        "PermissionError": PermissionError, "TimeoutError": TimeoutError,
                        "StaleSegmentError": RuntimeError}.get(kind, RuntimeError)
            raise exc_type(f"rank {rank}: {message}")
    reference = everyone[0]["value"]
    for rank, item in enumerate(everyone[1:], start=1):
        difference = first_difference(reference, item["value"], rank)
        if difference is not None:
            raise AgreementError(f"ranks disagree: {difference}")
    return local


def first_difference(ref: Any, other: Any, rank: int, path: str = "") -> str | None:
    """A description of the first place where rank 0's ``ref`` and ``rank``'s ``other`` differ
    (``settings.tau``, ``layout[3]``, ...)."""
    if ref == other:
        return None
    if isinstance(ref, dict) and isinstance(other, dict):
        for key in list(ref) + [k for k in other if k not in ref]:
            found = first_difference(ref.get(key), other.get(key), rank,
                                      f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    if isinstance(ref, list) and isinstance(other, list):
        if len(ref) != len(other):
            return f"{path}: rank 0 has {len(ref)} entries, rank {rank} has {len(other)}"
        i = next(i for i, (a, b) in enumerate(zip(ref, other)) if a != b)
        return first_difference(ref[i], other[i], rank, f"{path}[{i}]")
    return f"{path} is {ref!r} on rank 0 but {other!r} on rank {rank}"


def broadcast_from_first(comm: Comm, tensors: list[torch.Tensor]) -> None:
    """Every rank's ``tensors`` become group rank 0's."""
    if not comm.distributed:
        return
    for t in tensors:
        comm.broadcast(t, 0)


# ---- collectives that leave nothing to Gloo's threads --------------------------------------------
# Gloo runs each collective on a worker thread, which drops its reference to the finished work a
# moment *after* wait() has returned. In torch's PyObject preservation, a C++ reference that
# leaves a tensor with only its Python object decrefs that object, which needs the GIL; if the
# interpreter is shutting down meanwhile, the thread is made to exit inside a C++ destructor and
# the process aborts ("terminate called without an active exception", SIGABRT after a job that
# finished: about one async job in five, whose last collectives come just before it exits). So
# the averagers' construction-time collectives go through _collective(), which returns once no
# thread of the backend refers to their tensors any more. A backend thread that is late (a loaded
# machine: seen once in 120 ranks in CI) is waited for at exit, before the interpreter finalizes:
# keeping the tensors referenced from Python would not help, since the thread's release still
# decrefs their Python objects.

_RELEASE_PATIENCE = 2.0  # seconds within the call; normally the thread lets go in microseconds
_EXIT_PATIENCE = 60.0  # seconds at exit for the releases still outstanding then
_late: list[tuple[list[torch.Tensor], list[int]]] = []  # (tensors, counts when only we held them)


def _collective(comm: Comm, tensors: list[torch.Tensor], post: Callable[[], Any]) -> None:
    """Runs the collective that ``post()`` posts with ``async_op=True`` over ``tensors``, waits
    for it, and returns once the backend's threads have released ``tensors`` (their reference
    counts are back where they were): from then on only Python holds them, so whichever thread
    lets go of them last holds the GIL. A backend that does not let go within
    ``_RELEASE_PATIENCE`` is waited for at interpreter exit instead (:func:`_settle_late`)."""
    before = [t._use_count() for t in tensors]
    work = post()
    work.wait()
    del work  # ours; what remains is the backend's own reference
    if _handed_to_nccl(comm, tensors):
        return  # NCCL's watchdog thread lets go after the GPU ran the work: left as torch does
    entry = (tensors, before)
    deadline = time.monotonic() + _RELEASE_PATIENCE
    while not _released(entry):
        if time.monotonic() > deadline:
            _late.append(entry)
            return
        time.sleep(1e-4)  # releases the GIL, which the backend's thread may need
    _settle_late(0.0)  # forgets earlier late ones released since


def _released(entry: tuple[list[torch.Tensor], list[int]]) -> bool:
    tensors, before = entry
    return all(t._use_count() <= b for t, b in zip(tensors, before))


def _settle_late(patience: float) -> bool:
    """Waits up to ``patience`` seconds for the backend to release every entry of ``_late``,
    sleeping so that its threads can take the GIL, and forgets those released. Returns whether
    none is outstanding."""
    deadline = time.monotonic() + patience
    while True:
        _late[:] = [e for e in _late if not _released(e)]
        if not _late:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(1e-3)


@atexit.register
def _settle_late_at_exit() -> None:
    # atexit runs before the interpreter starts finalizing: a late backend thread can still take
    # the GIL now, and will find none to take if it waits until after.
    if _late and not _settle_late(_EXIT_PATIENCE):
        print(f"easgd_ext: {len(_late)} collective(s) were still referenced by the backend's "
              f"threads {_EXIT_PATIENCE:.0f} s after the job ended; the process may abort at "
              "exit", file=sys.stderr)


def _handed_to_nccl(comm: Comm, tensors: list[torch.Tensor]) -> bool:
    return any(t.is_cuda for t in tensors) and "nccl" in str(dist.get_backend(comm.group))


def _object_device(comm: Comm) -> torch.device:
    """Where torch's own object collectives put the bytes for ``comm.group``."""
    pick = getattr(dist.distributed_c10d, "_get_object_coll_device", None)
    kind = pick(comm.group) if pick is not None else (
        "cuda" if str(dist.get_backend(comm.group)) == "nccl" else "cpu")
    return torch.device(kind, torch.cuda.current_device()) if kind == "cuda" else torch.device(kind)


def all_gather_objects(comm: Comm, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in group rank order; ``dist.all_gather_object`` without
    leaving its temporaries to Gloo's threads."""
    device = _object_device(comm)
    data = pickle.dumps(obj)
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(comm.world_size)]
    _collective(comm, sizes + [size],
                lambda: dist.all_gather(sizes, size, group=comm.group, async_op=True))
    lengths = [int(n.item()) for n in sizes]
    mine = torch.zeros(max(lengths), dtype=torch.uint8)
    mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    mine = mine.to(device)
    everyone = [torch.empty(max(lengths), dtype=torch.uint8, device=device)
                for _ in range(comm.world_size)]
    _collective(comm, everyone + [mine],
                lambda: dist.all_gather(everyone, mine, group=comm.group, async_op=True))
    return [pickle.loads(t[:n].cpu().numpy().tobytes()) for t, n in zip(everyone, lengths)]


def broadcast_object(comm: Comm, obj: Any) -> Any:
    """Group rank 0's ``obj`` (picklable) on every rank (the others pass anything);
    ``dist.broadcast_object_list`` without leaving its temporaries to Gloo's threads."""
    device = _object_device(comm)
    src = comm.global_rank(0)
    data = pickle.dumps(obj) if comm.rank == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    _collective(comm, [size],
                lambda: dist.broadcast(size, src=src, group=comm.group, async_op=True))
    payload = torch.zeros(int(size.item()), dtype=torch.uint8)
    if comm.rank == 0:
        payload[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    payload = payload.to(device)
    _collective(comm, [payload],
                lambda: dist.broadcast(payload, src=src, group=comm.group, async_op=True))
    return obj if comm.rank == 0 else pickle.loads(payload.cpu().numpy().tobytes())



def unresponsive_ranks(comm: Comm, event: str, grace: float) -> list[int] | None:
    """After a failed collective: which group ranks did not report the same failure within
    ``grace`` seconds; ``None`` where the process group's store could not be reached in that
    time. Each rank that fails writes a key to the store and watches for the others' keys;
    nothing touches the store while collectives succeed.

    The store may live in a rank that failed: under a plain env:// launch (MASTER_ADDR,
    MASTER_PORT, RANK, WORLD_SIZE set by the user or a scheduler) rank 0 hosts the TCPStore. A
    killed host refuses connections (and a TCPStore client retries for the whole process-group
    timeout); a frozen one accepts them and never answers, and nothing bounds the wait then
    (torch 2.14: ``check`` and ``wait`` block past the store's timeout and ``set_timeout``,
    and a new client blocks in its handshake). So every store access of the diagnosis runs on
    a daemon thread, through a connection of its own (``store.clone()``: a new client under the
    same prefixes as the process group's store, so the keys are where they were), and the caller
    waits for it ``grace`` + 1 s at most, whatever the store does. A call still blocked after
    that is left behind on the thread, holding only that connection, not the process group's
    own store client."""
    found_store = _store_and_ranks(comm)
    if found_store is None:  # the caller still reports the failure
        return None
    base, ranks = found_store
    prefix = f"easgd_ext/failed/{elastic_job.namespace()}{'-'.join(map(str, ranks))}/{event}/"
    deadline = time.monotonic() + grace
    found: dict[str, Any] = {}

    def diagnose() -> None:
        try:
            store = base.clone()
            store.set(prefix + str(comm.rank), "1")
            missing = list(range(comm.world_size))
            while missing and time.monotonic() < deadline:
                missing = [r for r in missing if not store.check([prefix + str(r)])]
                if missing:
                    time.sleep(0.05)
            found["missing"] = missing
        except Exception as exc:  # noqa: BLE001 -- the store's host may be the rank that died
            found["error"] = exc

    probe = threading.Thread(target=diagnose, name="easgd_ext-failure-diagnosis", daemon=True)
    probe.start()
    probe.join(max(0.0, deadline - time.monotonic()) + DIAGNOSIS_MARGIN)
    return found.get("missing")


DIAGNOSIS_MARGIN = 1.0  # seconds past the grace for the last store call to come back


def describe_silent(silent: list[int] | None) -> str:
    """What :func:`unresponsive_ranks` found, for an error message."""
    if silent is None:
        return ("the diagnosis could not reach the process group's store to find out which "
                "ranks did not take part (the store's host may be one of them: under env:// "
                "that is rank 0)")
    if not silent:
        return "every rank reported the failure"
    return (f"rank{'s' * (len(silent) > 1)} {', '.join(map(str, silent))} did not take part "
            "(dead, frozen, or no longer calling step()/exchange())")


# ---- going on without the ranks that failed (on_failure="continue") -----------------------------
@dataclass(frozen=True)
class Survivors:
    """What the ranks that took part agreed on after a failed exchange: the group's global
    ranks that go on, the clock they go on from (the most advanced one's) and the rank whose
    center every survivor takes (that most advanced rank: a collective that completed on some
    ranks before the failure was applied there)."""
    ranks: list[int]
    clock: int
    source: int


def group_ranks(comm: Comm) -> list[int]:
    """The global ranks of ``comm``'s group, in group rank order."""
    if not comm.distributed:
        return [0]
    if comm.group is dist.group.WORLD:  # torch's record of it goes stale when it reconfigures
        return list(range(comm.world_size))
    return dist.get_process_group_ranks(comm.group)


def group_of(ranks: list[int], backend: str, seconds: float) -> Comm:
    """A new group of the global ``ranks`` (collective over them only) whose backend gives up
    on a collective after ``seconds``. A collective stuck on a frozen peer then ends on the
    backend's thread too, not only in the host's wait: otherwise that thread holds it until
    the group's own timeout (30 min by default), and ``destroy_process_group()`` at the end of
    a job that went on without the peer blocks until then."""
    group = dist.new_group(ranks, timeout=timedelta(seconds=seconds), backend=backend,
                           use_local_synchronization=True)
    return resolve(group)


def _store_and_ranks(comm: Comm) -> tuple[Any, list[int]] | None:
    """The process group's store and the group's global ranks; ``None`` where there is no
    store to ask (no torch.distributed, or a group without one)."""
    try:
        return dist.distributed_c10d._get_default_store(), group_ranks(comm)
    except Exception:  # noqa: BLE001 -- no store, no names
        return None


def _reform_prefix(ranks: list[int]) -> str:
    # One namespace per membership: a group only shrinks, so each is used once; an elastic
    # job's memberships are told apart by their generation.
    return f"easgd_ext/reform/{elastic_job.namespace()}{'-'.join(map(str, ranks))}/"


def peers_reforming(comm: Comm, timeout: float = 2.0) -> bool:
    """Whether another rank of the group has already reported a failed exchange and is
    waiting to go on without the failed ranks (so this rank's collective will not complete
    either). ``False`` where the store does not answer within ``timeout``."""
    found_store = _store_and_ranks(comm)
    if found_store is None:  # nothing to learn from
        return False
    base, ranks = found_store
    prefix = _reform_prefix(ranks) + "alive/"
    found: dict[str, bool] = {}

    def look() -> None:
        store = base.clone()
        found["any"] = any(store.check([prefix + str(r)]) for r in ranks)

    probe = threading.Thread(target=look, name="easgd_ext-reform-look", daemon=True)
    probe.start()
    probe.join(timeout)
    return found.get("any", False)


def agree_on_survivors(comm: Comm, clock: int, settle: float, limit: float) -> Survivors | None:
    """After a failed exchange: every rank that can still reach the process group's store
    writes that it is alive (with its clock); once no new rank has appeared for ``settle``
    seconds (or every rank has, or ``limit`` seconds have passed) the first rank to decide
    writes the membership, atomically (``compare_set``), and every survivor reads that one
    decision. ``None`` where the store does not answer (its host may be a rank that died: under
    env:// that is rank 0), as :func:`unresponsive_ranks` handles it: on a daemon thread, waited
    for ``limit`` + 1 s at most."""
    found_store = _store_and_ranks(comm)
    if found_store is None:  # the caller reports the failure as it was
        return None
    base, ranks = found_store
    prefix = _reform_prefix(ranks)
    me = ranks[comm.rank]
    found: dict[str, Any] = {}

    def decide() -> None:
        try:
            store = base.clone()
            store.set(f"{prefix}alive/{me}", str(clock))
            start = changed = time.monotonic()
            present: list[int] = []
            while True:
                now_present = [r for r in ranks if store.check([f"{prefix}alive/{r}"])]
                now = time.monotonic()
                if now_present != present:
                    present, changed = now_present, now
                if len(present) == len(ranks) or now - changed >= settle or now - start >= limit:
                    break
                if store.check([prefix + "members"]):
                    break  # another rank has decided: take its decision
                time.sleep(0.05)
            clocks = {r: int(store.get(f"{prefix}alive/{r}").decode()) for r in present}
            top = max(clocks.values())
            proposal = {"ranks": present, "clock": top,
                        "source": min(r for r, c in clocks.items() if c == top)}
            decided = store.compare_set(prefix + "members", "", json.dumps(proposal))
            found["decision"] = json.loads(decided.decode())
        except Exception as exc:  # noqa: BLE001 -- the store's host may be the rank that died
            found["error"] = exc

    worker = threading.Thread(target=decide, name="easgd_ext-survivors", daemon=True)
    worker.start()
    worker.join(limit + settle + DIAGNOSIS_MARGIN)
    decision = found.get("decision")
    return None if decision is None else Survivors(**decision)
