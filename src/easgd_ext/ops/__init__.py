"""Torch-facing wrappers of the fused kernels, one function per kernel.

Every function updates its tensors in place in one pass, on the tensors' device: CPU tensors
run multi-threaded (``torch.get_num_threads()`` threads) with the GIL released; CUDA tensors are
enqueued on the current CUDA stream of their device, with no synchronization.

Dtypes: parameters (``x``, ``x_last``) and wire buffers (``wire``, ``reduced``) may be
float32, bfloat16 or float16; the center is always float32, and all arithmetic is float32.
All tensors of a call must be contiguous, on one device, of one shape, and must not overlap in
memory (``average_apply`` allows ``reduced is x``; ``downpour_pull`` allows ``reduced``, ``x``
and ``x_last`` to be one buffer). Violations raise ``TypeError`` (not a tensor, wrong dtype) or
``ValueError`` (everything else) naming the argument.

**The table.** Each element-wise kernel of the float wires (8 of the core's prepared calls) is
declared once below, with :func:`kernel`: its signature (tensors,
then float scalars), its docstring, what it mutates and which of its tensors have the wire
dtype. That declaration is the kernel's row in :data:`KERNELS`, which drives everything else:

* the eager function: validates, builds ``native.prepare.<name>`` and runs it, bumping the
  version counters of what it wrote (a backward that saved one of them fails loudly);
* the PyTorch custom op ``torch.ops.easgd_ext.<name>`` (fake implementation: nothing, shapes
  never change): inside ``torch.compile`` the function calls the op, so a ``fullgraph=True``
  compile traces through it; eagerly it calls the core directly, a few microseconds instead of
  the dispatcher's tens;
* the float64 reference, :mod:`easgd_ext.ops.reference`'s function of the same name (same
  arguments; returns the mutated tensors' new values in float64, rounded where the kernel
  stores), and the table-driven tests (opcheck, reference comparison) of every row.

A new element-wise kernel is therefore: its functor and Args struct (``csrc/elastic_ops.h``,
``csrc/kernels.h``), its builder (``csrc/bindings.cpp``), one declaration here and one
reference function. The core's other prepared calls (the quantized wires' send, reduce and
apply, the status publishing, zero/copy, the shared-memory exchange) are not rows here: the
centers prepare them directly (``native.prepare.<name>``), and their tests call them so.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .._native import native, num_threads, stream_of, tensor_ref
from . import reference

__all__ = [
    "elastic_difference",
    "sync_apply",
    "outer_apply",
    "async_exchange",
    "downpour_push",
    "downpour_pull",
    "downpour_async_exchange",
    "average_apply",
    "count_nonfinite",
    "KERNELS",
    "KernelSpec",
]

NAMESPACE = "easgd_ext"


@dataclass(frozen=True)
class KernelSpec:
    """One row of the kernel table."""
    name: str
    tensors: tuple[str, ...]           # tensor arguments, in order
    scalars: tuple[str, ...]           # float arguments after them
    mutates: tuple[str, ...]           # what the kernel writes
    wire: tuple[str, ...]              # tensors of the wire dtype; FLOAT32_TENSORS are float32;
                                       # the rest have the parameters' dtype
    function: Callable[..., None]      # the public function (eager, or the op while compiling)
    op: Any                            # torch.ops.easgd_ext.<name>
    reference: Callable[..., dict[str, Tensor]]

    def dtype_of(self, tensor: str, param: torch.dtype, wire: torch.dtype) -> torch.dtype:
        """The dtype ``tensor`` has in a call with these parameter and wire dtypes."""
        if tensor in FLOAT32_TENSORS:
            return torch.float32
        return wire if tensor in self.wire else param


KERNELS: dict[str, KernelSpec] = {}
FLOAT32_TENSORS = ("center", "momentum")  # always float32, whatever the parameters' dtype


def _scalar(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def kernel(*, mutates: tuple[str, ...], wire: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Declares a kernel from a body-less function: its signature (``Tensor`` arguments, then
    ``float`` ones), its docstring, what it ``mutates`` and which tensors have the ``wire``
    dtype. Returns the public function and adds the row to :data:`KERNELS`."""

    def declare(declaration: Callable) -> Callable:
        name = declaration.__name__
        params = list(inspect.signature(declaration).parameters.values())
        tensors = tuple(p.name for p in params if p.annotation in ("Tensor", Tensor))
        scalars = tuple(p.name for p in params if p.annotation in ("float", float))
        if len(tensors) + len(scalars) != len(params) or set(mutates) - set(tensors):
            raise TypeError(f"kernel {name}: arguments must be Tensors then floats, mutating tensors")
        build = getattr(native.prepare, name)

        signature = inspect.signature(declaration)

        @functools.wraps(declaration)
        def eager(*args: Any, **kwargs: Any) -> None:
            if kwargs or len(args) != len(params):  # the slower, general binding
                args = signature.bind(*args, **kwargs).args
            given = dict(zip(tensors, args))
            refs = [tensor_ref(t, given[t]) for t in tensors]
            first = given[tensors[0]]
            for t in tensors[1:]:
                if given[t].shape != first.shape:
                    raise ValueError(f"{t} has shape {tuple(given[t].shape)} but {tensors[0]} has "
                                     f"shape {tuple(first.shape)}")
            values = [_scalar(s, v) for s, v in zip(scalars, args[len(tensors):])]
            native.run([build(*refs, *values)], stream_of(first.device), num_threads())
            # The kernel wrote behind autograd's back: a backward that saved one of these
            # tensors must fail loudly instead of using the new values silently.
            torch.autograd.graph.increment_version([given[t] for t in mutates])

        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=mutates)(eager)
        op.register_fake(lambda *args: None)

        @functools.wraps(declaration)
        def function(*args: Any, **kwargs: Any) -> None:
            if torch.compiler.is_compiling():
                return op(*args, **kwargs)
            return eager(*args, **kwargs)

        KERNELS[name] = KernelSpec(name, tensors, scalars, tuple(mutates), tuple(wire), function,
                                   getattr(getattr(torch.ops, NAMESPACE), name),
                                   getattr(reference, name))
        return function

    return declare


