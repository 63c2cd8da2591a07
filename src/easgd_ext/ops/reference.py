"""Float64 reference versions of every kernel in :mod:`easgd_ext.ops`, for tests.

Each function leaves its inputs alone and returns float64 tensors holding what the kernel
stores: values computed in float64, then rounded to the storage dtype of each output at the
same points where the kernel rounds (the wire value before it is subtracted from ``x``, say).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "elastic_difference",
    "sync_apply",
    "async_exchange",
    "downpour_push",
    "downpour_pull",
    "downpour_async_exchange",
    "average_apply",
]


def _stored(values: Tensor, dtype: torch.dtype) -> Tensor:
    """``values`` as a tensor of ``dtype`` would hold them, back in float64."""
    return values.to(dtype).double()


def elastic_difference(x: Tensor, center: Tensor, wire_dtype: torch.dtype,
                       alpha: float) -> Tensor:
    """Returns ``wire``."""
    return _stored(alpha * (x.double() - center.double()), wire_dtype)


def sync_apply(x: Tensor, center: Tensor, reduced: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Returns ``(x_new, center_new)``."""
    d = elastic_difference(x, center, reduced.dtype, alpha)
    x_new = _stored(x.double() - d, x.dtype)
    return x_new, _stored(center.double() + reduced.double(), torch.float32)


def async_exchange(x: Tensor, center: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Returns ``(x_new, center_new)``."""
    xd, cd = x.double(), center.double()
    x_new = _stored(xd - alpha * (xd - cd), x.dtype)
    return x_new, _stored(cd + (xd - x_new), torch.float32)


def downpour_push(x: Tensor, x_last: Tensor, wire_dtype: torch.dtype) -> Tensor:
    """Returns ``wire``."""
    return _stored(x.double() - x_last.double(), wire_dtype)


def downpour_pull(center: Tensor, reduced: Tensor, x_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Returns ``(center_new, x_new)``; ``x_last`` equals ``x_new``."""
    c_new = _stored(center.double() + reduced.double(), torch.float32)
    return c_new, _stored(c_new, x_dtype)


def downpour_async_exchange(x: Tensor, x_last: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
    """Returns ``(x_new, center_new)``; ``x_last`` equals ``x_new``."""
    c_new = _stored(center.double() + (x.double() - x_last.double()), torch.float32)
    return _stored(c_new, x.dtype), c_new


def average_apply(reduced: Tensor, scale: float, x_dtype: torch.dtype) -> Tensor:
    """Returns ``x_new``."""
    return _stored(reduced.double() * scale, x_dtype)
