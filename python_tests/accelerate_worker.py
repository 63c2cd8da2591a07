"""One rank of the accelerate test, under torchrun: EASGD in an accelerate loop; writes what it
ends with to OUT/rank<r>.pt. Usage: torchrun --nproc-per-node 2 accelerate_worker.py OUT METHOD WIRE"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from easgd_ext.integrations.accelerate import ElasticLocalSGD


def flat(module):
    return torch.cat([p.detach().flatten().float() for p in module.parameters()])


def main(out: str, method: str, wire: str) -> None:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(accelerator.process_index)  # different initial weights: the helper aligns them
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    options = {} if wire == "float32" else {"comm_dtype": getattr(torch, wire)}
    steps = 0
    with ElasticLocalSGD(accelerator, model, tau=4, method=method, **options) as easgd:
        first_grad = None
        for xb, yb in loader:
            accelerator.backward(F.mse_loss(model(xb), yb))
            if first_grad is None:  # no DDP all-reduce inside the block: the rank's own gradient
                first_grad = torch.cat([p.grad.flatten() for p in model.parameters()])
            optimizer.step()
            optimizer.zero_grad()
            easgd.step()
            steps += 1
    center = flat(easgd.center_model())
    torch.save({"steps": steps, "exchanges": easgd.averager.stats.exchanges, "center": center,
                "worker": flat(accelerator.unwrap_model(model)), "grad": first_grad,
                "world": accelerator.num_processes},
               Path(out) / f"rank{accelerator.process_index}.pt")
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
