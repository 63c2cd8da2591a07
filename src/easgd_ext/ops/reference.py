"""Float64 reference versions of every kernel in :mod:`easgd_ext.ops`, for tests.

Each function takes the same arguments as the kernel of the same name, leaves them alone and
returns ``{name: float64 tensor}`` for every tensor the kernel writes: values computed in
float64, then rounded to the storage dtype of each output at the same points where the kernel
rounds (the wire value before it is subtracted from ``x``, say). Tensors the kernel only writes
are used for their dtype alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..settings import QUANT_BLOCK

__all__ = [
    "elastic_difference",
    "sync_apply",
    "outer_apply",
    "async_exchange",
    "downpour_push",
    "downpour_pull",
    "downpour_async_exchange",
    "average_apply",
]


def stored(values: Tensor, dtype: torch.dtype) -> Tensor:
    """``values`` as a tensor of ``dtype`` would hold them, back in float64."""
    return values.to(dtype).double()


def _difference(x: Tensor, center: Tensor, wire_dtype: torch.dtype, alpha: float) -> Tensor:
    return stored(alpha * (x.double() - center.double()), wire_dtype)


def elastic_difference(x: Tensor, center: Tensor, wire: Tensor, alpha: float) -> dict[str, Tensor]:
    return {"wire": _difference(x, center, wire.dtype, alpha)}


def sync_apply(x: Tensor, center: Tensor, reduced: Tensor, alpha: float) -> dict[str, Tensor]:
    d = _difference(x, center, reduced.dtype, alpha)
    return {"x": stored(x.double() - d, x.dtype),
            "center": stored(center.double() + reduced.double(), torch.float32)}


def outer_apply(x: Tensor, center: Tensor, momentum: Tensor, reduced: Tensor, alpha: float,
                lr: float, mu: float, nesterov: float, pull_to_new: float) -> dict[str, Tensor]:
    g = reduced.double()
    m_new = stored(mu * momentum.double() + g, torch.float32)
    step = g + mu * m_new if nesterov else m_new
    c_new = stored(center.double() + lr * step, torch.float32)
    xd = x.double()
    if pull_to_new:
        x_new = c_new if alpha == 1 else xd - alpha * (xd - c_new)
    else:
        x_new = xd - _difference(x, center, reduced.dtype, alpha)
    return {"x": stored(x_new, x.dtype), "center": c_new, "momentum": m_new}


def async_exchange(x: Tensor, center: Tensor, alpha: float) -> dict[str, Tensor]:
    xd, cd = x.double(), center.double()
    x_new = stored(xd - alpha * (xd - cd), x.dtype)
    return {"x": x_new, "center": stored(cd + (xd - x_new), torch.float32)}


def downpour_push(x: Tensor, x_last: Tensor, wire: Tensor) -> dict[str, Tensor]:
    return {"wire": stored(x.double() - x_last.double(), wire.dtype)}


def downpour_pull(center: Tensor, reduced: Tensor, x: Tensor, x_last: Tensor) -> dict[str, Tensor]:
    c_new = stored(center.double() + reduced.double(), torch.float32)
    x_new = stored(c_new, x.dtype)
    return {"center": c_new, "x": x_new, "x_last": x_new}


def downpour_async_exchange(x: Tensor, x_last: Tensor, center: Tensor) -> dict[str, Tensor]:
    c_new = stored(center.double() + (x.double() - x_last.double()), torch.float32)
    x_new = stored(c_new, x.dtype)
    return {"x": x_new, "x_last": x_new, "center": c_new}


def average_apply(x: Tensor, reduced: Tensor, scale: float) -> dict[str, Tensor]:
    return {"x": stored(reduced.double() * scale, x.dtype)}


# ---- the quantized wires (csrc/quantize.h): 8, 4 or 2 bits a value --------------------------------
# The quantizer is exact: its float32 steps (one rounding each, no FMA) are reproduced here with
# float32 tensor ops on the tensors' own device, so kernels and reference agree bit for bit (the
# torch-level wire, easgd_ext.centers.quantize_torch, runs these same functions); the sums over
# ranks are checked against float64 with a tolerance by the tests.
HEADER_BYTES = 64
QUANT_TINY = 2.0 ** -100


def quant_levels(bits: int) -> int:
    """How many scales a block's maximum spans (``scale = m / L``): 127, 7, or 2 at 2 bits."""
    return 2 if bits == 2 else (1 << (bits - 1)) - 1


