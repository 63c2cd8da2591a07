"""The averagers on real processes: p ranks in a Gloo group on localhost (world sizes 1-4),
compared with a float64 simulation of all p workers, and their failure modes (mismatched
layouts, bad arguments on one rank, NaN, overflow): errors on every rank, never a hang."""

from __future__ import annotations

import pytest
import torch

from dist_harness import run_ranks, values
from dist_workers import (DTYPES, Case, build_with, non_finite_exchange, periodic_vs_pytorch,
                          resume_case, run_cases, schedule_case, simulate)

WORLDS = [1, 2, 3, 4]
STEPS = 20
# Differences from the simulation are rounding decisions that come out the other way (float32
# arithmetic, all-reduce summation order): a few units of the coarser of the parameter and wire
# epsilons, relative to 1 + |value|. An algorithmic slip (a wrong alpha, a missed exchange)
# is orders of magnitude larger in float32.
TOLERANCE_UNITS = 6.0


def _cases() -> list[Case]:
    cases = []
    for algo in ("easgd", "eamsgd", "downpour", "average"):
        for tau in (1, 3):
            for dtype in DTYPES:
                for comm in (None, "bfloat16", "float16"):
                    for grad in ((False, True) if algo == "easgd" else (algo == "eamsgd",)):
                        cases.append(Case(algo, tau, dtype, comm, grad, steps=STEPS))
    # Two flat groups and buckets of 1 KiB: many all-reduces in flight at once.
    cases.append(Case("easgd", 1, "float32", "bfloat16", True, steps=STEPS, bucket_cap_mb=1 / 1024,
                      mixed=True))
    cases.append(Case("downpour", 2, "float16", None, False, steps=STEPS, bucket_cap_mb=1 / 1024,
                      mixed=True))
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def parity_runs() -> dict[int, list[list[dict]]]:
    """All cases on each world size, one spawn per world size (filled on first use)."""
    return {}


def _results(parity_runs: dict, world: int) -> list[list[dict]]:
    if world not in parity_runs:
        parity_runs[world] = values(run_ranks(world, run_cases, CASES))
    return parity_runs[world]


def _units(actual: torch.Tensor, expected: torch.Tensor, case: Case) -> float:
    coarse = torch.finfo(actual.dtype).eps
    if case.comm is not None:
        coarse = max(coarse, torch.finfo(DTYPES[case.comm]).eps)
    err = (actual.double() - expected).abs() / (coarse * (1 + expected.abs()))
    return err.max().item()


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("k", range(len(CASES)), ids=[
    f"{c.algo}-tau{c.tau}-{c.dtype}-wire_{c.comm}-{'grad' if c.grad else 'nograd'}"
    f"{'-mixed-buckets' if c.mixed else ''}" for c in CASES])
def test_matches_float64_simulation(parity_runs, world, k):
    case = CASES[k]
    ranks = [per_rank[k] for per_rank in _results(parity_runs, world)]
    sim = simulate(case, world)
    for rank, out in enumerate(ranks):
        assert out["returned"] == sim["returned"], f"rank {rank}: exchanged at the wrong steps"
        for i, (x, want) in enumerate(zip(out["x"], sim["x"][rank])):
            assert torch.isfinite(x).all()
            units = _units(x, want, case)
            assert units <= TOLERANCE_UNITS, f"rank {rank} parameter {i}: {units:.1f} units off"
        if sim["center"] is not None:
            for i, (c, want) in enumerate(zip(out["center_as_params"], sim["center"])):
                units = _units(c, want.to(c.dtype).double(), case)
                assert units <= TOLERANCE_UNITS, f"rank {rank} center {i}: {units:.1f} units off"
        for a, b in zip(ranks[0]["center_state"], out["center_state"]):
            assert torch.equal(a, b), f"center replica on rank {rank} differs from rank 0's"
        expected_exchanges = STEPS // case.tau
        assert out["stats"]["exchanges"] == expected_exchanges
        assert out["stats"]["skipped_exchanges"] == 0
        if world > 1:
            assert out["stats"]["bytes_sent"] > 0 and out["stats"]["comm_seconds"] > 0


@pytest.mark.parametrize("world,tau", [(2, 3), (3, 1)])
def test_exchanges_exactly_when_due(world, tau):
    steps = 10
    for out in values(run_ranks(world, schedule_case, tau, steps)):
        due = [(t + 1) % tau == 0 for t in range(steps)]
        assert out["returned"] == due
        assert out["center_moved"] == due, "the center moved on a step with no exchange"
        assert out["forced"] and out["clock"] == out["clock_before"] == steps
        assert out["exchanges"] == steps // tau + 1


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_periodic_averager_matches_pytorch(world, dtype):
    for rank, diffs in enumerate(values(run_ranks(world, periodic_vs_pytorch, dtype, 6))):
        # sum * (1/p) against sum / p: one rounding apart, i.e. within eps * |value| (< 2 units)
        assert max(diffs) <= 2.0, f"rank {rank}: {diffs}"


def _errors(results) -> list[tuple[str | None, str | None]]:
    return [(r.error_type, r.error) for r in results]


def test_mismatched_parameter_count_is_an_error_on_every_rank():
    results = run_ranks(3, build_with, {2: {"extra_param": ((6,), "float32")}}, timeout=120)
    for kind, message in _errors(results):
        assert kind == "AgreementError"
        assert "layout: rank 0 has 2 entries, rank 2 has 3" in message


def test_mismatched_dtype_is_an_error_on_every_rank():
    results = run_ranks(2, build_with, {1: {"retype": "float16"}}, timeout=120)
    for kind, message in _errors(results):
        assert kind == "AgreementError"
        assert "layout[1] is 'float32[5] on cpu' on rank 0 but 'float16[5] on cpu' on rank 1" in message


