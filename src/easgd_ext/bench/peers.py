"""The plain-torch peers the benchmarks time our exchange against, written once."""

from __future__ import annotations

from typing import Callable

import torch

from .collectives import Works


def flat_views(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Moves ``params`` into one contiguous float32 buffer and makes each a view of its slot
    (what a plain torch implementation of a flat exchange does); returns the buffer."""
    x = torch.empty(sum(p.numel() for p in params), device=params[0].device)
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            x[offset:offset + n].copy_(p.detach().reshape(-1))
            p.data = x[offset:offset + n].view(p.shape)
            offset += n
    return x


def torch_flat_easgd(x: torch.Tensor, alpha: float, works: Works,
                     name: str = "torch_flat") -> Callable[[], None]:
    """One synchronous EASGD exchange in plain torch on the flat float32 buffer ``x`` (its
    center starts equal to it): ``d = x - c; d *= alpha; x -= d; all_reduce(d); c += d``."""
    c, d = x.clone(), torch.empty_like(x)

    def exchange() -> None:
        with torch.no_grad():
            torch.sub(x, c, out=d)
            d.mul_(alpha)
            x.sub_(d)
            works.run(name, [d])
            c.add_(d)

    return exchange
