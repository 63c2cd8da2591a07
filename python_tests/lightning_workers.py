"""What the Lightning tests train, importable by the processes Lightning spawns."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().float() for p in module.parameters()])


class Regression(pl.LightningModule):
    """A small MLP on a fixed random regression task; remembers the parameters it validated."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.lr = lr
        self.validated: torch.Tensor | None = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.validated = flat(self)
        x, y = batch
        self.log("val_loss", F.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, nesterov=True)


def loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(256, 1, generator=g)
    return (DataLoader(TensorDataset(x[:192], y[:192]), batch_size=8),
            DataLoader(TensorDataset(x[192:], y[192:]), batch_size=16))


class Record(pl.Callback):
    """Writes what each rank ends with: its parameters, its center, its averager's counters."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        avg = trainer.strategy.averager
        with avg.center_parameters():
            center = flat(pl_module)
        torch.save({"worker": flat(pl_module), "center": center,
                    "validated": pl_module.validated, "exchanges": avg.stats.exchanges,
                    "clock": avg.clock, "global_step": trainer.global_step, "workers": avg.workers},
                   Path(self.folder) / f"rank{trainer.global_rank}.pt")
