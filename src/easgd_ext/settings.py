"""The averagers' settings: every default, and every check of a constructor argument, once.

Each check returns the normalized value or raises ``TypeError``/``ValueError`` naming the
argument and what was wrong (construction gathers the errors of every rank, so a mistake on one
rank is the same error on all of them).
"""

from __future__ import annotations

import math
import numbers
import os
from datetime import timedelta

import torch

DEFAULT_TAU = 10
DEFAULT_BETA = 0.9                 # the paper's choice of p * alpha
DEFAULT_BUCKET_CAP_MB = 25.0       # sync mode: all-reduce bucket size (DDP's default)
DEFAULT_LOCK_TIMEOUT = 300.0       # async mode: seconds to wait for a chunk lock
DEFAULT_EXCHANGE_TIMEOUT = 300.0   # sync mode on CPU tensors: seconds to wait for the peers
DEFAULT_ON_NONFINITE = "reset"     # a diverged worker restarts from the center

# The exchange's steps: "fused" (the native kernels; the default) or "torch" (every rule's
# torch-level path: slower; for trying a rule before its kernel exists, and for tests).
KERNELS_ENV = "EASGD_EXT_KERNELS"
KERNEL_PATHS = ("fused", "torch")

MODES = ("sync", "async")
ON_NONFINITE = ("reset", "skip", "raise")
# What a synchronous exchange that failed because ranks died, froze or left does: raise
# ExchangeError on every survivor (the job restarts from a checkpoint), or go on without them.
ON_FAILURE = ("raise", "continue")
DEFAULT_ON_FAILURE = "raise"
FAILURE_POLL_SECONDS = 0.25  # on_failure="continue": how often a waiting rank asks the store
FAILURE_SETTLE_SECONDS = 2.0  # ... and how long the survivors wait for one more to report
# The kernels' policy codes (native OnNonFinite): "raise" skips on the device like "skip".
POLICY_CODES = {"skip": 0, "raise": 0, "reset": 1}
COMM_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
               "int8": torch.int8, "int4": torch.int4, "int2": torch.int2}
# The quantized wires: bits a value on the wire (block-scaled, with error feedback).
QUANT_BITS = {torch.int8: 8, torch.int4: 4, torch.int2: 2}
QUANT_NAMES = tuple(name for name, dtype in COMM_DTYPES.items() if dtype in QUANT_BITS)  # int8, int4, int2


# Gloo's quantized wire moves each piece in collectives of at most this many bytes per peer.
# One large message each way fills a slow link's queue, the ACKs of the other direction wait
# behind it, and the all-to-all + all-gather reach ~50-60% of the link; in 64 KiB pieces
# (ProcessGroupGloo runs two at a time) they reach 90-95% at 100 Mbit/s (bench link). Each
# collective costs the host ~0.2-0.4 ms of CPU, though: at 1 Gbit/s 64 KiB pieces leave the
# pattern CPU-bound at ~60% of the link, 256 KiB-1 MiB pieces reach 87-96%. So the size is the
# user's to set for a fast link (EASGD_EXT_GLOO_CHUNK_BYTES, the same on every rank: the ranks
# check). NCCL pipelines its own chunks: there a piece goes whole.
GLOO_WIRE_CHUNK_BYTES = 64 * 1024
GLOO_CHUNK_ENV = "EASGD_EXT_GLOO_CHUNK_BYTES"
QUANT_BLOCK = 256  # elements sharing one scale on the quantized wire (csrc/quantize.h)


def quant_bits(comm_dtype: torch.dtype | None) -> int | None:
    """Bits a value of a quantized wire (8, 4 or 2), or None for a float wire."""
    return QUANT_BITS.get(comm_dtype) if comm_dtype is not None else None


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
                     f"torch.bfloat16, torch.float16, or torch.int8, torch.int4 or torch.int2 "
                     f"(block-scaled, with error feedback), got {comm_dtype!r}")


def check_outer(outer_lr: object, outer_momentum: object, nesterov: object) -> tuple[float, float, bool] | None:
    """An outer optimizer's settings, or ``None`` for the defaults (plain EASGD: no outer
    optimizer at all, the same kernels as before)."""
    for name, value in (("outer_lr", outer_lr), ("outer_momentum", outer_momentum)):
        if not _is_number(value):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not isinstance(nesterov, bool):
        raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__}")
    lr, mu = float(outer_lr), float(outer_momentum)  # type: ignore[arg-type]
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"outer_lr must be positive and finite, got {outer_lr}")
    if not 0 <= mu < 1:
        raise ValueError(f"outer_momentum must be in [0, 1), got {outer_momentum}")
    return None if (lr, mu, nesterov) == (1.0, 0.0, False) else (lr, mu, nesterov)