def test_bad_argument_on_one_rank_is_raised_on_every_rank():
    results = run_ranks(3, build_with, {1: {"kwargs": {"tau": 0}}}, timeout=120)
    for kind, message in _errors(results):
        assert kind == "ValueError"
        assert message.startswith("rank 1: tau must be >= 1")


def test_different_settings_are_an_error_on_every_rank():
    results = run_ranks(2, build_with, {1: {"kwargs": {"comm_dtype": torch.bfloat16}}}, timeout=120)
    for kind, message in _errors(results):
        assert kind == "AgreementError"
        assert "settings.comm_dtype is None on rank 0 but 'bfloat16' on rank 1" in message


@pytest.mark.parametrize("comm", [None, "bfloat16"])
def test_nan_on_one_rank_skips_the_exchange_everywhere(comm):
    world, bad = 3, 1
    outs = values(run_ranks(world, non_finite_exchange, bad, comm, False, "skip", timeout=120))
    for rank, out in enumerate(outs):
        assert out["first"] is True and out["second"] is True
        assert out["center_unchanged"], f"rank {rank}: the center changed in a skipped exchange"
        assert out["x_unchanged"], f"rank {rank}: parameters changed in a skipped exchange"
        skipped = [w for w in out["warnings"] if "was skipped" in w]
        # One warning from rank 0 and one from the rank that diverged, not one per rank.
        if rank in (0, bad):
            assert len(skipped) == 1 and "non-finite values on 1 of 3 workers" in skipped[0]
            assert f"(this rank: {'yes' if rank == bad else 'no'})" in skipped[0]
            assert out["warning_files"][0].endswith("dist_workers.py"), "points at the user's line"
        else:
            assert not skipped, out["warnings"]
        assert out["stats_first"]["skipped_exchanges"] == 1
        assert out["stats"]["skipped_exchanges"] == 1 and out["stats"]["exchanges"] == 1
        for c in out["center_after_second"]:
            assert torch.isfinite(c).all()
            assert torch.equal(c, outs[0]["center_after_second"][0])


@pytest.mark.parametrize("comm", [None, "bfloat16"])
def test_nan_on_one_rank_resets_it_and_the_others_average_on(comm):
    """The default policy: the diverged rank sends nothing and restarts from the new center;
    the healthy ranks exchange among themselves; every replica stays identical."""
    world, bad = 3, 2
    outs = values(run_ranks(world, non_finite_exchange, bad, comm, False, "reset", timeout=120))
    wire = {None: torch.float32, "bfloat16": torch.bfloat16}[comm]
    alpha = torch.tensor(outs[0]["alpha"], dtype=torch.float32)
    c0 = outs[0]["before_c"][0][:300]
    d = {r: (alpha * (outs[r]["before_x"] - c0)).to(wire).float() for r in range(world) if r != bad}
    want_center = c0.double() + sum(v.double() for v in d.values())
    # the sum is rounded to the wire dtype once, then added to the float32 center
    tol = torch.finfo(wire).eps * sum(v.double().abs() for v in d.values()) + 4e-7 * (1 + want_center.abs())
    for rank, out in enumerate(outs):
        c1 = out["after_c"][0][:300]
        assert torch.equal(c1, outs[0]["after_c"][0][:300]), "replicas differ"
        assert ((c1.double() - want_center).abs() <= tol).all()
        if rank == bad:
            assert torch.equal(out["after_x"], c1), "the diverged rank did not restart from the center"
            assert out["stats_first"]["resets"] == 1
            assert any("this worker's parameters were not finite" in w for w in out["warnings"])
        else:
            assert torch.equal(out["after_x"], out["before_x"] - d[rank])
            assert out["stats_first"]["resets"] == 0
        assert out["stats"]["exchanges"] == 2 and out["stats"]["skipped_exchanges"] == 0
    assert any("1 of 3 workers had non-finite parameters" in w for w in outs[0]["warnings"])
    assert not any("non-finite" in w for w in outs[1]["warnings"])


def test_raise_policy_raises_on_every_rank():
    results = run_ranks(2, non_finite_exchange, 1, None, False, "raise", timeout=120)
    for r in results:
        assert r.error_type == "NonFiniteError", r.traceback
        assert "the exchange at clock 1 was skipped: non-finite values on 1 of 2 workers" in r.error


def test_float16_wire_overflow_leaves_those_elements_alone_everywhere():
    outs = values(run_ranks(2, non_finite_exchange, -1, "float16", True, timeout=120))
    for rank, out in enumerate(outs):
        assert out["first"] is True and out["second"] is True
        assert out["center_unchanged"] and out["x_unchanged"]  # every element overflowed
        assert out["stats_first"]["overflowed_exchanges"] == 1
        overflowed = [w for w in out["warnings"] if "float16 sum over ranks overflowed" in w]
        assert len(overflowed) == (1 if rank == 0 else 0)


@pytest.mark.parametrize("algo,comm", [("eamsgd", "bfloat16"), ("downpour", None), ("average", None)])
def test_resume_from_state_dict_is_exact(algo, comm):
    straight = values(run_ranks(2, resume_case, algo, comm, None))
    resumed = values(run_ranks(2, resume_case, algo, comm, 7))
    for a, b in zip(straight, resumed):
        assert a["clock"] == b["clock"] == 14
        assert a["exchanges"] == b["exchanges"] and a["bytes_sent"] == b["bytes_sent"]
        for x, y in zip(a["x"] + a["center"], b["x"] + b["center"]):
            assert torch.equal(x, y), "the resumed run differs from the uninterrupted one"
