"""What every benchmark's command line and table share: the program names, how sizes are
parsed, and the one ratio convention.

Ratio convention (every table, every JSON record): a ratio is a speedup over a named peer
measured in the same run, ``peer_seconds / our_seconds``, so > 1 means we are faster. Floors
and ceilings are peers like any other: ``vs_floor = floor_seconds / our_seconds`` (1.0: at the
floor), ``vs_copy = copy_seconds / our_seconds`` for the same bytes at the copy ceiling.
"""

from __future__ import annotations

import argparse
import math

PROG = "python -m easgd_ext.bench"
RATIO_LINE = "ratios: speedup over the peer (peer time / our time), >1 = faster"


def prog(command: str) -> str:
    """The program name argparse shows in usage lines: ``python -m easgd_ext.bench comm``."""
    return f"{PROG} {command}"


def count(text: str) -> int:
    """A whole number of at least 1, also written as a float (``1e6``, ``2.56e7``): the
    argparse ``type`` of element counts. Anything else is an argparse error naming the value."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of elements")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is less than 1")
    return int(value)


def speedup(peer_seconds: float, our_seconds: float) -> float:
    """The convention's ratio: how many times faster we are than the peer (> 1: faster)."""
    return peer_seconds / our_seconds


def speedups(seconds: dict[str, float], ours: str, peers: list[str] | None = None) -> dict[str, float]:
    """``{"vs_<peer>": speedup}`` of ``ours`` over each peer in ``seconds`` (all but ``ours``
    when ``peers`` is None; peers not measured are left out)."""
    names = [p for p in (seconds if peers is None else peers) if p in seconds and p != ours]
    return {f"vs_{peer}": speedup(seconds[peer], seconds[ours]) for peer in names}


def ratio_cell(ratios: dict[str, float], key: str, width: int) -> str:
    """A right-aligned ``1.23x`` (or ``-`` where the ratio was not measured)."""
    return f"{ratios[key]:.2f}x".rjust(width) if key in ratios else "-".rjust(width)
