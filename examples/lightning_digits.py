"""EASGD from PyTorch Lightning: the digits CNN on 2 CPU processes, an 8-bit wire, validation on
the center, a checkpoint that resumes every rank.

    python examples/lightning_digits.py            # needs: pip install 'easgd_ext[lightning]'
"""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from easgd_ext import data
from easgd_ext.integrations.lightning import EASGDStrategy


class Digits(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = data.DigitsCNN()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("center_error", (self.net(x).argmax(1) != y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, nesterov=True)  # EAMSGD


if __name__ == "__main__":
    split = data.digits(0)
    train = DataLoader(TensorDataset(split.train_x, split.train_y), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(split.test_x, split.test_y), batch_size=360)
    trainer = pl.Trainer(accelerator="cpu", devices=2, max_epochs=8, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         strategy=EASGDStrategy("easgd", tau=4, comm_dtype=torch.int8),
                         default_root_dir="lightning_digits")
    trainer.fit(Digits(), train, val)
    if trainer.is_global_zero:
        averager = trainer.strategy.averager
        print(f"center test error {trainer.callback_metrics['center_error']:.2%} after "
              f"{averager.stats.exchanges} exchanges of {averager.stats.bytes_sent / 1e6:.1f} MB; "
              f"checkpoint: {trainer.checkpoint_callback.best_model_path}")
