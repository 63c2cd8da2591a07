"""Fragments of the model for a streamed exchange, and when each is exchanged.

The flat groups, one after the other in parameter order, are cut into ``F`` contiguous runs of
about equal length, each starting on an aligned element (a fragment is a run of layers; its
ends may fall inside a tensor: the exchange is element-wise). Fragment ``j`` is exchanged at
the clocks ``t`` with ``(t - offset_j) % tau == 0``, ``offset_j = j * tau // F``: every fragment
still every ``tau`` steps, at most ``ceil(F / tau)`` of them in one step, so the bytes of one
step drop to about ``1 / F`` of a whole exchange. With a delay ``k`` its sum is applied at
``t + k`` (``0 <= k < tau``: a fragment is in flight at most once).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..algorithms import Piece
from ..flat_params import ALIGN_ELEMENTS, ParamGroup


@dataclass(frozen=True)
class FragmentPlan:
    index: int
    offset: int                 # exchanged when (clock - offset) % tau == 0
    pieces: tuple[Piece, ...]   # its elements in each flat group it covers


def plan_fragments(groups: list[ParamGroup], fragments: int, tau: int) -> list[FragmentPlan]:
    """``fragments`` plans covering every element of ``groups`` once, in order. Tiny models
    may leave trailing fragments empty (they are dropped)."""
    total = sum(g.numel for g in groups)
    aligned_units = -(-total // ALIGN_ELEMENTS)
    bounds = [min(total, (j * aligned_units // fragments) * ALIGN_ELEMENTS) for j in range(fragments)]
    bounds.append(total)
    plans = []
    for j in range(fragments):
        lo, hi = bounds[j], bounds[j + 1]
        pieces, start = [], 0
        for g in groups:
            n = g.numel
            a, b = max(lo, start), min(hi, start + n)
            if b > a:
                pieces.append(Piece(g, a - start, b - start))
            start += n
        if pieces:
            plans.append(FragmentPlan(j, j * tau // fragments, tuple(pieces)))
    return plans


def due(offset: int, clock: int, tau: int) -> bool:
    """Whether a fragment with this offset is exchanged at ``clock`` (clocks count from 1)."""
    return clock >= 1 and (clock - offset) % tau == 0
