"""Datasets and models for the training CLI: scikit-learn's bundled handwritten digits (no
download) with a small CNN, or a local CIFAR-10 copy with torchvision's ResNet-18."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class Split:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def digits(seed: int = 0) -> Split:
    """1797 8x8 grey images of digits 0-9 shipped inside scikit-learn; 80/20 stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(range(len(labels)), test_size=0.2, random_state=seed,
                                           stratify=data.target)
    return Split(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx])


# Whole sentences: callers put their own sentence (what is missing) in front.
CIFAR_HELP = ("Download cifar-10-python.tar.gz (the Python version of CIFAR-10) from "
              "https://www.cs.toronto.edu/~kriz/cifar.html and extract it into {root}; that "
              "makes {root}/cifar-10-batches-py with data_batch_1..5 and test_batch.")


CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def cifar_missing(root: Path) -> list[str]:
    """The files of cifar-10-batches-py that ``root`` lacks (empty where none is missing)."""
    folder = root / "cifar-10-batches-py"
    return [name for name in CIFAR_FILES if not (folder / name).is_file()]


def cifar10(root: Path) -> Split:
    """CIFAR-10 from a local copy (never downloaded here), normalized per channel."""
    import torchvision

    if not (root / "cifar-10-batches-py").is_dir():
        raise FileNotFoundError(f"{root} has no cifar-10-batches-py folder. "
                                + CIFAR_HELP.format(root=root))
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)

    def load(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            ds = torchvision.datasets.CIFAR10(str(root), train=train, download=False)
        except Exception as exc:  # noqa: BLE001 -- torchvision says "use download=True"
            raise RuntimeError(f"{root}/cifar-10-batches-py could not be read ({type(exc).__name__}: "
                               f"{exc}); it is incomplete or corrupt. " + CIFAR_HELP.format(root=root)) from None
        x = torch.tensor(ds.data).permute(0, 3, 1, 2).float() / 255.0
        return (x - mean) / std, torch.tensor(ds.targets)

    (tx, ty), (vx, vy) = load(True), load(False)
    return Split(tx, ty, vx, vy)


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits (about 40k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
                                        nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def make_model(dataset: str) -> nn.Module:
    if dataset == "digits":
        return DigitsCNN()
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


class Stream:
    """An endless stream of minibatches, reshuffled every epoch with this worker's own seed."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> None:
        self.x, self.y, self.batch = x, y, batch
        self.gen = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(y), generator=self.gen)
        self.pos = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.batch > len(self.order):
            self.order = torch.randperm(len(self.y), generator=self.gen)
            self.pos = 0
        idx = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return self.x[idx], self.y[idx]


@torch.no_grad()
def test_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    wrong = 0
    for i in range(0, len(y), batch):
        logits = model(x[i:i + batch].to(device))
        wrong += int((logits.argmax(1).cpu() != y[i:i + batch]).sum())
    model.train(was_training)
    return wrong / len(y)
