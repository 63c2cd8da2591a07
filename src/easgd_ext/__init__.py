"""easgd_ext: Elastic Averaging SGD (Zhang, Choromanska and LeCun, 2015) for PyTorch.

:class:`ElasticAverager` is the object a training loop calls once per step (EASGD, and EAMSGD
with a Nesterov-momentum optimizer); :class:`DownpourAverager` and :class:`PeriodicAverager`
are the baselines behind the same interface. Where the center lives is the averagers'
``center=`` argument: :class:`Replicated` (synchronous, the default), :class:`SharedMemory`
(asynchronous, one machine) or :class:`Servers` (asynchronous, sharded over server ranks). The native core (`easgd_ext._C`) fuses each
update into one pass over flat parameter buffers on the CPU and, where built with CUDA, the
GPU; `easgd_ext.ops` is its validated torch-facing API.
"""

from __future__ import annotations

from typing import Any

from . import ops
from ._dist import init_process_group
from ._native import native
from .averager import DiLoCoAverager, DownpourAverager, ElasticAverager, PeriodicAverager
from .centers import CenterSpec, ExchangeError, Replicated, Servers, SharedMemory
from .shared_center import SharedCenter, StaleSegmentError
from .stats import ExchangeStats, NonFiniteError

__version__ = "0.1.0"
__all__ = ["ElasticAverager", "DownpourAverager", "PeriodicAverager", "DiLoCoAverager",
           "Replicated", "SharedMemory", "Servers", "CenterSpec", "SharedCenter",
           "StaleSegmentError", "ExchangeStats", "NonFiniteError", "ExchangeError",
           "build_info", "init_process_group", "ops", "__version__"]


def build_info() -> dict[str, Any]:
    """What this installation's native core was built with.

    Keys: ``cuda`` (bool: CUDA kernels compiled in), ``cuda_archs`` (CMake architecture list,
    e.g. ``["80-real", "90-real", "90-virtual"]``), ``cuda_compiler``, ``cxx_compiler``,
    ``openmp`` (bool), ``openmp_version``, ``build_type``, and ``cuda_devices``: GPUs the core
    can see now (0 on a host without a driver or GPU, which is fine for a CUDA build).
    """
    info = dict(native.build_info())
    info["cuda_devices"] = native.cuda_device_count()
    return info
