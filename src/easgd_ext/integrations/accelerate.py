"""Hugging Face accelerate: EASGD, DiLoCo, DOWNPOUR or local SGD in an accelerate loop, where
accelerate's own ``LocalSGD`` (plain averaging, float32, DDP only) is the peer.

    from accelerate import Accelerator
    from easgd_ext.integrations.accelerate import ElasticLocalSGD

    accelerator = Accelerator()
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    with ElasticLocalSGD(accelerator, model, tau=8, comm_dtype=torch.int8) as easgd:
        for batch in loader:
            loss = model(batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            easgd.step()                 # exchanges every tau steps
    model_to_save = easgd.center_model()  # or: with easgd.center_parameters(): evaluate(...)

Inside the block the model's gradients are not all-reduced (``model.no_sync()``, as accelerate's
``LocalSGD`` does); the averager links the replicas instead, with any of its options
(``comm_dtype=torch.int4``, ``fragments``/``delay``, ``on_failure``, ...). DTensor (FSDP2)
parameters go to the averager as they are, with ``process_group=`` the replicate dimension of
the mesh, as :class:`~easgd_ext.ElasticAverager` takes them (accelerate's ``LocalSGD`` refuses
FSDP); that path through accelerate's own FSDP plugin is not tested yet.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch

from ..methods import integration_averager


class ElasticLocalSGD:
    """A context manager for an accelerate training loop; :meth:`step` after each optimizer step.

    Args:
        accelerator: the ``accelerate.Accelerator`` of the loop.
        model: the model as ``accelerator.prepare`` returned it (DDP-wrapped or not).
        tau: local steps between exchanges.
        method: ``"easgd"`` (default), ``"diloco"``, ``"downpour"`` or ``"local_sgd"``.
        enabled: ``False`` runs the loop as if the helper were not there.
        averager_options: the averager's other arguments (``comm_dtype``, ``fragments``,
            ``delay``, ``beta``, ``process_group`` for FSDP2-sharded models, ...).
    """

    def __init__(self, accelerator: Any, model: torch.nn.Module, tau: int = 8,
                 method: str = "easgd", enabled: bool = True, **averager_options: Any) -> None:
        averager_class = integration_averager(method)
        kind = str(getattr(accelerator, "distributed_type", ""))
        if "DEEPSPEED" in kind or "MEGATRON" in kind:
            raise NotImplementedError(f"ElasticLocalSGD works with plain data parallel and FSDP2 "
                                      f"models; accelerate runs {kind} here (its ZeRO/tensor "
                                      "parallelism owns the parameters)")
        self.accelerator, self.model, self.enabled = accelerator, model, enabled
        self.module = accelerator.unwrap_model(model)
        self.averager: Any = None
        self._no_sync: Any = None
        if enabled:
            self.averager = averager_class(self.module.parameters(), tau=tau, **averager_options)

    def __enter__(self) -> "ElasticLocalSGD":
        if self.enabled and hasattr(self.model, "no_sync"):  # DDP: no gradient all-reduce
            self._no_sync = self.model.no_sync()
            self._no_sync.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.averager is not None:
            self.averager.flush()  # what a delayed exchange left in flight lands in the center
        if self._no_sync is not None:
            no_sync, self._no_sync = self._no_sync, None
            no_sync.__exit__(*exc)

    def step(self) -> bool:
        """After each ``optimizer.step()``: the averager's clock (it exchanges every ``tau``).
        Returns whether this step exchanged."""
        return self.averager.step() if self.averager is not None else False

    @contextlib.contextmanager
    def center_parameters(self) -> Iterator[None]:
        """Within the block the model holds the center (for evaluation); then its own values."""
        if self.averager is None:
            yield
            return
        with self.averager.center_parameters():
            yield

    def center_model(self) -> torch.nn.Module:
        """A copy of the unwrapped model holding the center: what to save or deploy."""
        with self.center_parameters():
            return copy.deepcopy(self.module)