def check_update_alpha(value: object) -> float:
    """DiLoCo's ``fragment_update_alpha``: the worker's own weight when it takes the new center."""
    if not _is_number(value):
        raise TypeError(f"fragment_update_alpha must be a real number, got {type(value).__name__}")
    if not 0 <= float(value) <= 1:  # type: ignore[arg-type]
        raise ValueError(f"fragment_update_alpha must be in [0, 1] (the worker's weight against the "
                         f"new center), got {value}")
    return float(value)  # type: ignore[arg-type]


def check_fragments(fragments: object) -> int:
    if isinstance(fragments, bool) or not isinstance(fragments, int):
        raise TypeError(f"fragments must be an int (parts of the model exchanged in turn), got "
                        f"{type(fragments).__name__}")
    if fragments < 1:
        raise ValueError(f"fragments must be >= 1, got {fragments}")
    return fragments


def check_delay(delay: object, tau: int) -> int:
    if isinstance(delay, bool) or not isinstance(delay, int):
        raise TypeError(f"delay must be an int (steps between a fragment's send and its apply), "
                        f"got {type(delay).__name__}")
    if not 0 <= delay < tau:
        raise ValueError(f"delay must be in [0, tau) = [0, {tau}): a fragment is exchanged again "
                         f"tau steps later, so its sum must have landed by then; got {delay}")
    return delay


def _positive_seconds(name: str, value: object) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if not _is_number(value):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):  # type: ignore[operator]
        raise ValueError(f"{name} must be positive and finite (seconds), got {value}")
    return float(value)  # type: ignore[arg-type]


def check_bucket_cap_mb(bucket_cap_mb: object) -> float:
    """``None``: the default (as every check of a setting with a default takes it)."""
    if bucket_cap_mb is None:
        return DEFAULT_BUCKET_CAP_MB
    if not _is_number(bucket_cap_mb):
        raise TypeError(f"bucket_cap_mb must be a number, got {type(bucket_cap_mb).__name__}")
    if not 0 < bucket_cap_mb < float("inf"):  # type: ignore[operator]
        raise ValueError(f"bucket_cap_mb must be positive and finite, got {bucket_cap_mb}")
    return float(bucket_cap_mb)  # type: ignore[arg-type]


def check_lock_timeout(value: object) -> float:
    return DEFAULT_LOCK_TIMEOUT if value is None else _positive_seconds("lock_timeout", value)


def check_exchange_timeout(value: object) -> float:
    return DEFAULT_EXCHANGE_TIMEOUT if value is None else _positive_seconds("exchange_timeout", value)


def kernel_path() -> str:
    """The exchange's steps as ``EASGD_EXT_KERNELS`` asks (default: the fused kernels)."""
    value = os.environ.get(KERNELS_ENV, "fused") or "fused"
    if value not in KERNEL_PATHS:
        raise ValueError(f"{KERNELS_ENV} must be 'fused' or 'torch', got {value!r}")
    return value


def check_gloo_chunk_bytes(value: object) -> int:
    """The quantized wire's piece per peer over Gloo: ``value`` (at least 4096 bytes), or where
    it is ``None`` what ``EASGD_EXT_GLOO_CHUNK_BYTES`` asks (default 64 KiB: the right size up to
    a few hundred Mbit/s; 1 MiB at 1 Gbit/s and above)."""
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 4096:
            raise ValueError(f"gloo_chunk_bytes must be a whole number of bytes of at least 4096 "
                             f"(e.g. 1048576 for a 1 Gbit/s link), got {value!r}")
        return value
    value = os.environ.get(GLOO_CHUNK_ENV, "") or str(GLOO_WIRE_CHUNK_BYTES)
    try:
        chunk = int(value)
    except ValueError:
        chunk = 0
    if chunk < 4096:
        raise ValueError(f"{GLOO_CHUNK_ENV} must be a whole number of bytes of at least 4096 "
                         f"(e.g. 1048576 for a 1 Gbit/s link), got {value!r}")
    return chunk


def check_on_failure(value: object) -> str:
    if value not in ON_FAILURE:
        raise ValueError(f"on_failure must be one of {', '.join(map(repr, ON_FAILURE))}, "
                         f"got {value!r}")
    return value  # type: ignore[return-value]


def check_on_nonfinite(value: object) -> str:
    if value not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {', '.join(map(repr, ON_NONFINITE))}, "
                         f"got {value!r}")
    return value  # type: ignore[return-value]


def reject_other_mode_arguments(mode: str, given: dict[str, object]) -> None:
    """``given`` holds the arguments that belong to the *other* mode: any of them set is an
    error in ``mode``, not silently ignored."""
    wrong = [name for name, value in given.items() if value is not None]
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
