"""The averager's state through ``torch.distributed.checkpoint`` (DCP), beside the model's and the
optimizer's: sharded (every rank writes its own part, in parallel) and resumed exactly on the
same topology.

``avg.dcp_state()`` is a DCP ``Stateful``::

    msd, osd = get_state_dict(model, opt)       # the replicas' models differ: key them
    dcp.save({f"replica{avg.replica}": {"model": msd, "optim": osd},
              "averager": avg.dcp_state()}, checkpoint_id=path)

    msd, osd = get_state_dict(model, opt)       # a freshly built job
    mine = {"model": msd, "optim": osd}
    dcp.load({f"replica{avg.replica}": mine, "averager": avg.dcp_state()}, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=mine["model"], optim_state_dict=mine["optim"])

What it writes, under the key it is given (``averager``):

* ``center``: the center and what lives beside it (an outer optimizer's momentum), which every
  rank of the process group holds bit-identical. For DTensor parameters, one DTensor per
  parameter with the parameter's own mesh and placements, so DCP stores each shard once (the
  replicas' copies are deduplicated) and the saved center is a set of global tensors. For plain
  parameters, one tensor per flat group under a key naming the group's ranks.
* ``rank<R>`` (R: the global rank): what is this rank's own: the worker buffers (DOWNPOUR's
  ``x_last``), the 8-bit wire's residuals, and one pickled record with the clock, settings,
  layout, statistics, topology and the fragments in flight with their arrived sums (their number
  varies, so they travel as one object).

Loading checks the topology first (replicate degree, the process group's ranks, the local
shards) and refuses a different one, naming what differs, on every rank; then the same checks as
:meth:`~easgd_ext.Averager.load_state_dict` (finite values, dtypes, settings). A checkpoint
written by fewer ranks lacks the new ranks' ``rank<R>`` keys: DCP itself refuses it (``Missing
key in checkpoint state_dict: averager.rank<R>...``).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from . import _dist

if TYPE_CHECKING:
    from .averager import Averager

CENTER_KEYS = ("center", "momentum")   # identical on every rank of the group


class DCPState:
    """The averager's part of a DCP checkpoint (``state_dict``/``load_state_dict``, the
    ``Stateful`` protocol of ``torch.distributed.checkpoint``). Build it with
    :meth:`~easgd_ext.Averager.dcp_state`."""

    def __init__(self, averager: "Averager") -> None:
        if averager.mode != "sync":
            raise ValueError(
                f"dcp_state() is for mode='sync'; an asynchronous {type(averager).__name__} "
                "saves with state_dict() on every rank (torch.save), as the faults table says")
        self._avg = averager
        self._rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        group = averager.process_group
        self._group_ranks = (_dist.group_ranks(_dist.resolve(group)) if group is not None
                             else [self._rank])

    # ---- the topology: what must be the same to resume ---------------------------------------------
    def topology(self) -> dict[str, Any]:
        avg = self._avg
        return {"global_rank": self._rank,
                "world": dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1,
                "replicas": avg.world_size, "group_ranks": list(self._group_ranks),
                "sharded": avg.sharded}

    def _group_key(self) -> str:
        ranks = self._group_ranks
        return f"group{ranks[0]}x{len(ranks)}"

    # ---- Stateful ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What DCP saves (and, for a load, the template it fills): CPU tensors, DTensors of the
        center's shards, and one record object per rank."""
        state = self._avg.state_dict()   # waits for the sums in flight (collective with delay)
        buffers = dict(state.pop("buffers"))
        center = {name: self._center_entries(buffers.pop(name))
                  for name in CENTER_KEYS if name in buffers}
        in_flight = buffers.pop("in_flight", [])
        own = {name: {str(k): t for k, t in enumerate(tensors)} for name, tensors in buffers.items()}
        record = {**state, "in_flight": in_flight, "topology": self.topology()}
        return {"center": center, f"rank{self._rank}": {"buffers": own, "record": _pack(record)}}

    def load_state_dict(self, loaded: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` saved on this rank (after ``dcp.load`` filled it)."""
        if not isinstance(loaded, dict) or f"rank{self._rank}" not in loaded or "center" not in loaded:
            raise ValueError("averager state must be what DCPState.state_dict() returned, filled "
                             "by torch.distributed.checkpoint.load")
        mine = loaded[f"rank{self._rank}"]
        record = _unpack(mine["record"])
        self._check_topology(record.pop("topology", None))
        buffers: dict[str, Any] = {name: [t for _, t in sorted(tensors.items(), key=lambda kv: int(kv[0]))]
                                   for name, tensors in mine["buffers"].items()}
        for name, entries in loaded["center"].items():
            buffers[name] = self._center_buffers(entries)
        in_flight = record.pop("in_flight", [])
        if in_flight:
            buffers["in_flight"] = in_flight
        self._avg.load_state_dict({**record, "buffers": buffers})

    def _check_topology(self, saved: Any) -> None:
        mine = self.topology()
        if not isinstance(saved, dict):
            raise ValueError("averager checkpoint has no topology record; was it written by "
                             "avg.dcp_state()?")
        for key, what in (("sharded", "DTensor parameters (a sharded model)"),
                          ("replicas", "the replicate degree (ranks in process_group)"),
                          ("group_ranks", "the process group's ranks"), ("world", "the world size")):
            if saved.get(key) != mine[key]:
                raise ValueError(
                    f"the averager's DCP checkpoint was written with {what} = {saved.get(key)!r}, "
                    f"this job has {mine[key]!r}: an averager's checkpoint resumes on the same "
                    "topology (same mesh, same replicate and shard degrees); it is not resharded")

    # ---- the center: per-parameter DTensors (sharded model) or per-group tensors -------------------
    def _center_entries(self, tensors: list[torch.Tensor]) -> dict[str, Any]:
        """The center-like buffers (one CPU tensor per group, in the groups' layout) as DCP
        entries."""
        avg = self._avg
        if not avg.sharded:
            return {f"{self._group_key()}.{k}": t for k, t in enumerate(tensors)}
        from .dtensor_params import dtensor_like

        out: dict[str, Any] = {}
        index = 0
        for g, t in zip(avg.flat_groups, tensors):
            for i, p in enumerate(g.params):
                out[str(index)] = dtensor_like(p, g.member_view(t, i).clone())
                index += 1
        return out

    def _center_buffers(self, entries: dict[str, Any]) -> list[torch.Tensor]:
        """The inverse of :meth:`_center_entries`: one tensor per group, in the layout."""
        avg = self._avg
        if not avg.sharded:
            key = self._group_key()
            return [entries[f"{key}.{k}"] for k in range(len(avg.flat_groups))]
        out = []
        index = 0
        for g in avg.flat_groups:
            whole = torch.zeros(g.numel)
            for i in range(len(g.params)):
                g.member_view(whole, i).copy_(entries[str(index)].to_local())
                index += 1
            out.append(whole)
        return out


def _pack(record: dict[str, Any]) -> bytes:
    """The record as one opaque object: DCP would otherwise flatten its dicts and lists into
    keys of their own, and their number (fragments in flight) varies from save to load."""
    out = io.BytesIO()
    torch.save(record, out)
    return out.getvalue()


def _unpack(value: Any) -> dict[str, Any]:
    if not isinstance(value, bytes):
        raise ValueError(f"averager record must be bytes written by DCPState, got {type(value).__name__}")
    record = torch.load(io.BytesIO(value), weights_only=True)
    if not isinstance(record, dict):
        raise ValueError("averager record is not a dict; was it written by avg.dcp_state()?")
    return record
