"""The table of methods says what each averager really does: its flags are checked against
the averagers themselves (a flag that lies would pass the tools' checks and fail in a run)."""

from __future__ import annotations

import pytest
import torch

from easgd_ext import methods, simulate, study, train
from easgd_ext.methods import METHODS, method


def params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return list(torch.nn.Linear(8, 4).parameters())


def builds(entry: methods.Method, **settings) -> bool:
    try:
        avg = entry.build(params(), tau=4, **settings)
    except ValueError:
        return False
    if avg is not None:
        avg.close()
    return True


@pytest.mark.parametrize("name", [m for m in METHODS if METHODS[m].averager is not None])
def test_the_flags_are_what_the_averager_accepts(name):
    entry = METHODS[name]
    assert builds(entry)
    assert builds(entry, comm_dtype=torch.int8) == entry.sends_difference
    assert builds(entry, delay=1) == entry.delays
    assert builds(entry, mode="async") == entry.asynchronous
    avg = entry.build(params(), tau=4, **entry.rule_settings(0.5, False))  # beta where it applies
    assert (getattr(avg, "beta", None) == 0.5) == entry.elastic
    for key, value in entry.fixed.items():
        assert avg.state_dict()["settings"][key] == value
    avg.close()


def test_names_and_aliases():
    assert method("average") is method("local_sgd") is METHODS["local-sgd"]
    assert method("sync-sgd").build(params(), tau=4) is None
    assert method("eamsgd").nesterov and not method("easgd").nesterov
    opt = method("eamsgd").local_optimizer(params(), 0.1, 0.8)
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.8
    assert method("easgd").local_optimizer(params(), 0.1).defaults["momentum"] == 0
    with pytest.raises(ValueError, match=r"unknown method 'adam'; choose from sync-sgd, local-sgd"):
        method("adam")
    with pytest.raises(ValueError, match=r"easgd-outer fixes outer_lr=0.5; leave outer_lr out"):
        method("easgd-outer").build(params(), tau=4, outer_lr=0.3)
    with pytest.raises(TypeError, match="beta"):  # not silently dropped
        method("downpour").build(params(), tau=4, beta=0.5)
    with pytest.raises(ValueError, match="method must be one of 'easgd', 'diloco', 'downpour', 'local_sgd'"):
        methods.integration_averager("eamsgd")


def test_the_tools_read_the_table():
    assert study.METHODS == tuple(METHODS)
    assert set(study.FLOAT_ONLY) == {"sync-sgd", "local-sgd"}
    assert set(train.ASYNC_ALGORITHMS) == {"easgd", "eamsgd", "downpour"}
    assert train.DELAYED == {"easgd", "eamsgd", "diloco", "sync-sgd"}
    with pytest.raises(ValueError, match="averager must be a method with an averager"):
        simulate.Workers(lambda: torch.nn.Linear(2, 2), 2, averager="sync-sgd")
