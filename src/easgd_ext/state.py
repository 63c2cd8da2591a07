"""The checks a checkpoint passes before anything of it is loaded: counters of the right type
and range, and every saved buffer finite and of the dtype the averager keeps it in. A state that
fails them changes nothing (a NaN center would otherwise reset every worker to NaN)."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

import torch

from .stats import ExchangeStats

MAX_COUNTER = 2**62


def check_counter(name: str, value: object) -> int:
    """A saved step count: an int (not a bool, a float or a string) in [0, 2^62]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"state {name} must be an int, got {type(value).__name__} {value!r}")
    if not 0 <= value <= MAX_COUNTER:
        raise ValueError(f"state {name} must be in [0, 2^62], got {value}")
    return value


# Counters added after checkpoints were first written: a checkpoint without them loads as 0.
LATER_STATS = {"wait_seconds", "failures_survived", "workers_joined"}


def check_stats(saved: object) -> ExchangeStats:
    """The saved counters of :class:`ExchangeStats`: every field, ints >= 0 and finite seconds
    >= 0."""
    if not isinstance(saved, dict):
        raise ValueError(f"state stats must be a dict, got {type(saved).__name__}")
    names = {f.name: f.type for f in fields(ExchangeStats)}
    if not set(names) - LATER_STATS <= set(saved) <= set(names):
        raise ValueError(f"state stats must hold {sorted(set(names) - LATER_STATS)} (and may hold "
                         f"{sorted(LATER_STATS)}), got {sorted(saved)}")
    out: dict[str, Any] = {}
    for name, value in saved.items():
        if name.endswith("seconds"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value >= 0):
                raise ValueError(f"state stats.{name} must be a finite number >= 0, got {value!r}")
            out[name] = float(value)
        else:
            out[name] = check_counter(f"stats.{name}", value)
    return ExchangeStats(**out)


def check_finite_buffers(buffers: dict[str, Any]) -> None:
    """Every saved tensor (in lists, and in the entries of exchanges in flight) is a floating
    tensor of a dtype the averager uses, and finite: float32 for the center and everything
    beside it except the worker buffers (x_last), which have the parameters' dtype. The wire
    data of exchanges in flight is checked for its dtype only (a float16 sum may hold an
    overflow, which the apply leaves alone)."""
    for key, value in buffers.items():
        for where, t in _tensors(key, value):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"state buffer {where} must be a tensor, got {type(t).__name__}")
            if key == "in_flight":  # wire data: a float16 sum may hold an overflow the apply skips
                if t.dtype not in (torch.uint8, torch.float32, torch.bfloat16, torch.float16):
                    raise ValueError(f"state buffer {where} has dtype {t.dtype}")
                continue
            allowed = ((torch.float32, torch.bfloat16, torch.float16) if key == "x_last"
                       else (torch.float32,))
            if t.dtype not in allowed:
                raise ValueError(f"state buffer {where} is {str(t.dtype).removeprefix('torch.')}, "
                                 f"the averager keeps it in "
                                 f"{' or '.join(str(d).removeprefix('torch.') for d in allowed)}")
            if t.numel() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"state buffer {where} holds Inf or NaN: loading it would spread "
                                 "them (a reset worker takes the center); load a checkpoint taken "
                                 "before the divergence")


def _tensors(key: str, value: object) -> list[tuple[str, object]]:
    if isinstance(value, (list, tuple)):
        out = []
        for i, item in enumerate(value):
            if isinstance(item, dict):  # an exchange in flight
                out += _tensors(f"{key}[{i}]", item.get("buffers", []))
            else:
                out.append((f"{key}[{i}]", item))
        return out
    return [(key, value)]
