"""Torch-facing wrappers of the fused kernels, one function per kernel.

Every function updates its tensors in place in one pass, on the tensors' device: CPU tensors
run multi-threaded (``torch.get_num_threads()`` threads) with the GIL released; CUDA tensors are
enqueued on the current CUDA stream of their device, with no synchronization.

Dtypes: parameters (``x``, ``x_last``) and wire buffers (``wire``, ``reduced``) may be
float32, bfloat16 or float16; the center is always float32, and all arithmetic is float32.
All tensors of a call must be contiguous, on one device, of one shape, and must not overlap in
memory (``average_apply`` alone allows ``reduced is x``). Violations raise ``TypeError`` (not a
tensor, wrong dtype) or ``ValueError`` (everything else) naming the argument.

Each function is also a PyTorch custom op (``torch.ops.easgd_ext.<name>``, see
:mod:`easgd_ext.ops.library`): inside ``torch.compile`` the functions call the op, so a
``fullgraph=True`` compile traces through them; eagerly they call the core directly, which costs
a few microseconds instead of the dispatcher's tens.

:mod:`easgd_ext.ops.reference` computes each update in float64 for tests.
"""

from __future__ import annotations

import numbers
import sys

import torch

from .._native import native, num_threads, stream_of, tensor_ref
from . import library

__all__ = [
    "elastic_difference",
    "sync_apply",
    "async_exchange",
    "downpour_push",
    "downpour_pull",
    "downpour_async_exchange",
    "average_apply",
    "count_nonfinite",
]


def _scalar(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _run(build, tensors: dict[str, torch.Tensor], written: tuple[str, ...], *scalars: float) -> None:
    """Validates, runs ``build(*refs, *scalars)`` on the tensors' device, and bumps the version
    counters of what it wrote (the kernels write behind autograd's back: a backward pass that
    saved one of these tensors must fail loudly instead of using the new values silently)."""
    refs = [tensor_ref(name, t) for name, t in tensors.items()]
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {first_name} has shape "
                             f"{tuple(first.shape)}")
    launch = build(*refs, *scalars)
    native.run([launch], stream_of(first.device), num_threads())
    torch.autograd.graph.increment_version([tensors[name] for name in written])


def elastic_difference(x: torch.Tensor, center: torch.Tensor, wire: torch.Tensor,
                       alpha: float) -> None:
    """Synchronous EASGD, before the all-reduce: ``wire = alpha (x - center)``, rounded to
    ``wire``'s dtype. ``x`` and ``center`` are only read, so a skipped exchange changes nothing."""
    if torch.compiler.is_compiling():
        return torch.ops.easgd_ext.elastic_difference(x, center, wire, alpha)
    _run(native.prepare.elastic_difference, {"x": x, "center": center, "wire": wire}, ("wire",),
         _scalar("alpha", alpha))


def sync_apply(x: torch.Tensor, center: torch.Tensor, reduced: torch.Tensor,
               alpha: float) -> None:
    """Synchronous EASGD, after the all-reduce of the wire: ``x -= d``; ``center += reduced``,
    where ``d`` is recomputed bit for bit as :func:`elastic_difference` wrote it (rounded to
    ``reduced``'s dtype), so ``x`` loses exactly what it sent. Call it with the same ``alpha``
    and the unchanged ``x`` and ``center``. Where an element of ``reduced`` is Inf or NaN, that
    element of ``x`` and ``center`` is left as it was."""
    if torch.compiler.is_compiling():
        return torch.ops.easgd_ext.sync_apply(x, center, reduced, alpha)
    _run(native.prepare.sync_apply, {"x": x, "center": center, "reduced": reduced},
         ("x", "center"), _scalar("alpha", alpha))


def async_exchange(x: torch.Tensor, center: torch.Tensor, alpha: float) -> None:
    """Asynchronous EASGD: ``e = alpha (x - center)``; ``x -= e``; ``center += e``, where the
    ``e`` added to the center is what ``x`` actually lost after rounding to its dtype, so
    ``x + center`` is conserved up to float32 rounding of the center."""
    if torch.compiler.is_compiling():
        return torch.ops.easgd_ext.async_exchange(x, center, alpha)
    _run(native.prepare.async_exchange, {"x": x, "center": center}, ("x", "center"),
         _scalar("alpha", alpha))


def downpour_push(x: torch.Tensor, x_last: torch.Tensor, wire: torch.Tensor) -> None:
    """DOWNPOUR push: ``wire = x - x_last``, the local change since the last pull."""
    if torch.compiler.is_compiling():
        return torch.ops.easgd_ext.downpour_push(x, x_last, wire)
    _run(native.prepare.downpour_push, {"x": x, "x_last": x_last, "wire": wire}, ("wire",))


def downpour_pull(center: torch.Tensor, reduced: torch.Tensor, x: torch.Tensor,
                  x_last: torch.Tensor) -> None:
    """DOWNPOUR pull, synchronous form: ``center += reduced``; ``x = center``; ``x_last = x``
    (``x`` and ``x_last`` rounded to their dtype)."""
    if torch.compiler.is_compiling():
        return torch.ops.easgd_ext.downpour_pull(center, reduced, x, x_last)
    _run(native.prepare.downpour_pull, {"center": center, "reduced": reduced, "x": x, "x_last": x_last},
         ("center", "x", "x_last"))


def downpour_async_exchange(x: torch.Tensor, x_last: torch.Tensor, center: torch.Tensor) -> None:
    """DOWNPOUR against a shared center: ``center += x - x_last``; ``x = center``;
    ``x_last = x``."""
    if torch.compiler.is_compiling():
        return torch.ops.easgd_ext.downpour_async_exchange(x, x_last, center)
    _run(native.prepare.downpour_async_exchange, {"x": x, "x_last": x_last, "center": center},
         ("x", "x_last", "center"))


def average_apply(x: torch.Tensor, reduced: torch.Tensor, scale: float) -> None:
    """Periodic averaging: ``x = reduced * scale`` (``scale = 1/p`` turns an all-reduced sum
    into the mean). ``reduced`` may be ``x`` itself when it has ``x``'s dtype."""
    if torch.compiler.is_compiling():
        return torch.ops.easgd_ext.average_apply(x, reduced, scale)
    _run(native.prepare.average_apply, {"x": x, "reduced": reduced}, ("x",), _scalar("scale", scale))


def count_nonfinite(t: torch.Tensor) -> int:
    """How many elements of ``t`` (float32, bfloat16 or float16) are Inf or NaN. On the CPU one
    multi-threaded pass over the raw bits; on CUDA ``torch.isfinite`` (and a synchronization,
    since the answer is a Python int)."""
    if isinstance(t, torch.Tensor) and t.is_cuda:
        return int((~torch.isfinite(t)).sum().item())
    return native.count_nonfinite(tensor_ref("t", t), num_threads=num_threads())


library.register(sys.modules[__name__])
