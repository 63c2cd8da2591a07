"""The quantized wire's steps in torch ops: what ``EASGD_EXT_KERNELS=torch`` runs, on any device.

Each function writes the same bytes and floats as its native kernel (``csrc/quantize.h``): the
records' layout, block scales, round-half-to-even levels, packing and the float32 order of every
sum, with no host read (verdicts and flags stay tensors on the device). The tests hold the two to
each other bit for bit.
"""

from __future__ import annotations

import torch

from ..algorithms import flag_nonfinite
from ..settings import QUANT_BLOCK

HEADER_BYTES = 64          # a record's header: the float32 flag at byte 0, padded
QUANT_TINY = 2.0 ** -100   # a block whose maximum is below it sends zeros
FLOAT32_MAX = 3.4028234663852886e38
POLICY_SKIP, POLICY_RESET = 0, 1


class Layout:
    """A piece of ``n`` elements cut among ``world`` owners, ``bits`` a value: chunk elements per
    owner (whole blocks), bytes per record, and where a record's scales and levels start."""

    def __init__(self, n: int, world: int, bits: int) -> None:
        self.n, self.world, self.bits = n, world, bits
        per_owner = -(-n // world)
        self.chunk = -(-max(per_owner, 1) // QUANT_BLOCK) * QUANT_BLOCK
        self.blocks = self.chunk // QUANT_BLOCK  # per owner
        scales = -(-(self.blocks * 4) // HEADER_BYTES) * HEADER_BYTES
        self.q_offset = HEADER_BYTES + scales
        self.record = self.q_offset + self.chunk * bits // 8

    def levels(self) -> tuple[float, float]:
        """(L, C): a block's maximum spans L scales; levels are clamped to -C..C."""
        clamp = float((1 << (self.bits - 1)) - 1)
        return (2.0 if self.bits == 2 else clamp), clamp


def _quantize(v: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``v`` (whole blocks) -> (int8 levels, float32 scale per block)."""
    levels, clamp = layout.levels()
    blocks = v.reshape(-1, QUANT_BLOCK)
    m = blocks.abs().amax(dim=1)  # a NaN wins: that block's scale is 0
    usable = (m >= QUANT_TINY) & (m <= FLOAT32_MAX)
    safe = torch.where(usable, m, torch.ones_like(m))
    # Tensor by tensor: a Python number over a tensor is computed as number * (1 / tensor),
    # which rounds twice and moves ties off their levels.
    level_count = torch.full_like(m, levels)
    inv = torch.where(usable, level_count / safe, torch.zeros_like(m))
    scale = torch.where(usable, safe / level_count, torch.zeros_like(m))
    t = torch.round(blocks * inv[:, None]).clamp(-clamp, clamp)  # half to even, as rintf
    return torch.nan_to_num(t, nan=0.0).to(torch.int8).reshape(-1), scale


def _dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q.float().reshape(-1, QUANT_BLOCK) * scale[:, None]).reshape(-1)


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return q.view(torch.uint8)
    per = 8 // bits
    fields = (q.to(torch.int32) & ((1 << bits) - 1)).reshape(-1, per)
    shifts = torch.arange(per, dtype=torch.int32, device=q.device) * bits
    return (fields << shifts).sum(dim=1).to(torch.uint8)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed.reshape(-1).view(torch.int8)
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    fields = (packed.reshape(-1).to(torch.int32)[:, None] >> shifts) & ((1 << bits) - 1)
    return torch.where(fields >= (1 << (bits - 1)), fields - (1 << bits), fields).reshape(-1).to(torch.int8)


def _rows(records: torch.Tensor, layout: Layout, rows: int) -> torch.Tensor:
    return records[:rows * layout.record].view(rows, layout.record)


def _flags(rows: torch.Tensor) -> torch.Tensor:
    return rows[:, :4].contiguous().view(torch.float32).reshape(-1)


def _write(rows: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, layout: Layout) -> None:
    """Levels and scales into records (one row per owner); the headers are left alone."""
    count = rows.shape[0]
    rows[:, HEADER_BYTES:HEADER_BYTES + 4 * layout.blocks] = scale.reshape(count, layout.blocks).view(torch.uint8)
    rows[:, layout.q_offset:] = _pack(q, layout.bits).reshape(count, -1)


def _read(rows: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The de-quantized values of records (owner after owner)."""
    scale = rows[:, HEADER_BYTES:HEADER_BYTES + 4 * layout.blocks].contiguous().view(torch.float32)
    return _dequantize(_unpack(rows[:, layout.q_offset:].contiguous(), layout.bits), scale.reshape(-1))


def send(contribution: torch.Tensor, residual: torch.Tensor, records: torch.Tensor, layout: Layout,
         me_bad: torch.Tensor) -> None:
    """``v = contribution + residual`` quantized into the ``world`` records; ``me_bad`` set if
    any ``v`` is not finite."""
    v = torch.zeros(layout.world * layout.chunk, device=contribution.device)
    v[:layout.n] = contribution + residual
    flag_nonfinite(me_bad, v)
    q, scale = _quantize(v, layout)
    _write(_rows(records, layout, layout.world), q, scale, layout)


def publish(records: torch.Tensor, layout: Layout, me_bad: torch.Tensor) -> None:
    """Every record's header = ``me_bad``; if it is set, every scale and level = 0."""
    rows = _rows(records, layout, layout.world)
    rows[:, :4] = me_bad.reshape(1).view(torch.uint8)
    rows[:, HEADER_BYTES:] = torch.where(me_bad != 0, torch.zeros_like(rows[:, HEADER_BYTES:]),
                                         rows[:, HEADER_BYTES:])


def reduce(received: torch.Tensor, own: torch.Tensor, server_residual: torch.Tensor, layout: Layout,
           policy: int) -> None:
    """The owner's chunk: ``s = sum_w deq(record w) + residual`` (ranks in order, float32),
    re-quantized into ``own`` with the count of flagged ranks in its header; the residual keeps
    ``s - deq(q)`` unless the exchange is skipped."""
    rows = _rows(received, layout, layout.world)
    flags = _flags(rows)
    bad = torch.zeros(1, device=received.device)
    s = torch.zeros(layout.chunk, device=received.device)
    for w in range(layout.world):
        bad = bad + flags[w]
        s = s + _read(rows[w:w + 1], layout)
    s = s + server_residual
    q, scale = _quantize(s, layout)
    own_rows = _rows(own, layout, 1)
    own_rows[:, :4] = bad.view(torch.uint8)
    _write(own_rows, q, scale, layout)
    keeps = (bad != 0) if policy == POLICY_SKIP else torch.zeros_like(bad, dtype=torch.bool)
    server_residual.copy_(torch.where(keeps, server_residual, s - _dequantize(q, scale)))


def apply(summed: torch.Tensor, residual: torch.Tensor, contribution: torch.Tensor, sent: torch.Tensor,
          gathered: torch.Tensor, layout: Layout, policy: int, me_bad: torch.Tensor) -> None:
    """``summed = deq(gathered)`` (the owners' sum, for the rule's own apply); the residual
    becomes ``contribution + residual - deq(sent)``. Nothing is written where the exchange is
    skipped; a reset rank keeps its residual."""
    rows = _rows(gathered, layout, layout.world)
    bad = _flags(rows)[:1]
    applies = (bad == 0) if policy == POLICY_SKIP else torch.ones_like(bad, dtype=torch.bool)
    reset = (me_bad != 0) if policy == POLICY_RESET else torch.zeros_like(me_bad, dtype=torch.bool)
    S = _read(rows, layout)[:layout.n]
    own = _read(_rows(sent, layout, layout.world), layout)[:layout.n]
    residual.copy_(torch.where(applies & ~reset, (contribution + residual) - own, residual))
    summed.copy_(torch.where(applies, S, summed))
