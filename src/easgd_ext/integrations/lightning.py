"""PyTorch Lightning: EASGD, DiLoCo, DOWNPOUR or periodic averaging as a ``Trainer`` strategy.

    import lightning.pytorch as pl
    from easgd_ext.integrations.lightning import EASGDStrategy

    trainer = pl.Trainer(accelerator="cpu", devices=4, max_epochs=10,
                         strategy=EASGDStrategy(tau=8, comm_dtype=torch.int8))
    trainer.fit(MyLightningModule(), train_loader, val_loader)

Each process trains its own replica with its own optimizer (no DDP wrapper: nothing is
all-reduced at the backward); after every optimizer step the strategy calls the averager's
``step()``, which exchanges every ``tau`` steps. Importing this module also registers the
names ``"easgd"``, ``"diloco"``, ``"downpour"`` and ``"local_sgd"`` (``Trainer(strategy="easgd")``
with the defaults).

What the user sees:

- **validation** runs on the center (the model's parameters hold it inside the validation loop;
  each worker's own values come back after it);
- **checkpoints** through Lightning's own saving (``ModelCheckpoint``, ``trainer.save_checkpoint``)
  hold the center as the checkpoint's ``state_dict`` (what ``load_from_checkpoint`` and
  inference read), and every rank's replica, optimizer and averager state under
  ``"easgd_ext"``; ``trainer.fit(..., ckpt_path=...)`` on the same number of processes resumes
  each rank from its own, exactly (a checkpoint is then about ``world`` models in size).
"""

from __future__ import annotations

import builtins
from datetime import timedelta
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
    from lightning.pytorch.trainer.states import TrainerFn
except ImportError as exc:  # an optional extra: say how to get it
    raise ImportError("easgd_ext.integrations.lightning needs PyTorch Lightning: "
                      "pip install 'easgd_ext[lightning]' (lightning>=2.4)") from exc

from .. import _dist
from ..methods import INTEGRATION_METHODS, integration_averager
STATE_KEY = "easgd_ext"


def _on_cpu(value: Any) -> Any:
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


