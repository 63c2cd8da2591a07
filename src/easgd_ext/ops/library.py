"""The kernels as PyTorch custom ops (``torch.ops.easgd_ext.*``), so ``torch.compile`` (also
with ``fullgraph=True``) traces loops that call them, and ``torch.library.opcheck`` can check
them. Each op mutates the buffers its kernel writes and returns nothing; its fake (meta)
implementation does nothing, as shapes never change. The real implementation is the eager
function of :mod:`easgd_ext.ops`, which calls the native core directly (the op is only used
while compiling: the dispatcher would add tens of microseconds to every eager call).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

NAMESPACE = "easgd_ext"
_registered = False


def register(ops: Any) -> None:
    """Defines the ops once per process over the eager functions of ``ops`` (the module
    easgd_ext.ops, which calls this when it is imported)."""
    global _registered
    if _registered:
        return
    _registered = True

    def define(name: str, mutates: tuple[str, ...], impl):
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=mutates)(impl)
        op.register_fake(lambda *args: None)
        return op

    def elastic_difference(x: Tensor, center: Tensor, wire: Tensor, alpha: float) -> None:
        ops.elastic_difference(x, center, wire, alpha)

    def sync_apply(x: Tensor, center: Tensor, reduced: Tensor, alpha: float) -> None:
        ops.sync_apply(x, center, reduced, alpha)

    def async_exchange(x: Tensor, center: Tensor, alpha: float) -> None:
        ops.async_exchange(x, center, alpha)

    def downpour_push(x: Tensor, x_last: Tensor, wire: Tensor) -> None:
        ops.downpour_push(x, x_last, wire)

    def downpour_pull(center: Tensor, reduced: Tensor, x: Tensor, x_last: Tensor) -> None:
        ops.downpour_pull(center, reduced, x, x_last)

    def downpour_async_exchange(x: Tensor, x_last: Tensor, center: Tensor) -> None:
        ops.downpour_async_exchange(x, x_last, center)

    def average_apply(x: Tensor, reduced: Tensor, scale: float) -> None:
        ops.average_apply(x, reduced, scale)

    define("elastic_difference", ("wire",), elastic_difference)
    define("sync_apply", ("x", "center"), sync_apply)
    define("async_exchange", ("x", "center"), async_exchange)
    define("downpour_push", ("wire",), downpour_push)
    define("downpour_pull", ("center", "x", "x_last"), downpour_pull)
    define("downpour_async_exchange", ("x", "x_last", "center"), downpour_async_exchange)
    define("average_apply", ("x",), average_apply)
