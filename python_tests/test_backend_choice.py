"""How the averagers tell whether the host waits for collectives: by the backend the group
uses for the tensors' device, not by the group's one name (a group made with several backends,
or by init_process_group() without one, names none that says "nccl")."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import easgd_ext
from dist_harness import run_ranks, values
from easgd_ext._dist import Comm


def backends_seen(rank: int, world: int) -> dict:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    world_comm = Comm(dist.group.WORLD, rank, world)
    mixed = dist.new_group(backend="cpu:gloo")  # a per-device backend configuration
    mixed_comm = Comm(mixed, rank, world)
    params = [torch.nn.Parameter(torch.randn(1000))]
    avg = easgd_ext.ElasticAverager(params, tau=1, process_group=mixed)
    avg.exchange()
    return {"world": (world_comm.backend_for(cpu), world_comm.backend_for(cuda)),
            "mixed": (dist.get_backend(mixed), mixed_comm.backend_for(cpu)),
            "host_waits": (world_comm.host_waits(cpu), mixed_comm.host_waits(cpu)),
            "waited": avg.stats.exchanges}


def test_the_backend_is_the_one_the_group_uses_for_the_device():
    for seen in values(run_ranks(2, backends_seen)):
        assert seen["world"] == ("gloo", "gloo")  # a gloo group serves both device types
        assert seen["mixed"] == ("cpu:gloo", "gloo")  # get_backend names no single backend
        assert seen["host_waits"] == (True, True)
        assert seen["waited"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (an NCCL backend)")
def test_a_mixed_group_runs_cuda_tensors_on_nccl():
    def one(rank: int, world: int) -> tuple:
        group = dist.new_group(backend="cpu:gloo,cuda:nccl")
        comm = Comm(group, rank, world)
        return comm.backend_for(torch.device("cuda")), comm.host_waits(torch.device("cuda"))

    assert values(run_ranks(1, one)) == [("nccl", False)]
