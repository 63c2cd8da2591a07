"""The averagers' ``center=`` argument: the center specs (Replicated, SharedMemory, Servers) are
what the keyword shorthand builds, errors name what was wrong, and a center written outside the
package (here: one that logs its exchanges) plugs in with no change to easgd_ext."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import torch

import easgd_ext
from dist_harness import run_ranks, values
from easgd_ext import (DiLoCoAverager, DownpourAverager, ElasticAverager, PeriodicAverager,
                       Replicated, Servers, SharedMemory)
from easgd_ext.centers import Center, CenterSpec, ExchangeSettings


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3))


def train(make_averager, rank: int, steps: int = 7) -> tuple[list[torch.Tensor], dict[str, Any], Any]:
    """``steps`` SGD steps on rank-specific data through the averager ``make_averager(params)``
    builds: the parameters after them, the saved settings and the averager."""
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    avg = make_averager(m.parameters())
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        x = torch.randn(16, 12, generator=gen)
        m(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        avg.step()
    avg.flush()
    out = [p.detach().clone() for p in m.parameters()]
    settings = avg.state_dict()["settings"]
    avg.close()
    return out, settings, avg


# ---- a center of our own, written against the contract only ---------------------------------------
class LoggingCenter(Center):
    """Another center's exchanges, each logged (clock and kind) before it runs."""

    def __init__(self, inner: Center) -> None:
        self.inner = inner
        self.log: list[tuple[str, int]] = []
        self.workers, self.is_server, self.tau = inner.workers, inner.is_server, inner.tau
        self.worker_id, self.shared = inner.worker_id, inner.shared

    @property
    def in_flight(self) -> int:  # type: ignore[override]
        return self.inner.in_flight

    def exchange(self, clock):
        self.log.append(("exchange", clock))
        return self.inner.exchange(clock)

    def due(self, clock):
        return self.inner.due(clock)

    def advance(self, clock):
        self.log.append(("advance", clock))
        return self.inner.advance(clock)

    def flush(self, clock):
        return self.inner.flush(clock)

    def bytes_schedule(self):
        return self.inner.bytes_schedule()

    def read(self):
        return self.inner.read()

    def write(self, values):
        self.inner.write(values)

    def save(self):
        return self.inner.save()

    def load(self, buffers):
        self.inner.load(buffers)

    def close(self):
        self.inner.close()


@dataclass(frozen=True)
class Logged(CenterSpec):
    """Any center, with a log of its exchanges."""
    inner: CenterSpec = field(default_factory=Replicated)

    @property
    def mode(self) -> str:  # type: ignore[override]
        return self.inner.mode

    # what the averager shows of the center's settings: the inner center's
    comm_dtype = property(lambda self: self.inner.comm_dtype)  # type: ignore[assignment]
    on_failure = property(lambda self: self.inner.on_failure)  # type: ignore[assignment]
    exchange_timeout = property(lambda self: self.inner.exchange_timeout)  # type: ignore[assignment]
    lock_timeout = property(lambda self: self.inner.lock_timeout)  # type: ignore[assignment]

    def checked(self, comm, params, settings: ExchangeSettings) -> "Logged":
        return replace(self, inner=self.inner.checked(comm, params, settings))

    def workers(self, comm):
        return self.inner.workers(comm)

    def settings(self):
        return self.inner.settings()

    def agreed(self):
        return self.inner.agreed()

    def check_rule(self, algorithm, averager):
        self.inner.check_rule(algorithm, averager)

    def build(self, comm, groups, params, algorithm, settings) -> LoggingCenter:
        return LoggingCenter(self.inner.build(comm, groups, params, algorithm, settings))


def _spec_and_shorthand(rank: int, world: int, name: str) -> dict[str, Any]:
    cls, shorthand, spec = CASES[name]
    by_spec, spec_settings, _ = train(lambda p: cls(p, tau=3, center=spec), rank)
    by_words, word_settings, _ = train(lambda p: cls(p, tau=3, **shorthand), rank)
    logged, logged_settings, avg = train(lambda p: cls(p, tau=3, center=Logged(spec)), rank)
    return {"same": [torch.equal(a, b) for a, b in zip(by_spec, by_words)],
            "logged_same": [torch.equal(a, b) for a, b in zip(by_spec, logged)],
            "moved": any(not torch.equal(a, b) for a, b in zip(by_spec, model().parameters())),
            "settings": (spec_settings, word_settings, logged_settings),
            "log": avg._center.log, "mode": avg.mode,
            "shown": (avg.comm_dtype, avg.on_failure, avg.lock_timeout)}


