"""Loads the compiled core with an error that says how to fix a missing or broken build."""

from __future__ import annotations

try:
    from . import _C as native
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "easgd_ext's native module easgd_ext._C could not be loaded "
        f"({exc}). Build it with `pip install --no-build-isolation .` in the source tree "
        "(needs a C++17 compiler, CMake >= 3.24 and pybind11)."
    ) from exc

__all__ = ["native"]