# ---- the table -----------------------------------------------------------------------------------
@kernel(mutates=("wire",), wire=("wire",))
def elastic_difference(x: Tensor, center: Tensor, wire: Tensor, alpha: float) -> None:
    """Synchronous EASGD, before the all-reduce: ``wire = alpha (x - center)``, rounded to
    ``wire``'s dtype. ``x`` and ``center`` are only read, so a skipped exchange changes nothing."""


@kernel(mutates=("x", "center"), wire=("reduced",))
def sync_apply(x: Tensor, center: Tensor, reduced: Tensor, alpha: float) -> None:
    """Synchronous EASGD, after the all-reduce of the wire: ``x -= d``; ``center += reduced``,
    where ``d`` is recomputed bit for bit as :func:`elastic_difference` wrote it (rounded to
    ``reduced``'s dtype), so ``x`` loses exactly what it sent. Call it with the same ``alpha``
    and the unchanged ``x`` and ``center``. Where an element of ``reduced`` is Inf or NaN, that
    element of ``x`` and ``center`` is left as it was."""


@kernel(mutates=("x", "center", "momentum"), wire=("reduced",))
def outer_apply(x: Tensor, center: Tensor, momentum: Tensor, reduced: Tensor, alpha: float, lr: float,
                mu: float, nesterov: float, pull_to_new: float) -> None:
    """An outer optimizer on the center, after the all-reduce of ``d = alpha (x - center)``
    (:func:`elastic_difference`): ``g = reduced``; ``momentum = mu momentum + g``; ``center +=
    lr (g + mu momentum)`` with ``nesterov`` (nonzero), else ``lr momentum``; ``x -= d``
    (recomputed as sent: EASGD's pull towards the old center) or, with ``pull_to_new``
    (nonzero), ``x -= alpha (x - new center)`` (``alpha = 1``: ``x`` = the new center, exactly:
    DiLoCo's reset). With ``mu = 0`` and ``lr = 1`` it stores what :func:`sync_apply` stores, bit
    for bit. Where an element of ``reduced`` is Inf or NaN, x, center and momentum are left
    alone there."""


@kernel(mutates=("x", "center"))
def async_exchange(x: Tensor, center: Tensor, alpha: float) -> None:
    """Asynchronous EASGD: ``e = alpha (x - center)``; ``x -= e``; ``center += e``, where the
    ``e`` added to the center is what ``x`` actually lost after rounding to its dtype, so
    ``x + center`` is conserved up to float32 rounding of the center."""


@kernel(mutates=("wire",), wire=("wire",))
def downpour_push(x: Tensor, x_last: Tensor, wire: Tensor) -> None:
    """DOWNPOUR push: ``wire = x - x_last``, the local change since the last pull."""


@kernel(mutates=("center", "x", "x_last"), wire=("reduced",))
def downpour_pull(center: Tensor, reduced: Tensor, x: Tensor, x_last: Tensor) -> None:
    """DOWNPOUR pull, synchronous form: ``center += reduced``; ``x = center``; ``x_last = x``
    (``x`` and ``x_last`` rounded to their dtype). Where an element of ``reduced`` is Inf or
    NaN, that element is left as it was."""


@kernel(mutates=("x", "x_last", "center"))
def downpour_async_exchange(x: Tensor, x_last: Tensor, center: Tensor) -> None:
    """DOWNPOUR against a shared center: ``center += x - x_last``; ``x = center``;
    ``x_last = x``."""


@kernel(mutates=("x",), wire=("reduced",))
def average_apply(x: Tensor, reduced: Tensor, scale: float) -> None:
    """Periodic averaging: ``x = reduced * scale`` (``scale = 1/p`` turns an all-reduced sum
    into the mean). ``reduced`` may be ``x`` itself when it has ``x``'s dtype."""


# ---- not in the table: a query, not an update ----------------------------------------------------
def count_nonfinite(t: torch.Tensor) -> int:
    """How many elements of ``t`` (float32, bfloat16 or float16) are Inf or NaN. On the CPU one
    multi-threaded pass over the raw bits; on CUDA ``torch.isfinite`` (and a synchronization,
    since the answer is a Python int)."""
    if isinstance(t, torch.Tensor) and t.is_cuda:
        return int((~torch.isfinite(t)).sum().item())
    return native.count_nonfinite(tensor_ref("t", t), num_threads=num_threads())
