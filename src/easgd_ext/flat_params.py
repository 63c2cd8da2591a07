"""Parameters re-pointed as views into one flat buffer per (device, dtype).

An exchange is then a handful of passes over a few large buffers instead of a loop over
hundreds of tensors, with no cat before the all-reduce and no copy back after it. The
``Parameter`` objects stay the same (only their ``.data`` moves), so gradients, optimizers and
``model.state_dict()`` keep working; ``model.load_state_dict()`` copies into the views.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Bucket and group boundaries fall on multiples of this many elements, so every slice handed
# to a kernel stays aligned for its vector loads.
ALIGN_ELEMENTS = 64


def describe(t: torch.Tensor) -> str:
    """``float32[64, 3, 7, 7] on cpu``: how layouts are named in error messages (with the
    strides where the memory order is not the row-major one, e.g. channels_last)."""
    order = "" if t.is_contiguous() else f" strides {list(t.stride())}"
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}{order} on {t.device.type}"


def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t`` fills its memory without gaps or overlaps in some order of its dimensions
    (row-major, channels_last, any permutation): then it can live in a flat slot of numel
    elements with its own strides."""
    dims = sorted((t.stride(d), t.shape[d]) for d in range(t.dim()) if t.shape[d] != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def collect_parameters(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors of ``params``, checked: each once (``model.parameters()`` lists a tied weight
    once; a list holding a tensor twice is a mistake, and an error)."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors (e.g. model.parameters()), "
                        "got a single tensor; wrap it in a list")
    try:
        items = list(params)
    except TypeError:
        raise TypeError(f"params must be an iterable of tensors, got {type(params).__name__}") from None
    unique: list[torch.Tensor] = []
    seen: set[int] = set()
    sharded: list[int] = []  # DTensor parameters (a sharded model): see dtensor_params
    for i, p in enumerate(items):
        if isinstance(p, dict):
            raise TypeError("params must be tensors, not optimizer-style parameter groups; "
                            "pass model.parameters()")
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"params[{i}] is {describe(p)}; parameters must be float32, bfloat16 "
                            "or float16")
        if p.device.type not in ("cpu", "cuda"):
            raise ValueError(f"params[{i}] is {describe(p)}; only CPU and CUDA tensors are supported")
        if is_dtensor(p):
            sharded.append(i)
        elif p._is_view() or not is_dense(p):
            raise ValueError(
                f"params[{i}] is a view of another tensor ({describe(p)}): "
                "its values would be moved into the averager's buffer and the tensor it views "
                "would never be averaged; pass the tensors that own their memory, such as "
                "model.parameters()")
        if id(p) in seen:
            first = next(j for j, q in enumerate(items) if q is p)
            raise ValueError(f"params[{i}] is params[{first}] again: pass each tensor once "
                             "(model.parameters() lists a tied weight once)")
        seen.add(id(p))
        unique.append(p)
    if not unique:
        raise ValueError("params is empty: there is nothing to average")
    if sharded:
        if len(sharded) != len(items):
            plain = next(i for i in range(len(items)) if i not in sharded)
            raise TypeError(
                f"params mixes DTensor parameters (params[{sharded[0]}], a sharded model) and "
                f"plain tensors (params[{plain}]): pass the parameters of one fully_shard-ed "
                "model (every parameter a DTensor), or of a model that is not sharded")
        return unique  # their local shards are FSDP's storage: dtensor_params checks them
    _check_no_overlap(unique)
    return unique


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (the parameters of a ``fully_shard``-ed model)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def _dtensor_type() -> type | None:
    # A DTensor exists only once its module was imported: looked up, never imported here
    # (importing torch.distributed.tensor takes a second or more).
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):  # torch >= 2.5, 2.4
        dtensor = getattr(sys.modules.get(name), "DTensor", None)
        if dtensor is not None:
            return dtensor
    return None


def _check_no_overlap(params: list[torch.Tensor]) -> None:
    """Two parameters sharing memory (not tied: the same tensor counts once) cannot both be
    moved into slots of their own without breaking what they share."""
    by_device: dict[torch.device, list[tuple[int, int, int]]] = {}
    for i, p in enumerate(params):
        if p.numel() > 0:
            start = p.data_ptr()
            by_device.setdefault(p.device, []).append((start, start + p.numel() * p.element_size(), i))
    for spans in by_device.values():
        spans.sort()
        for (_, end, i), (start, _, j) in zip(spans, spans[1:]):
            if start < end:
                a, b = sorted((i, j))
                raise ValueError(f"params[{a}] and params[{b}] overlap in memory (views of one "
                                 "tensor?); pass each tensor once, and only tensors that own their "
                                 "memory")


