"""The averagers' settings: every default, and every check of a constructor argument, once.

Each check returns the normalized value or raises ``TypeError``/``ValueError`` naming the
argument and what was wrong (construction gathers the errors of every rank, so a mistake on one
rank is the same error on all of them).
"""

from __future__ import annotations

import math
import numbers
from datetime import timedelta

import torch

DEFAULT_TAU = 10
DEFAULT_BETA = 0.9                 # the paper's choice of p * alpha
DEFAULT_BUCKET_CAP_MB = 25.0       # sync mode: all-reduce bucket size (DDP's default)
DEFAULT_LOCK_TIMEOUT = 300.0       # async mode: seconds to wait for a chunk lock
DEFAULT_EXCHANGE_TIMEOUT = 300.0   # sync mode on CPU tensors: seconds to wait for the peers
DEFAULT_ON_NONFINITE = "reset"     # a diverged worker restarts from the center

MODES = ("sync", "async")
ON_NONFINITE = ("reset", "skip", "raise")
# The kernels' policy codes (native OnNonFinite): "raise" skips on the device like "skip".
POLICY_CODES = {"skip": 0, "raise": 0, "reset": 1}
COMM_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def check_tau(tau: object) -> int:
    if isinstance(tau, bool) or not isinstance(tau, int):
        raise TypeError(f"tau must be an int (local steps between exchanges), got {type(tau).__name__}")
    if tau < 1:
        raise ValueError(f"tau must be >= 1 (local steps between exchanges), got {tau}")
    return tau


def check_mode(mode: object) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be 'sync' or 'async', got {mode!r}")
    return mode  # type: ignore[return-value]


def check_comm_dtype(comm_dtype: object) -> torch.dtype | None:
    if comm_dtype is None or isinstance(comm_dtype, torch.dtype) and comm_dtype in COMM_DTYPES.values():
        return comm_dtype
    if isinstance(comm_dtype, str) and comm_dtype in COMM_DTYPES:
        return COMM_DTYPES[comm_dtype]
    raise ValueError(f"comm_dtype must be None (the parameters' dtype), torch.float32, "
                     f"torch.bfloat16 or torch.float16, got {comm_dtype!r}")


def _positive_seconds(name: str, value: object) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if not _is_number(value):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):  # type: ignore[operator]
        raise ValueError(f"{name} must be positive and finite (seconds), got {value}")
    return float(value)  # type: ignore[arg-type]


def check_bucket_cap_mb(bucket_cap_mb: object) -> float:
    if not _is_number(bucket_cap_mb):
        raise TypeError(f"bucket_cap_mb must be a number, got {type(bucket_cap_mb).__name__}")
    if not 0 < bucket_cap_mb < float("inf"):  # type: ignore[operator]
        raise ValueError(f"bucket_cap_mb must be positive and finite, got {bucket_cap_mb}")
    return float(bucket_cap_mb)  # type: ignore[arg-type]


def check_lock_timeout(value: object) -> float:
    return _positive_seconds("lock_timeout", value)


def check_exchange_timeout(value: object) -> float:
    return _positive_seconds("exchange_timeout", value)


def check_on_nonfinite(value: object) -> str:
    if value not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {', '.join(map(repr, ON_NONFINITE))}, "
                         f"got {value!r}")
    return value  # type: ignore[return-value]


def check_only_for(mode: str, given: dict[str, object], allowed: set[str]) -> None:
    """Arguments that do not apply to ``mode`` are errors, not silently ignored."""
    wrong = [name for name, value in given.items() if value is not None and name not in allowed]
    if wrong:
        other = "async" if mode == "sync" else "sync"
        raise ValueError(f"{', '.join(wrong)} {'applies' if len(wrong) == 1 else 'apply'} to "
                         f"mode={other!r}, not mode={mode!r}; leave "
                         f"{'it' if len(wrong) == 1 else 'them'} out")


def elastic_rates(workers: int, beta: object, alpha: object,
                  allow_unstable: object) -> tuple[float, float]:
    """``(alpha, beta)`` with ``beta = p * alpha`` for ``p = workers``: either may be given
    (beta defaults to the paper's 0.9). Checks the stability condition of synchronous EASGD,
    ``0 < beta < 1``, unless ``allow_unstable``."""
    for name, value in (("beta", beta), ("alpha", alpha)):
        if value is not None and not _is_number(value):
            raise TypeError(f"{name} must be a real number or None, got {type(value).__name__}")
    if not isinstance(allow_unstable, bool):
        raise TypeError(f"allow_unstable must be a bool, got {type(allow_unstable).__name__}")
    if alpha is None:
        beta = DEFAULT_BETA if beta is None else float(beta)  # type: ignore[arg-type]
        alpha = beta / workers
    elif beta is None:
        alpha = float(alpha)  # type: ignore[arg-type]
        beta = alpha * workers
    elif not math.isclose(float(alpha) * workers, float(beta), rel_tol=1e-9):  # type: ignore[arg-type]
        raise ValueError(f"alpha={alpha} and beta={beta} disagree: beta must equal p * alpha "
                         f"with p={workers} workers; give only one of them")
    alpha, beta = float(alpha), float(beta)  # type: ignore[arg-type]
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha (the moving rate) must be positive and finite, got {alpha}")
    if not allow_unstable and not beta < 1:
        raise ValueError(
            f"beta = p * alpha = {workers} * {alpha:g} = {beta:g} breaks the stability "
            "condition of synchronous EASGD, 0 < beta < 1 (the center overshoots the average of "
            "the workers); lower alpha or beta (the paper uses beta = 0.9), or pass "
            "allow_unstable=True to run anyway")
    return alpha, beta


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")
