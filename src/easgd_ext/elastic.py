"""A default process group that shrinks and grows in place: torch's reconfigurable Gloo groups
(``init_process_group(enable_reconfigure=True)`` and ``ProcessGroup.reconfigure``, torch 2.14),
driven through the job's store.

A job opts in with ``easgd_ext.init_process_group(elastic=True)`` on every rank; a replacement
started later calls it with ``join=True`` (or ``EASGD_EXT_JOIN=1``) and the same launcher
variables. Each membership is a *generation*: the group as first formed is generation 0; a
failure that the survivors go on from (``on_failure="continue"``) and an admission of ranks that
joined each make the next one, over the same ``ProcessGroup`` object, ranks renumbered in the
order the members agreed. The averagers read the generation to keep each membership's keys
apart; the rest of torch.distributed sees an ordinary default group whose rank and size change
(``get_process_group_ranks`` of it is torch's record from ``init_process_group`` and goes stale:
:func:`easgd_ext._dist.group_ranks` answers for it).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

NAMESPACE = "easgd_ext/elastic/"
JOIN_ENV = "EASGD_EXT_JOIN"
JOIN_WAIT_SECONDS = 300.0   # a joiner's wait for an offer (two windows of the running job, at least)
READY_SECONDS = 5.0         # the first member's wait for offered joiners to take their place
KEY_WAIT_SECONDS = 60.0     # any member's wait for the others' keys in a reconfiguration


@dataclass
class Elastic:
    """This process's place in an elastic job: the job's store (under :data:`NAMESPACE`), the
    generation it is in, and, for a process that asked to join and is not in yet, its ticket."""
    store: Any
    generation: int
    ticket: int | None
    timeout: timedelta


_state: Elastic | None = None


def state() -> Elastic | None:
    """The elastic job this process belongs to (``None``: none, an ordinary group)."""
    return _state


def covers(group: Any) -> bool:
    """Whether ``group`` is the elastic job's default group (the one that reconfigures)."""
    return _state is not None and dist.is_initialized() and group is dist.group.WORLD


def joining() -> bool:
    """Whether this process asked to join and has not been admitted yet."""
    return _state is not None and _state.ticket is not None


def wants_to_join(join: bool | None) -> bool:
    """``join`` as given, else the environment's ``EASGD_EXT_JOIN`` (1/true/yes)."""
    if join is not None:
        return join
    return os.environ.get(JOIN_ENV, "").strip().lower() in ("1", "true", "yes")


def init(timeout: timedelta, join: bool) -> None:
    """The default group in torch's reconfigure regime over the launcher's store (env://:
    MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE; under torchrun, its agent's store). The first
    ranks form generation 0 together; a joining process holds a group of its own (size 1) and a
    ticket until a running averager admits it (:func:`admit_request`)."""
    global _state
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") + (() if join else ("RANK", "WORLD_SIZE"))
               if v not in os.environ]
    if missing:
        raise ValueError(f"init_process_group(elastic=True) reads the launcher's environment "
                         f"(torchrun's, or env://): {', '.join(missing)} not set")
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if join:
        raw = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                            is_master=False, timeout=timeout)
        store = _job_store(raw, attempt)
        ticket = store.add("join/next", 1)
        # The same namespace as the members' group: a reconfiguration meets there (it reads the
        # group's own store); a group in the reconfigure regime meets no one at its creation.
        dist.init_process_group("gloo", store=dist.PrefixStore("pg", store), rank=0, world_size=1,
                                timeout=timeout, enable_reconfigure=True)
        _state = Elastic(store, -1, ticket, timeout)
        _alone(f"alone-{ticket}")  # usable meanwhile: its averager's construction is collective
        return
    raw, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    store = _job_store(raw, attempt)
    dist.init_process_group("gloo", store=dist.PrefixStore("pg", store), rank=rank,
                            world_size=world, timeout=timeout, enable_reconfigure=True)
    _state = Elastic(store, -1, None, timeout)
    reconfigure(0, rank, world)


def _job_store(raw: Any, attempt: str) -> Any:
    # One namespace per attempt of a restarting launcher: a restarted job meets afresh.
    return dist.PrefixStore(f"{NAMESPACE}attempt-{attempt}", raw)


def reconfigure(generation: int, position: int, size: int) -> None:
    """Makes the default group generation ``generation``: ``size`` members, this process at
    ``position``. Every member calls it; each publishes its handle, the first picks the
    communicator's id (fresh in the job's store), and torch reconfigures the group."""
    assert _state is not None
    store, prefix = _state.store, f"gen/{generation}/"
    store.set(f"{prefix}handle/{position}", dist._get_reconfigure_handle())
    if position == 0:
        store.set(prefix + "uuid", str(store.add("uuid", 1)))
    handles = [_wait_for(store, f"{prefix}handle/{p}", KEY_WAIT_SECONDS) for p in range(size)]
    uuid = int(_wait_for(store, prefix + "uuid", KEY_WAIT_SECONDS))
    dist._reconfigure(uuid=uuid, handles=handles, timeout=_state.timeout).wait()
    _state.generation = generation