def _aligned(n: int) -> int:
    return -(-n // ALIGN_ELEMENTS) * ALIGN_ELEMENTS


class ParamGroup(Protocol):
    """What the synchronous exchange needs of a group of parameters (one device and dtype),
    whatever holds their storage: a :class:`FlatGroup` (one flat buffer the parameters view)
    or a :class:`~easgd_ext.dtensor_params.ShardGroup` (the local shards of DTensor
    parameters, in FSDP's storage). ``buffers`` (the center, the rule's state) are laid out
    like the worker's values: ``numel`` elements."""
    params: list[Any]
    buffers: dict[str, torch.Tensor]

    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def numel(self) -> int: ...
    @property
    def storage_tensors(self) -> list[torch.Tensor]: ...
    def x_slice(self, start: int, end: int) -> torch.Tensor: ...
    def segment_bounds(self, start: int, end: int) -> list[tuple[int, int]]: ...
    def read_x(self) -> torch.Tensor: ...
    def write_x(self, values: torch.Tensor) -> None: ...
    def ensure_views(self) -> int: ...


@dataclass
class FlatGroup:
    """The parameters of one (device, dtype) and the flat buffer their ``.data`` views.

    Each parameter's slot starts at an aligned offset; the gaps between slots are zero and
    stay zero under every update this package applies (they are never written by the user)."""
    params: list[torch.Tensor]
    offsets: list[int]
    strides: list[tuple[int, ...]]
    flat: torch.Tensor
    # Per-algorithm buffers of the same length (center, wire, x_last), by name.
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return self.flat.dtype

    @property
    def device(self) -> torch.device:
        return self.flat.device

    @property
    def numel(self) -> int:
        """Elements of the layout: of ``flat``, and of every buffer."""
        return self.flat.numel()

    # ---- what the centers and the averager use (a ShardGroup offers the same) ----------------------
    def x_slice(self, start: int, end: int) -> torch.Tensor:
        """The worker's elements [start, end) of the layout (a view)."""
        return self.flat[start:end]

    def segment_bounds(self, start: int, end: int) -> list[tuple[int, int]]:
        """[start, end) cut where the worker's storage is not contiguous: here, never."""
        return [(start, end)]

    def read_x(self) -> torch.Tensor:
        """The worker's values in the layout: ``flat`` itself (read it; write through
        :meth:`write_x` or the parameters)."""
        return self.flat

    def write_x(self, values: torch.Tensor) -> None:
        """Overwrites the worker's values (a tensor of the layout's length)."""
        if values is not self.flat:
            with torch.no_grad():
                self.flat.copy_(values)

    @property
    def storage_tensors(self) -> list[torch.Tensor]:
        """The tensors the exchange writes (whose versions an in-place update bumps)."""
        return self.params

    def slot(self, i: int) -> torch.Tensor:
        """Parameter ``i``'s view of the flat buffer, in the parameter's own memory order (a
        channels_last weight stays channels_last)."""
        p = self.params[i]
        return self.flat.as_strided(p.shape, self.strides[i], self.offsets[i])

    def ensure_views(self) -> int:
        """:meth:`repoint` where needed. The common case, every parameter still viewing its
        slot, costs one pass of C calls over the parameters and no Python per parameter: this
        runs on every exchange."""
        if list(map(torch.Tensor.data_ptr, self.params)) == self._slot_pointers:
            return 0
        return self.repoint()

    @functools.cached_property
    def _slot_pointers(self) -> list[int]:
        base, size = self.flat.data_ptr(), self.flat.element_size()
        return [base + o * size for o in self.offsets]

    def repoint(self) -> int:
        """Makes every parameter a view of its slot again; returns how many had to be fixed.

        Code that assigns ``p.data = ...`` detaches a parameter from the flat buffer; its new
        values are copied into the slot so nothing is lost and the next exchange sees them.
        (``load_state_dict(assign=True)`` replaces the Parameter objects themselves, which no
        averager or optimizer built earlier can follow: build them again after it.)"""
        fixed = 0
        for i, p in enumerate(self.params):
            slot = self.slot(i)
            if p.data_ptr() == slot.data_ptr() and p.shape == slot.shape and p.dtype == slot.dtype:
                continue
            if p.shape != slot.shape or p.dtype != slot.dtype or p.device != slot.device:
                raise ValueError(f"parameter {i} changed from {describe(slot)} to {describe(p)} "
                                 "after the averager was built; move or cast the model first, "
                                 "then build the averager")
            with torch.no_grad():
                slot.copy_(p.data)
            p.data = slot
            fixed += 1
        return fixed


def plan(params: list[torch.Tensor]) -> list[tuple[tuple[torch.device, torch.dtype], list[torch.Tensor], list[int], int]]:
    """How :func:`flatten` lays ``params`` out, without touching them: per (device, dtype) in
    order of first appearance, the members, their aligned offsets and the buffer length."""
    by_key: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        by_key.setdefault((p.device, p.dtype), []).append(p)
    out = []
    for key, members in by_key.items():
        offsets, total = [], 0
        for p in members:
            offsets.append(total)
            total = _aligned(total + p.numel())
        out.append((key, members, offsets, total))
    return out


def flatten(params: list[torch.Tensor]) -> list[FlatGroup]:
    """Moves ``params`` into flat buffers, one per (device, dtype) in order of first appearance,
    and re-points each parameter's ``.data`` at its slot."""
    groups = []
    for (device, dtype), members, offsets, total in plan(params):
        flat = torch.zeros(total, dtype=dtype, device=device)
        group = FlatGroup(members, offsets, [p.stride() for p in members], flat)
        with torch.no_grad():
            for i, p in enumerate(members):
                slot = group.slot(i)
                slot.copy_(p.data)
                p.data = slot
        groups.append(group)
    return groups


def layout_of(params: list[torch.Tensor]) -> list[str]:
    """One line per parameter (dtype, shape, device type): what must agree across ranks."""
    return [describe(p) for p in params]


def bucket_ranges(numel: int, bucket_elements: int) -> list[tuple[int, int]]:
    """[start, end) ranges covering ``numel``, each at most ``bucket_elements`` long (rounded
    up to the alignment) and starting on an aligned offset."""
    step = max(ALIGN_ELEMENTS, _aligned(bucket_elements))
    return [(s, min(s + step, numel)) for s in range(0, numel, step)]


def check_saved(name: str, saved: object, like: list[torch.Tensor]) -> None:
    """A checkpoint's list of buffers must match the flat buffers it is loaded into."""
    if not isinstance(saved, (list, tuple)) or len(saved) != len(like) or any(
            not isinstance(s, torch.Tensor) or s.shape != t.shape for s, t in zip(saved, like)):
        raise ValueError(f"state buffer {name!r} does not match this averager's layout")
