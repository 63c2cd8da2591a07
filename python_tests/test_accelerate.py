"""ElasticLocalSGD: an accelerate loop with an easgd_ext averager, 2 CPU processes under torchrun."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate", reason="accelerate is not installed (pip install 'easgd_ext[accelerate]')")

WORKER = Path(__file__).with_name("accelerate_worker.py")


def run(tmp_path: Path, method: str, wire: str) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--standalone", str(WORKER), str(tmp_path), method, wire],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("method,wire", [("easgd", "int8"), ("diloco", "float32")])
def test_an_accelerate_loop_trains_replicas_linked_by_the_averager(tmp_path, method, wire):
    ranks = run(tmp_path, method, wire)
    for r in ranks:
        assert r["world"] == 2 and r["steps"] == 256 // 8 // 2 and r["exchanges"] == r["steps"] // 4
    assert torch.equal(ranks[0]["center"], ranks[1]["center"])  # one center, bit for bit
    if method == "easgd":  # the elastic pull moves each replica part of the way
        assert not torch.equal(ranks[0]["worker"], ranks[1]["worker"])
    else:  # DiLoCo resets every replica to the center at the last step's exchange
        assert all(torch.equal(r["worker"], r["center"]) for r in ranks)
    assert not torch.equal(ranks[0]["grad"], ranks[1]["grad"])  # no gradient all-reduce


def test_bad_arguments_name_what_is_wrong():
    from accelerate import Accelerator

    from easgd_ext.integrations.accelerate import ElasticLocalSGD

    with pytest.raises(ValueError, match="method must be one of 'easgd', 'diloco', 'downpour', 'local_sgd', got 'sgd'"):
        ElasticLocalSGD(Accelerator(cpu=True), torch.nn.Linear(2, 2), method="sgd")