def quant_clamp(bits: int) -> int:
    """The largest level: 127, 7 or 1 (levels ``-C..C``, zero exact)."""
    return (1 << (bits - 1)) - 1


def quant_layout(n: int, world: int, bits: int = 8) -> tuple[int, int]:
    """(chunk elements per owner, bytes per record) of an n-element piece among world ranks."""
    per_owner = -(-n // world)
    chunk = QUANT_BLOCK if per_owner < 1 else -(-per_owner // QUANT_BLOCK) * QUANT_BLOCK
    scales = -(-(chunk // QUANT_BLOCK * 4) // HEADER_BYTES) * HEADER_BYTES
    return chunk, HEADER_BYTES + scales + chunk * bits // 8


def quantize_blocks(v: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """float32 ``v`` (a multiple of the block length) -> (int8 levels q, float32 scale per
    block): with ``L`` = :func:`quant_levels` and ``C`` = :func:`quant_clamp`, ``scale = m /
    L``, ``q = clamp(rint(v * (L / m)), -C, C)`` with ``m`` the block's absolute maximum; a
    block whose maximum is below 2^-100 or not finite (an Inf or a NaN in it) sends zeros."""
    blocks = v.float().reshape(-1, QUANT_BLOCK)
    m = blocks.abs().amax(dim=1)  # a NaN wins the max: that block sends zeros
    # Tensor by tensor on one device: a number (or a CPU scalar) over a tensor is computed as
    # number * (1 / tensor), and on CUDA a tensor over one as tensor * (1 / number), which
    # round twice and move ties off their levels.
    levels = torch.full_like(m, float(quant_levels(bits)))
    usable = (m >= QUANT_TINY) & torch.isfinite(m)
    one = torch.ones_like(m)
    inv = torch.where(usable, levels / torch.where(usable, m, one), torch.zeros_like(m))
    scale = torch.where(usable, torch.where(usable, m, one) / levels, torch.zeros_like(m))
    top = quant_clamp(bits)
    t = torch.round(blocks * inv[:, None]).clamp(-top, top)  # torch.round: half to even
    t = torch.nan_to_num(t, nan=0.0)
    return t.to(torch.int8).reshape(-1), scale


def pack_levels(q: Tensor, bits: int) -> Tensor:
    """int8 levels -> their bytes: one each at 8 bits; else ``8 / bits`` a byte, value j at bit
    ``(j % (8 / bits)) * bits`` of byte ``j * bits / 8``, two's complement."""
    if bits == 8:
        return q.view(torch.uint8)
    per = 8 // bits
    fields = (q.to(torch.int32) & ((1 << bits) - 1)).reshape(-1, per)
    shifts = torch.arange(per, dtype=torch.int32, device=q.device) * bits
    return (fields << shifts).sum(dim=1).to(torch.uint8)


def unpack_levels(packed: Tensor, bits: int) -> Tensor:
    """The inverse of :func:`pack_levels`: int8 levels, sign-extended."""
    packed = packed.reshape(-1)
    if bits == 8:
        return packed.view(torch.int8)
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    fields = (packed.to(torch.int32)[:, None] >> shifts) & ((1 << bits) - 1)
    signed = torch.where(fields >= (1 << (bits - 1)), fields - (1 << bits), fields)
    return signed.reshape(-1).to(torch.int8)


def dequantize_blocks(q: Tensor, scale: Tensor) -> Tensor:
    """float32 ``q * scale`` per block."""
    return (q.float().reshape(-1, QUANT_BLOCK) * scale[:, None]).reshape(-1)


def _records(q: Tensor, scale: Tensor, flag: float, n: int, world: int, bits: int = 8) -> Tensor:
    chunk, record = quant_layout(n, world, bits)
    out = torch.zeros(world * record, dtype=torch.uint8)
    per_chunk = chunk // QUANT_BLOCK
    for w in range(world):
        rec = out[w * record:(w + 1) * record]
        rec[:4] = torch.tensor([flag], dtype=torch.float32).view(torch.uint8)
        rec[HEADER_BYTES:HEADER_BYTES + 4 * per_chunk] = scale[w * per_chunk:(w + 1) * per_chunk].contiguous().view(torch.uint8)
        q_at = record - chunk * bits // 8
        rec[q_at:] = pack_levels(q[w * chunk:(w + 1) * chunk].contiguous(), bits)
    return out


def _unrecord(records: Tensor, n: int, world: int, bits: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """(q over the padded piece, scales, header flags) of ``world`` records."""
    chunk, record = quant_layout(n, world, bits)
    per_chunk = chunk // QUANT_BLOCK
    qs, scales, flags = [], [], []
    for w in range(world):
        rec = records[w * record:(w + 1) * record]
        flags.append(float(rec[:4].view(torch.float32)[0]))
        scales.append(rec[HEADER_BYTES:HEADER_BYTES + 4 * per_chunk].clone().view(torch.float32))
        qs.append(unpack_levels(rec[record - chunk * bits // 8:].clone(), bits))
    return torch.cat(qs), torch.cat(scales), torch.tensor(flags)


def quantized_send(x: Tensor, center: Tensor | None, x_last: Tensor | None, residual: Tensor,
                   world: int, alpha: float, bits: int = 8) -> dict[str, Tensor]:
    """The sender's records (flag 0) and ``d`` as computed (EASGD ``alpha (x - c)`` in float32,
    or DOWNPOUR's ``x - x_last``)."""
    n = x.numel()
    chunk, _ = quant_layout(n, world, bits)
    xf = x.float()
    d = (xf - center) * torch.tensor(alpha, dtype=torch.float32) if center is not None else xf - x_last.float()
    v = torch.zeros(world * chunk)
    v[:n] = d + residual
    q, scale = quantize_blocks(v, bits)
    return {"records": _records(q, scale, 0.0, n, world, bits), "d": d}


def quantized_reduce(received: Tensor, server_residual: Tensor, n: int, world: int,
                     skip: bool = False, bits: int = 8) -> dict[str, Tensor]:
    """The owner's record and its new residual: ``s = sum_w deq(record w) + residual`` (float32,
    ranks in order), re-quantized; the residual is kept where the exchange is skipped."""
    chunk, record = quant_layout(n, world, bits)
    s = torch.zeros(chunk)
    flags = 0.0
    for w in range(world):
        q, scale, flag = _unrecord(received[w * record:(w + 1) * record], chunk, 1, bits)
        s = s + dequantize_blocks(q, scale)
        flags += float(flag[0])
    s = s + server_residual
    q, scale = quantize_blocks(s, bits)
    own = _records(q, scale, flags, chunk, 1, bits)
    new_residual = server_residual.clone() if (skip and flags) else s - dequantize_blocks(q, scale)
    return {"own": own, "server_residual": new_residual}


def quantized_apply(x: Tensor, center: Tensor, x_last: Tensor | None, residual: Tensor, sent: Tensor,
                    gathered: Tensor, world: int, alpha: float, d: Tensor | None = None,
                    bits: int = 8) -> dict[str, Tensor]:
    """What a rank applies without a verdict (no rank flagged): ``S = deq(gathered)``;
    EASGD ``x -= d``, DOWNPOUR ``x = x_last = c + S``; ``c += S``; the residual becomes
    ``d + residual - deq(sent)``."""
    n = x.numel()
    got_q, got_scale, _ = _unrecord(gathered, n, world, bits)
    sent_q, sent_scale, _ = _unrecord(sent, n, world, bits)
    S = dequantize_blocks(got_q, got_scale)[:n]
    own = dequantize_blocks(sent_q, sent_scale)[:n]
    xf = x.float()
    if d is None:
        d = (xf - center) * torch.tensor(alpha, dtype=torch.float32) if x_last is None else xf - x_last.float()
    c_new = center + S
    out = {"center": c_new, "residual": (d + residual) - own}
    if x_last is None:
        out["x"] = (xf - d).to(x.dtype)
    else:
        out["x"] = out["x_last"] = c_new.to(x.dtype)
    return out
