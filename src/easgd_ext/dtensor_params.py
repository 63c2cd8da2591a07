"""DTensor parameters (a model sharded with FSDP2's ``fully_shard``): each rank exchanges its
local shards, in place, with the ranks that hold the same shards in the other replicas.

FSDP2's sharded parameters are views into FSDP's own storage, which it all-gathers from before
each forward: they cannot be moved into a flat buffer (FSDP would all-gather stale values). A
:class:`ShardGroup` therefore leaves them where they are and lays them out in a *virtual* flat
order (each local shard at an aligned offset, as :class:`~easgd_ext.flat_params.FlatGroup`
lays out its slots), while the center, the wire and every other buffer of the group are
contiguous tensors of that length. A piece of the layout that spans several shards is cut into
segments, one per shard (:meth:`ShardGroup.segment_bounds`); each segment gets its own prepared
send and apply launches, reading and writing its slice of the one wire, so a whole model still
goes out in one collective per bucket and an exchange runs no Python per parameter.

The process group is the *replicate* dimension of the device mesh (``mesh["replicate"]``): its
ranks hold the same shard of every parameter (checked at construction), so the center and every
buffer are sharded like the parameters, 1 / shard-degree of the replicated case per rank.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .flat_params import _aligned, describe

SUPPORTED_PLACEMENTS = "Shard(0) or Replicate()"
REPLICATE_HINT = ("the replicate dimension's group of the device mesh, e.g. "
                  "process_group=mesh['replicate'] for init_device_mesh(..., "
                  "mesh_dim_names=('replicate', 'shard')) and fully_shard(model, "
                  "mesh=mesh['shard'])")


def _placement_types() -> tuple[type, type]:
    try:
        from torch.distributed.tensor import Replicate, Shard
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import Replicate, Shard  # type: ignore[no-redef]
    return Shard, Replicate


def _local_shape_and_offset(p: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor._utils import compute_local_shape_and_global_offset  # type: ignore[no-redef]
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(shape), tuple(offset)


def local_tensor(p: Any) -> torch.Tensor:
    """The rank's shard of DTensor ``p``: FSDP's storage itself, not a copy."""
    return p._local_tensor


def check_params(params: list[Any], comm: Any, group_given: bool = True) -> None:
    """What a sharded model's parameters must satisfy to be exchanged shard by shard over
    ``comm`` (the replicate dimension): supported placements, contiguous local shards, and a
    group that shares no rank but this one with any parameter's mesh (its other ranks hold
    other shards of the same replica, or, under ``Replicate()``, the same values)."""
    Shard, Replicate = _placement_types()
    if not comm.distributed or not group_given:
        raise ValueError(
            "DTensor parameters (a sharded model) need process_group=: the group of the ranks "
            "that hold the same shards in the other replicas, " + REPLICATE_HINT + "; the "
            "default group would hold the other shards of each replica")
    group_ranks = set(dist.get_process_group_ranks(comm.group))
    me = dist.get_rank()
    for i, p in enumerate(params):
        for placement in p.placements:
            if not (isinstance(placement, Replicate) or
                    (isinstance(placement, Shard) and placement.dim == 0)):
                raise ValueError(
                    f"params[{i}] ({describe(p)}) has placements {tuple(p.placements)}; the "
                    f"averager exchanges local shards of {SUPPORTED_PLACEMENTS} placements, what "
                    "fully_shard makes (a shard of another dimension is not contiguous in the "
                    "flat order the exchange uses)")
        local = local_tensor(p)
        if not local.is_contiguous():
            raise ValueError(f"params[{i}]'s local shard is not contiguous ({describe(local)}); "
                             "fully_shard's shards are: shard the model with fully_shard")
        shape, _ = _local_shape_and_offset(p)
        if tuple(local.shape) != shape:
            raise ValueError(f"params[{i}]'s local shard is {describe(local)}, but its placements "
                             f"{tuple(p.placements)} give {list(shape)} to this rank")
        shared = sorted(set(p.device_mesh.mesh.flatten().tolist()) & group_ranks - {me})
        if shared:
            raise ValueError(
                f"process_group does not match the parameters' mesh: it holds ranks {shared} of "
                f"params[{i}]'s mesh {p.device_mesh} (placements {tuple(p.placements)}), which "
                "hold other shards of this replica, or the same values under Replicate() (HSDP "
                "already all-reduces gradients across replicas, which EASGD replaces); pass "
                + REPLICATE_HINT)


def replica_groups(params: list[Any]) -> list[Any]:
    """The process groups of the parameters' mesh dimensions (size > 1, each once): together
    they connect the ranks of this replica, which decide an exchange's non-finite verdict
    together (so a replica is reset, skipped or raised on as a whole)."""
    groups, seen = [], set()
    for p in params:
        mesh = p.device_mesh
        for d in range(mesh.ndim):
            group = mesh.get_group(d)
            ranks = tuple(dist.get_process_group_ranks(group))
            if len(ranks) > 1 and ranks not in seen:
                seen.add(ranks)
                groups.append(group)
    return groups


def _local_numel(p: Any, coordinate: tuple[int, ...]) -> int:
    """Elements of ``p``'s shard at ``coordinate`` of its mesh (``Shard(0)``, as torch.chunk
    cuts, mesh dimension by mesh dimension; ``Replicate()`` keeps the whole)."""
    Shard, _ = _placement_types()
    if p.dim() == 0:
        return 1
    rows = p.shape[0]
    for size, at, placement in zip(p.device_mesh.mesh.shape, coordinate, p.placements):
        if isinstance(placement, Shard):
            chunk = -(-rows // size)
            rows = max(0, min(chunk, rows - at * chunk))
    return rows * (p.numel() // p.shape[0] if p.shape[0] else 0)


def smallest_layout(params: list[Any]) -> int:
    """The fewest layout elements any rank of the replica holds (the same answer on every
    rank: it is worked out from the global shapes), for checks that must not depend on the
    shard a rank holds."""
    positions = params[0].device_mesh.mesh
    smallest = None
    for rank in positions.flatten().tolist():
        by_key: dict[tuple[torch.device, torch.dtype], int] = {}
        for p in params:
            where = (p.device_mesh.mesh == rank).nonzero()
            if len(where) != 1:
                return 0  # meshes that do not cover one another: no common answer
            coordinate = tuple(where[0].tolist())
            key = (local_tensor(p).device, p.dtype)
            by_key[key] = _aligned(by_key.get(key, 0) + _local_numel(p, coordinate))
        total = sum(by_key.values())
        smallest = total if smallest is None else min(smallest, total)
    return smallest or 0


def dtensor_like(p: Any, local: torch.Tensor) -> Any:
    """A DTensor with ``p``'s mesh, placements and global shape whose local shard is ``local``
    (the center's shard of ``p``, for a checkpoint)."""
    dtensor = type(p)
    return dtensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def shards_of(params: list[Any]) -> list[str]:
    """One line per parameter: the local shard this rank holds (shape and global offset), which
    must be the same on every rank of the group."""
    out = []
    for p in params:
        shape, offset = _local_shape_and_offset(p)
        out.append(f"{describe(p)}: shard {list(shape)} at {list(offset)}")
    return out


@dataclass
class ShardGroup:
    """The local shards of one (device, dtype) of DTensor parameters, in a virtual flat order:
    member ``i`` occupies [offsets[i], offsets[i] + numel_i) of a layout of ``numel`` elements
    (aligned offsets; the gaps hold no parameter and stay zero in every buffer). The shards stay
    in FSDP's storage; ``buffers`` (center, wire, x_last...) are contiguous of length ``numel``."""
    params: list[Any]
    locals: list[torch.Tensor]
    offsets: list[int]
    numel: int
    dtype: torch.dtype
    device: torch.device
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._flat_locals = [t.view(-1) for t in self.locals]
        self._sizes = [t.numel() for t in self.locals]
        self._ends = [o + n for o, n in zip(self.offsets, self._sizes)]

    # ---- the group interface (see FlatGroup) ---------------------------------------------------------
    def x_slice(self, start: int, end: int) -> torch.Tensor:
        """The worker's elements [start, end) of the layout: a view of one local shard (a
        range across shards has no single view: cut it with :meth:`segment_bounds`)."""
        for i, (o, e) in enumerate(zip(self.offsets, self._ends)):
            if o <= start and end <= e and (start < e or start == end):
                return self._flat_locals[i][start - o:end - o]
        raise ValueError(f"elements [{start}, {end}) of the layout are not inside one local shard")

    def segment_bounds(self, start: int, end: int) -> list[tuple[int, int]]:
        """[start, end) cut into the non-empty runs that lie inside one local shard each (the
        gaps between shards hold no parameter)."""
        out = []
        for o, e in zip(self.offsets, self._ends):
            a, b = max(start, o), min(end, e)
            if b > a:
                out.append((a, b))
        return out

    def read_x(self) -> torch.Tensor:
        """A contiguous copy of the worker's local shards in the layout (gaps zero)."""
        out = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for o, t in zip(self.offsets, self._flat_locals):
                out[o:o + t.numel()].copy_(t)
        return out

    def write_x(self, values: torch.Tensor) -> None:
        """Copies ``values`` (the layout's length) into the local shards, in place."""
        with torch.no_grad():
            for o, t in zip(self.offsets, self._flat_locals):
                t.copy_(values[o:o + t.numel()])

    @property
    def storage_tensors(self) -> list[torch.Tensor]:
        return self.locals

    def ensure_views(self) -> int:
        """Checks that every parameter's local shard is still the tensor the exchange was
        prepared for (FSDP gives a parameter a new local tensor when ``model.to()`` casts or
        moves it); a C-level identity pass, no Python per parameter (10 us for 161
        parameters). A replaced shard is an error: the prepared launches cannot follow it.
        (``load_state_dict(assign=True)`` replaces the Parameter objects themselves, which no
        averager or optimizer built earlier can follow, sharded or not: build them again.)"""
        if all(map(operator.is_, map(_LOCAL, self.params), self.locals)):
            return 0
        i = next(i for i, (p, t) in enumerate(zip(self.params, self.locals)) if _LOCAL(p) is not t)
        raise RuntimeError(
            f"parameter {i}'s local shard ({describe(self.params[i])}) is no longer the storage "
            "the averager exchanges (the model was moved or cast after the averager was "
            "built); move or cast the model first, then build the averager")

    # ---- per-parameter views (checkpoints) ------------------------------------------------------------
    def member_view(self, buffer: torch.Tensor, i: int) -> torch.Tensor:
        """Member ``i``'s elements of a layout-length buffer, shaped like its local shard."""
        return buffer[self.offsets[i]:self._ends[i]].view(self.locals[i].shape)


_LOCAL = operator.attrgetter("_local_tensor")


def shard_groups(params: list[Any]) -> list[ShardGroup]:
    """The local shards of ``params``, one :class:`ShardGroup` per (device, dtype) in order of
    first appearance; nothing is moved."""
    by_key: dict[tuple[torch.device, torch.dtype], list[Any]] = {}
    for p in params:
        by_key.setdefault((local_tensor(p).device, p.dtype), []).append(p)
    groups = []
    for (device, dtype), members in by_key.items():
        offsets, total = [], 0
        for p in members:
            offsets.append(total)
            total = _aligned(total + local_tensor(p).numel())
        groups.append(ShardGroup(members, [local_tensor(p) for p in members], offsets,
                                 total, dtype, device))
    return groups
