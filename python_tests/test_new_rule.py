"""A new element-wise synchronous rule, written outside the package (what the README's "a new
rule" paragraph promises): a ``SyncRule`` with a torch-level apply and an ``Algorithm`` naming
it trains over real processes, on the float wires and on the quantized ones with no more code,
and does what its formula says (checked against float64)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dist_harness import run_ranks, values
from easgd_ext.algorithms import Algorithm, ElasticDifferenceSend
from easgd_ext.averager import Averager

ALPHA, TAU, STEPS = 0.3, 2, 6


class CenterRateSync(ElasticDifferenceSend):
    """EASGD's send (``d = alpha (x - c)``, the fused kernel), and an apply of its own: the
    workers move by ``d``, the center by ``rho * sum_i d_i`` (EASGD is ``rho = 1``)."""

    def __init__(self, alpha: float, rho: float) -> None:
        super().__init__(alpha)
        self.rho = rho

    def apply_torch(self, piece, reduced, verdict, keep=None):
        x, c = piece.x, piece.buffer("center")
        s = reduced.float()
        kept = ~torch.isfinite(s)  # an overflowed sum leaves that element alone
        c_new = torch.where(kept, c, c + self.rho * s)
        d = (keep if keep is not None else self._difference(piece, reduced.dtype)).float()
        x_new = torch.where(verdict.resets(), c_new, torch.where(kept, x.float(), x.float() - d)).to(x.dtype)
        verdict.record(kept.any())
        applies = verdict.applies()
        x.copy_(torch.where(applies, x_new, x))
        c.copy_(torch.where(applies, c_new, c))


class CenterRate(Algorithm):
    name = "center-rate"

    def __init__(self, alpha: float, rho: float) -> None:
        self.alpha, self.rho = alpha, rho
        self.sync = CenterRateSync(alpha, rho)

    def settings(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "rho": self.rho}


class CenterRateAverager(Averager):
    def __init__(self, params, tau: int, alpha: float, rho: float, **center: Any) -> None:
        super().__init__(params, lambda workers: CenterRate(alpha, rho), tau=tau,
                         process_group=None, on_nonfinite="reset", **center)


def flat(m: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()]).clone()


def _train(rank: int, world: int, rho: float, comm_dtype: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(10, 30), torch.nn.Tanh(), torch.nn.Linear(30, 2))
    opt = torch.optim.SGD(m.parameters(), lr=0.2)
    avg = CenterRateAverager(m.parameters(), tau=TAU, alpha=ALPHA, rho=rho, comm_dtype=comm_dtype)
    gen = torch.Generator().manual_seed(10 + rank)
    exchanges = []
    for step in range(1, STEPS + 1):
        m(torch.randn(8, 10, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if step % TAU == 0:
            with avg.center_parameters():
                c_before = flat(m)
            x_before = flat(m)
        avg.step()
        if step % TAU == 0:
            with avg.center_parameters():
                c_after = flat(m)
            exchanges.append((x_before, c_before, flat(m), c_after))
    settings = avg.state_dict()["settings"]
    avg.close()
    return {"exchanges": exchanges, "settings": settings}


@pytest.mark.parametrize("rho", [1.0, 0.5])
def test_a_rule_of_our_own_does_what_its_formula_says(rho):
    ranks = values(run_ranks(2, _train, rho, None))
    assert ranks[0]["settings"]["rho"] == rho
    for k in range(STEPS // TAU):
        xs = [r["exchanges"][k][0].double() for r in ranks]
        c = ranks[0]["exchanges"][k][1].double()
        d = [(ALPHA * (x.float() - c.float())).double() for x in xs]  # the send, in float32
        c_expected = c + rho * (d[0] + d[1])
        for r, x, d_i in zip(ranks, xs, d):
            _, c_before, x_after, c_after = r["exchanges"][k]
            assert torch.equal(c_before, ranks[0]["exchanges"][k][1])  # replicas agree
            torch.testing.assert_close(c_after.double(), c_expected, rtol=0, atol=2e-7)
            torch.testing.assert_close(x_after.double(), x - d_i, rtol=0, atol=2e-7)
            assert not torch.equal(x_after, r["exchanges"][k][0])  # it moved


def test_a_rule_of_our_own_rides_the_quantized_wire():
    ranks = values(run_ranks(2, _train, 0.5, "int8"))
    for k in range(STEPS // TAU):
        centers = [r["exchanges"][k][3] for r in ranks]
        assert torch.equal(centers[0], centers[1])  # every rank applied the same bytes
        x0, c0 = ranks[0]["exchanges"][k][0], ranks[0]["exchanges"][k][1]
        d_sum = sum(ALPHA * (r["exchanges"][k][0] - c0) for r in ranks)
        moved = centers[0] - c0
        # 8 bits a value with error feedback: the center moves by half the sum, within the
        # block scale's rounding (and what earlier exchanges fed back)
        assert torch.allclose(moved, 0.5 * d_sum, atol=0.02 * float(d_sum.abs().max()) + 1e-6), \
            float((moved - 0.5 * d_sum).abs().max())
        assert x0.shape == moved.shape