CASES = {
    "easgd int8 fragments delay": (ElasticAverager,
                                   {"comm_dtype": torch.int8, "fragments": 3, "delay": 1},
                                   Replicated(comm_dtype=torch.int8, fragments=3, delay=1,
                                              gloo_chunk_bytes=65536)),
    "diloco bf16": (DiLoCoAverager, {"comm_dtype": "bfloat16", "bucket_cap_mb": 0.001},
                    Replicated(comm_dtype="bfloat16", bucket_cap_mb=0.001)),
    "downpour float": (DownpourAverager, {}, Replicated()),
    "averaging bf16": (PeriodicAverager, {"comm_dtype": torch.bfloat16},
                       Replicated(comm_dtype=torch.bfloat16)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_center_spec_is_the_shorthand_over_two_ranks(name):
    results = values(run_ranks(2, _spec_and_shorthand, name))
    for r in results:
        assert all(r["same"]) and all(r["logged_same"]) and r["moved"], r
        spec_settings, word_settings, logged_settings = r["settings"]
        assert spec_settings == word_settings == logged_settings
        assert r["mode"] == "sync"
        wanted = CASES[name][2].comm_dtype
        assert r["shown"] == ({"bfloat16": torch.bfloat16}.get(wanted, wanted), "raise", None)
        # the logging center saw every exchange the schedule asked for: clocks 3 and 6 of 7
        fragments = CASES[name][2].fragments
        expected = [3, 6] if fragments == 1 else [t for t in range(1, 8)]
        assert [c for kind, c in r["log"] if kind == "advance"] == expected, r["log"]


def test_a_shared_memory_spec_is_the_async_shorthand():
    by_spec, spec_settings, avg = train(lambda p: ElasticAverager(p, tau=2, center=SharedMemory(lock_timeout=30.0)), 0)
    assert avg.mode == "async" and avg.lock_timeout == 30.0
    by_words, word_settings, _ = train(lambda p: ElasticAverager(p, tau=2, mode="async", lock_timeout=30.0), 0)
    assert all(torch.equal(a, b) for a, b in zip(by_spec, by_words))
    # the private centers' names differ; everything else is the same
    assert {**spec_settings, "center": None} == {**word_settings, "center": None}
    logged, _, avg = train(lambda p: ElasticAverager(p, tau=2, center=Logged(SharedMemory())), 0)
    assert all(torch.equal(a, b) for a, b in zip(by_spec, logged))
    assert avg._center.log == [("advance", 2), ("advance", 4), ("advance", 6)]


def test_a_named_shared_segment_goes_in_the_spec():
    m = model()
    center = easgd_ext.SharedCenter.create(f"easgd_spec_test_{id(m)}", like=list(m.parameters()), workers=1)
    try:
        with ElasticAverager(m.parameters(), tau=2, center=SharedMemory(center)) as avg:
            assert avg.center is center and avg.mode == "async"
    finally:
        center.unlink()
        center.close()


@pytest.mark.parametrize("make,error,match", [
    (lambda p: ElasticAverager(p, mode="async", center=Replicated()), ValueError,
     r"mode='async' with center=Replicated\(...\), a mode='sync' center: leave mode out"),
    (lambda p: ElasticAverager(p, center=Replicated(), comm_dtype=torch.int8), ValueError,
     r"comm_dtype beside center=Replicated\(...\): it is a setting of the center; give them inside it"),
    (lambda p: ElasticAverager(p, center=SharedMemory(), lock_timeout=3.0, fragments=2), ValueError,
     r"fragments, lock_timeout beside center=SharedMemory\(...\): they are settings"),
    (lambda p: ElasticAverager(p, center=Replicated(fragments=0)), ValueError, r"fragments must be"),
    (lambda p: ElasticAverager(p, fragments=True), TypeError, r"fragments must be an int"),
    (lambda p: ElasticAverager(p, delay=0.0), TypeError, r"delay must be an int"),
    (lambda p: ElasticAverager(p, mode="async", fragments=True), ValueError,
     r"fragments applies to mode='sync'"),
    (lambda p: ElasticAverager(p, center=Replicated(comm_dtype=torch.float64)), ValueError,
     r"comm_dtype must be None .* got torch.float64"),
    (lambda p: ElasticAverager(p, center=Replicated(comm_dtype=torch.int8, gloo_chunk_bytes=100)),
     ValueError, r"gloo_chunk_bytes must be a whole number of bytes of at least 4096 .* got 100"),
    (lambda p: ElasticAverager(p, center=Replicated(gloo_chunk_bytes=1 << 20)), ValueError,
     r"gloo_chunk_bytes applies to the quantized wires"),
    (lambda p: ElasticAverager(p, tau=4, center=Replicated(delay=4)), ValueError, r"delay"),
    (lambda p: DownpourAverager(p, center=Replicated(delay=1)), ValueError,
     r"delay=1: DownpourAverager cannot apply a sum steps after its send"),
    (lambda p: PeriodicAverager(p, center=Replicated(comm_dtype=torch.int8)), ValueError,
     r"comm_dtype=torch.int8: PeriodicAverager has no quantized wire"),
    (lambda p: ElasticAverager(p, center=SharedMemory(lock_timeout=-1)), ValueError, r"lock_timeout"),
    (lambda p: ElasticAverager(p, center=Servers([0])), ValueError, r"servers= needs torch.distributed"),
    (lambda p: PeriodicAverager(p, center=SharedMemory()), TypeError,
     r"center must be a mode='sync' center such as Replicated\(...\) \(PeriodicAverager is "
     r"synchronous only\), got SharedMemory"),
    (lambda p: DiLoCoAverager(p, center=Servers([1])), TypeError, r"center must be a mode='sync' center"),
    (lambda p: ElasticAverager(p, center=3, mode="async"), TypeError, r"center must be a SharedCenter, a segment name"),
])
def test_bad_center_specs_are_named(make, error, match):
    with pytest.raises(error, match=match):
        make(model().parameters())


def _servers_by_spec(rank: int, world: int) -> dict[str, Any]:
    m = model()
    avg = ElasticAverager(m.parameters(), tau=2, center=Servers([0]))
    if avg.is_server:
        avg.serve()
        return {"server": True, "mode": avg.mode, "workers": avg.workers}
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(4):
        m(torch.randn(4, 12)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        avg.step()
    exchanges = avg.stats.exchanges
    avg.close()
    return {"server": False, "mode": avg.mode, "workers": avg.workers, "exchanges": exchanges}


def test_a_servers_spec_serves_the_workers():
    results = values(run_ranks(3, _servers_by_spec))
    assert [r["server"] for r in results] == [True, False, False]
    assert all(r["mode"] == "async" and r["workers"] == 2 for r in results)
    assert [r["exchanges"] for r in results[1:]] == [2, 2]


@dataclass(frozen=True)
class LeavesTheTimeout(Logged):
    """A center that goes on after failures and leaves ``exchange_timeout`` to the default, as
    a spec that does not define it (the contract's class attribute: ``None``) does."""
    exchange_timeout = None  # type: ignore[assignment]


def _continue_with_default_timeout(rank: int, world: int) -> dict[str, Any]:
    spec = LeavesTheTimeout(Replicated(on_failure="continue"))
    out, _, avg = train(lambda p: ElasticAverager(p, tau=3, center=spec), rank)
    return {"on_failure": avg.on_failure, "exchanges": avg.stats.exchanges,
            "moved": any(not torch.equal(a, b) for a, b in zip(out, model().parameters()))}


def test_a_custom_center_that_goes_on_after_failures_may_leave_the_timeout_out():
    results = values(run_ranks(2, _continue_with_default_timeout))
    assert all(r == {"on_failure": "continue", "exchanges": 2, "moved": True} for r in results), results
