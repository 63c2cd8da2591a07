"""The bridge to the compiled core: loads ``easgd_ext._C`` (with an error that says how to fix a
missing or broken build) and turns torch tensors into what it takes (``TensorRef``: name,
pointer, size, dtype, device) and the stream to run on."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

try:
    from . import _C as native
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "easgd_ext's native module easgd_ext._C could not be loaded "
        f"({exc}). Install the package with `pip install --no-build-isolation .` from the "
        "repository root (needs a C++17 compiler, CMake >= 3.24 and pybind11), and run Python "
        "from anywhere but a folder holding a bare copy of its sources."
    ) from exc

__all__ = ["native", "tensor_ref", "stream_of", "num_threads", "on_device"]


def tensor_ref(name: str, t: object) -> "native.TensorRef":
    """``t`` as the native core sees it; ``name`` is what its errors call it. Raises
    ``TypeError`` (not a tensor) or ``ValueError`` (not contiguous); the core checks the rest."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got shape {tuple(t.shape)}, strides {t.stride()})")
    dtype = str(t.dtype).removeprefix("torch.")
    index = -1 if t.device.index is None else t.device.index
    return native.TensorRef(name, t.data_ptr(), t.numel(), dtype, t.device.type, index)


def stream_of(device: torch.device) -> int:
    """The current CUDA stream of ``device`` as an integer (0 for the CPU): where kernels go."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def num_threads() -> int:
    """CPU kernels use torch's thread count, so one setting governs both."""
    return torch.get_num_threads()


def on_device(device: torch.device) -> Any:
    """``device`` current around a native CUDA call when it is not already: torch's guard, which
    restores the previous device without making a context on a GPU the thread never used (the
    native core's own guard would then have nothing to switch)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()
