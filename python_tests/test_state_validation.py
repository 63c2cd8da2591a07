"""A checkpoint is checked before anything of it is loaded: Inf/NaN or wrong dtypes in any saved
buffer, counters that are not whole numbers in range, another rank's state. Each refusal names
the key and leaves the averager as it was."""

from __future__ import annotations

import copy

import pytest
import torch

import easgd_ext
from dist_harness import run_ranks, values


def make(mode: str = "sync", **kwargs) -> tuple[list[torch.nn.Parameter], easgd_ext.ElasticAverager]:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300, generator=g)), torch.nn.Parameter(torch.randn(7, 5, generator=g))]
    return params, easgd_ext.ElasticAverager(params, tau=2, mode=mode, **kwargs)


def trained_state(mode: str = "sync", **kwargs) -> dict:
    params, avg = make(mode, **kwargs)
    for _ in range(4):
        with torch.no_grad():
            params[0].add_(0.1)
        avg.step()
    state = avg.state_dict()
    avg.close()
    return state


def assert_refused_and_unchanged(avg, state, match: str) -> None:
    before = (avg.clock, [t.clone() for t in avg.center_state()], avg.stats)
    with pytest.raises(ValueError, match=match):
        avg.load_state_dict(state)
    assert avg.clock == before[0] and avg.stats == before[2]
    assert all(torch.equal(a, b) for a, b in zip(avg.center_state(), before[1]))


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_center_is_refused(mode, value):
    state = trained_state(mode)
    state["buffers"]["center"][0][17] = value
    _, avg = make(mode)
    assert_refused_and_unchanged(avg, state, r"state buffer center\[0\] holds Inf or NaN")
    avg.close()


@pytest.mark.parametrize("dtype", [torch.int64, torch.bfloat16, torch.float64])
def test_a_center_of_another_dtype_is_refused(dtype):
    state = trained_state()
    state["buffers"]["center"][0] = state["buffers"]["center"][0].to(dtype)
    _, avg = make()
    assert_refused_and_unchanged(avg, state, r"state buffer center\[0\] is .* the averager keeps it in float32")


def test_residuals_of_the_8bit_wire_are_checked_too():
    state = trained_state(comm_dtype=torch.int8, fragments=2, delay=1)
    state["buffers"]["residual"][0][3] = float("nan")
    _, avg = make(comm_dtype=torch.int8, fragments=2, delay=1)
    assert_refused_and_unchanged(avg, state, r"state buffer residual\[0\] holds Inf or NaN")


@pytest.mark.parametrize("key,value,match", [
    ("clock", -5, r"state clock must be in \[0, 2\^62\], got -5"),
    ("clock", 3.7, "state clock must be an int, got float 3.7"),
    ("clock", "12", "state clock must be an int, got str '12'"),
    ("clock", True, "state clock must be an int, got bool"),
    ("clock", 10**30, r"state clock must be in \[0, 2\^62\]"),
    ("stats.exchanges", -1, r"state stats.exchanges must be in \[0, 2\^62\], got -1"),
    ("stats.comm_seconds", float("nan"), "state stats.comm_seconds must be a finite number"),
    ("stats.bytes_sent", 2.5, "state stats.bytes_sent must be an int"),
    ("stats.wait_seconds", -1.0, "state stats.wait_seconds must be a finite number >= 0"),
    ("stats.wait_seconds", float("nan"), "state stats.wait_seconds must be a finite number"),
])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_nonsense_counters_are_refused(mode, key, value, match):
    state = trained_state(mode)
    if key.startswith("stats."):
        state["stats"][key.split(".")[1]] = value
    else:
        state[key] = value
    _, avg = make(mode)
    assert_refused_and_unchanged(avg, state, match)
    avg.close()


def test_a_good_state_still_loads_and_old_format_2_states_too():
    state = trained_state()
    params, avg = make()
    avg.load_state_dict(state)
    assert avg.clock == 4 and avg.stats.exchanges == 2
    old = copy.deepcopy(state)
    old["format"] = 2
    for key in ("fragments", "delay"):
        old["settings"].pop(key)
    _, avg2 = make()
    avg2.load_state_dict(old)
    assert avg2.clock == 4
    # Checkpoints from before stats.wait_seconds load it as 0; other missing counters are refused.
    old["stats"].pop("wait_seconds")
    _, avg3 = make()
    avg3.load_state_dict(old)
    assert avg3.stats.wait_seconds == 0 and avg3.stats.exchanges == 2
    old["stats"].pop("resets")
    assert_refused_and_unchanged(make()[1], old, "state stats must hold")


def other_ranks_state(rank: int, world: int) -> str:
    _, avg = make()
    avg.step()
    states = [None] * world
    torch.distributed.all_gather_object(states, avg.state_dict())
    try:
        avg.load_state_dict(states[(rank + 1) % world])
    except ValueError as exc:
        return str(exc)
    return "accepted"


def test_another_ranks_state_is_refused_in_sync_mode_as_in_async():
    for message in values(run_ranks(2, other_ranks_state)):
        assert "every rank loads the state it saved" in message