class EASGDStrategy(DDPStrategy):
    """A Lightning strategy that trains one replica per process and links them with an
    easgd_ext averager.

    Args:
        method: ``"easgd"`` (:class:`~easgd_ext.ElasticAverager`, EAMSGD with a Nesterov
            optimizer), ``"diloco"``, ``"downpour"`` or ``"local_sgd"`` (periodic averaging).
        tau: local steps between exchanges.
        averager_options: the averager's other arguments (``comm_dtype``, ``fragments``,
            ``delay``, ``beta``, ``outer_lr``, ``on_failure``, ...), as its class takes them.
        process_group_backend, timeout, start_method, accelerator, parallel_devices,
        cluster_environment, checkpoint_io, precision_plugin: as ``DDPStrategy`` takes them
            (``start_method="spawn"`` where the script cannot be re-run, e.g. a notebook).
    """

    strategy_name = "easgd"

    def __init__(self, method: str = "easgd", tau: int = 8, *, accelerator: Any = None,
                 parallel_devices: list[torch.device] | None = None, cluster_environment: Any = None,
                 checkpoint_io: Any = None, precision_plugin: Any = None,
                 process_group_backend: str | None = None, timeout: timedelta | None = None,
                 start_method: str = "popen", **averager_options: Any) -> None:
        integration_averager(method)  # checked now, built in configure_ddp
        for name in ("params", "process_group"):
            if name in averager_options:
                raise TypeError(f"EASGDStrategy sets the averager's {name} itself; leave {name} out")
        kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin,
                         process_group_backend=process_group_backend, start_method=start_method,
                         **kwargs)
        self.method, self.tau, self.averager_options = method, tau, averager_options
        self.averager: Any = None
        self._center_view: Any = None

    # ---- set-up: a replica per process, no DDP wrapper ------------------------------------------
    def configure_ddp(self) -> None:
        """Instead of wrapping the model in DDP: builds the averager over its parameters (which
        starts every replica from rank 0's values)."""
        assert isinstance(self.model, pl.LightningModule)
        self.averager = integration_averager(self.method)(self.model.parameters(), tau=self.tau,
                                                          **self.averager_options)

    def setup(self, trainer: "pl.Trainer") -> None:
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING and len(self.optimizers) != 1:
            raise ValueError(f"EASGDStrategy steps its averager once per optimizer step and needs "
                             f"exactly one optimizer; configure_optimizers returned "
                             f"{len(self.optimizers)} (put their parameter groups in one optimizer)")

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # each rank's replica and the averager's state load once the averager exists

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None,
                       **kwargs: Any) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.averager is not None:
            self.averager.step()
        return out

    # ---- validation on the center -------------------------------------------------------------------
    def on_validation_start(self) -> None:
        super().on_validation_start()
        if self.averager is not None and self._center_view is None:
            self._enter_center()

    def on_validation_end(self) -> None:
        self._leave_center()
        super().on_validation_end()

    def _enter_center(self) -> None:
        self._center_view = self.averager.center_parameters()
        self._center_view.__enter__()

    def _leave_center(self) -> None:
        if self._center_view is not None:
            view, self._center_view = self._center_view, None
            view.__exit__(None, None, None)

    def on_train_end(self) -> None:
        if self.averager is not None:
            self.averager.flush()  # what a delayed exchange left in flight is in the final center
        super().on_train_end()

    # ---- checkpoints ----------------------------------------------------------------------------------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The center (in the parameters' dtype) and rank 0's buffers: what inference loads."""
        assert self.lightning_module is not None
        if self.averager is None or self._center_view is not None:
            return super().lightning_module_state_dict()
        with self.averager.center_parameters():
            return {k: v.detach().clone() for k, v in self.lightning_module.state_dict().items()}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any,
                        storage_options: Any = None) -> None:
        if self.averager is not None:
            # Collective: Lightning saves on every rank (rank 0 writes); each rank's own state,
            # its own parameters too (ModelCheckpoint may save inside validation, on the center).
            viewing = self._center_view is not None
            if viewing:
                self._leave_center()
            mine = {"model": {k: v.detach().cpu().clone()
                              for k, v in self.lightning_module.state_dict().items()},
                    # on the CPU: rank 0 unpickles every rank's state, a GPU's would land on its own
                    "optimizers": [tree_map(_on_cpu, opt.state_dict()) for opt in self.optimizers],
                    "averager": self.averager.state_dict()}
            if viewing:
                self._enter_center()
            # _dist's gather leaves no temporaries to Gloo's threads (an abort at exit otherwise)
            ranks = _dist.all_gather_objects(_dist.resolve(), mine) if dist.is_initialized() else [mine]
            checkpoint[STATE_KEY] = {"method": self.method, "ranks": ranks}
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def _own_state(self, checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
        saved = checkpoint.get(STATE_KEY)
        if saved is None or self.averager is None:
            return None
        if saved["method"] != self.method or len(saved["ranks"]) != self.world_size:
            raise ValueError(f"this checkpoint holds {len(saved['ranks'])} replicas of method "
                             f"{saved['method']!r}; resume it with EASGDStrategy(method="
                             f"{saved['method']!r}) on {len(saved['ranks'])} processes (or load its "
                             "state_dict, the center, into a fresh run)")
        return saved["ranks"][self.global_rank]

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        own = self._own_state(checkpoint)
        if own is None:
            return super().load_model_state_dict(checkpoint, strict)
        self.lightning_module.load_state_dict(own["model"], strict=strict)
        self.averager.load_state_dict(own["averager"])

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        own = self._own_state(checkpoint)
        if own is None:
            return super().load_optimizer_state_dict(checkpoint)
        super().load_optimizer_state_dict({"optimizer_states": own["optimizers"]})

    def teardown(self) -> None:
        self._leave_center()
        super().teardown()

    # Lightning's own object collectives (checkpoint paths, stop decisions) go through _dist's,
    # which leave no temporaries to Gloo's threads: DDPStrategy's broadcast_object_list and the
    # all-reduce of a fresh tensor can abort the process at exit (seen once in CI, SIGABRT).
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not dist.is_initialized() or src != 0:
            return super().broadcast(obj, src)
        return _dist.broadcast_object(_dist.resolve(), obj)

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:  # noqa: A002 -- Lightning's name
        if not dist.is_initialized():
            return decision
        votes = [bool(v) for v in _dist.all_gather_objects(_dist.resolve(), bool(decision))]
        return builtins.all(votes) if all else builtins.any(votes)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name in INTEGRATION_METHODS:
            strategy_registry.register(name, cls, description=f"easgd_ext: {name} with its defaults",
                                       method=name, override=True)


EASGDStrategy.register_strategies(StrategyRegistry)
