"""The quantized wire's steps in torch ops: what ``EASGD_EXT_KERNELS=torch`` runs, on any device.

Each function writes the same bytes and floats as its native kernel (``csrc/quantize.h``): the
records' layout, block scales, round-half-to-even levels, packing and the float32 order of every
sum, with no host read (verdicts and flags stay tensors on the device). The block quantizer,
packing and layout are :mod:`easgd_ext.ops.reference`'s exact float32 functions; this module
assembles the records and the sums from them. The tests hold it to the kernels bit for bit.
"""

from __future__ import annotations

import torch

from ..algorithms import flag_nonfinite
from ..ops import reference as ref
from ..ops.reference import HEADER_BYTES
from ..settings import POLICY_CODES, QUANT_BLOCK

POLICY_SKIP, POLICY_RESET = POLICY_CODES["skip"], POLICY_CODES["reset"]


class Layout:
    """A piece of ``n`` elements cut among ``world`` owners, ``bits`` a value: chunk elements per
    owner (whole blocks), bytes per record, and where a record's scales and levels start."""

    def __init__(self, n: int, world: int, bits: int) -> None:
        self.n, self.world, self.bits = n, world, bits
        self.chunk, self.record = ref.quant_layout(n, world, bits)
        self.blocks = self.chunk // QUANT_BLOCK  # per owner
        self.q_offset = self.record - self.chunk * bits // 8


def _rows(records: torch.Tensor, layout: Layout, rows: int) -> torch.Tensor:
    return records[:rows * layout.record].view(rows, layout.record)


def _flags(rows: torch.Tensor) -> torch.Tensor:
    return rows[:, :4].contiguous().view(torch.float32).reshape(-1)


def _write(rows: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, layout: Layout) -> None:
    """Levels and scales into records (one row per owner); the headers are left alone."""
    count = rows.shape[0]
    rows[:, HEADER_BYTES:HEADER_BYTES + 4 * layout.blocks] = scale.reshape(count, layout.blocks).view(torch.uint8)
    rows[:, layout.q_offset:] = ref.pack_levels(q, layout.bits).reshape(count, -1)


def _read(rows: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The de-quantized values of records (owner after owner)."""
    scale = rows[:, HEADER_BYTES:HEADER_BYTES + 4 * layout.blocks].contiguous().view(torch.float32)
    return ref.dequantize_blocks(ref.unpack_levels(rows[:, layout.q_offset:].contiguous(), layout.bits),
                                 scale.reshape(-1))


def send(contribution: torch.Tensor, residual: torch.Tensor, records: torch.Tensor, layout: Layout,
         me_bad: torch.Tensor) -> None:
    """``v = contribution + residual`` quantized into the ``world`` records; ``me_bad`` set if
    any ``v`` is not finite."""
    v = torch.zeros(layout.world * layout.chunk, device=contribution.device)
    v[:layout.n] = contribution + residual
    flag_nonfinite(me_bad, v)
    q, scale = ref.quantize_blocks(v, layout.bits)
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
    q, scale = ref.quantize_blocks(s, layout.bits)
    own_rows = _rows(own, layout, 1)
    own_rows[:, :4] = bad.view(torch.uint8)
    _write(own_rows, q, scale, layout)
    keeps = (bad != 0) if policy == POLICY_SKIP else torch.zeros_like(bad, dtype=torch.bool)
    server_residual.copy_(torch.where(keeps, server_residual, s - ref.dequantize_blocks(q, scale)))


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
