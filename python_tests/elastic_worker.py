"""One process of an elastic job, run by test_elastic.py: ``python elastic_worker.py OUT
[kill_rank kill_clock]``, with MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE set (EASGD_EXT_JOIN=1 for
a joiner; WIRE, FRAGMENTS and DELAY: the exchange's settings). It trains a small model with
EASGD, on_failure="continue", until the group has had a
process join (its clock then: J) and 40 more steps, and writes its clock, world, stats and
center to OUT/<pid>.json."""

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import easgd_ext

out = Path(sys.argv[1])
kill_rank, kill_clock = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (None, None)
joiner = os.environ.get("EASGD_EXT_JOIN") == "1"
easgd_ext.init_process_group(elastic=True, timeout=timedelta(seconds=30))
torch.manual_seed(0)  # the joiner too: its start is overwritten by the center anyway
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
avg = easgd_ext.ElasticAverager(model.parameters(), tau=4, on_failure="continue",
                                exchange_timeout=30, comm_dtype=os.environ.get("WIRE") or None,
                                fragments=int(os.environ.get("FRAGMENTS", "1")),
                                delay=int(os.environ.get("DELAY", "0")))
start_rank = dist.get_rank()
gen = torch.Generator().manual_seed(1000 + os.getpid())
joined_at = avg.clock if joiner else None
(out / f"started-{os.getpid()}").write_text(str(start_rank))
while True:
    x = torch.randn(16, 8, generator=gen)
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    avg.step()
    time.sleep(0.005)
    if avg.clock == kill_clock and start_rank == kill_rank and not joiner:
        os._exit(3)
    if joined_at is None and avg.stats.workers_joined:
        joined_at = avg.clock
    if joined_at is not None and avg.clock >= joined_at + 40:
        break
    if avg.clock > 20000:
        raise SystemExit("nobody joined")
avg.flush()
center = torch.cat([c.reshape(-1) for c in avg.center_state()])
(out / f"{os.getpid()}.json").write_text(json.dumps({
    "joiner": joiner, "start_rank": start_rank, "rank": dist.get_rank(), "world": avg.world_size,
    "clock": avg.clock, "joined_at": joined_at, "center": center.tolist(),
    "failures_survived": avg.stats.failures_survived, "workers_joined": avg.stats.workers_joined,
    "exchanges": avg.stats.exchanges,
    "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters())}))
dist.destroy_process_group()