def _wait_for(store: Any, key: str, seconds: float) -> str:
    """``key``'s value once it is set; ``TimeoutError`` after ``seconds``. Polled, so the wait
    is this call's and not the store client's own timeout (the group's, which may be short)."""
    deadline = time.monotonic() + seconds
    while not store.check([key]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key!r} not set in the job's store within {seconds:.0f} s")
        time.sleep(0.01)
    return store.get(key).decode()


def _alone(name: str) -> None:
    """A group of this process alone (a joiner's, until it is admitted)."""
    assert _state is not None
    store = _state.store
    store.set(f"{name}/handle", dist._get_reconfigure_handle())
    dist._reconfigure(uuid=store.add("uuid", 1), handles=[store.get(f"{name}/handle").decode()],
                      timeout=_state.timeout).wait()


def namespace() -> str:
    """This generation's prefix for an averager's store keys ("" outside an elastic job)."""
    return "" if _state is None else f"{NAMESPACE}gen-{_state.generation}/"


# ---- admission: the members' side ------------------------------------------------------------------
def pending_tickets() -> list[int]:
    """Tickets of processes waiting to join that no admission has taken yet (read by the
    members' first rank at a window's start: one store call)."""
    assert _state is not None
    store = _state.store
    issued = store.add("join/next", 0)
    handled = store.add("join/handled", 0)
    return list(range(handled + 1, issued + 1))


def plan_admission(tickets: list[int], clock: int) -> None:
    """The first member's plan: admit ``tickets`` at ``clock`` (written once per generation)."""
    assert _state is not None
    _state.store.compare_set(f"gen/{_state.generation}/admit", "",
                             json.dumps({"tickets": tickets, "clock": clock}))


def planned_admission() -> dict[str, Any] | None:
    """This generation's admission plan, if one was written."""
    assert _state is not None
    key = f"gen/{_state.generation}/admit"
    if not _state.store.check([key]):
        return None
    return json.loads(_state.store.get(key).decode())


def admit(tickets: list[int], clock: int, position: int, size: int) -> list[int]:
    """Every member, at the planned clock: the first offers each ticket its place and waits up
    to :data:`READY_SECONDS` for the joiners that take it (a live one answers in milliseconds);
    all then reconfigure into the next generation with them (members first, in their order).
    Returns the tickets admitted."""
    assert _state is not None
    store, nxt = _state.store, _state.generation + 1
    if position == 0:
        for t in tickets:
            store.set(f"join/offer/{t}", json.dumps({"generation": nxt, "clock": clock}))
        deadline = time.monotonic() + READY_SECONDS
        ready: list[int] = []
        while time.monotonic() < deadline:
            ready = [t for t in tickets if store.check([f"join/ready/{t}"])]
            if len(ready) == len(tickets):
                break
            time.sleep(0.02)
        handled = store.add("join/handled", 0)
        store.add("join/handled", max(tickets) - handled)  # the later tickets wait for the next plan
        decision = {"joiners": ready, "size": size + len(ready)}
        store.set(f"gen/{nxt}/members", json.dumps(decision))
    decision = json.loads(_wait_for(store, f"gen/{nxt}/members", READY_SECONDS + KEY_WAIT_SECONDS))
    reconfigure(nxt, position, decision["size"])
    return decision["joiners"]


# ---- admission: the joiner's side ------------------------------------------------------------------
def admit_request(wait: float = JOIN_WAIT_SECONDS) -> tuple[int, int] | None:
    """A joining process: waits up to ``wait`` seconds for a running averager's offer, takes
    it and reconfigures into the members' next generation. Returns (clock the members admit
    it at, size of the group now), or ``None`` where no offer came or it came too late."""
    assert _state is not None and _state.ticket is not None
    store, ticket = _state.store, _state.ticket
    try:
        offer = json.loads(_wait_for(store, f"join/offer/{ticket}", wait))
    except TimeoutError:
        return None
    store.set(f"join/ready/{ticket}", "1")
    decision = json.loads(_wait_for(store, f"gen/{offer['generation']}/members",
                                    READY_SECONDS + KEY_WAIT_SECONDS))
    if ticket not in decision["joiners"]:
        return None
    position = decision["size"] - len(decision["joiners"]) + decision["joiners"].index(ticket)
    reconfigure(offer["generation"], position, decision["size"])
    _state.ticket = None
    return offer["clock"], decision["size"]
