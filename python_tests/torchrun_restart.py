"""A job that torchrun restarts, run by the tests: in the first attempt rank 1 crashes in the
middle of training; the restarted group re-attaches to the same persistent center (its name
is the first argument), continues from it, and rank 0 removes it at the end."""

import os
import sys

import torch
import torch.distributed as dist

import easgd_ext

easgd_ext.init_process_group("gloo")  # a namespace per attempt in the launcher's store
rank, name = dist.get_rank(), sys.argv[1]
attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
torch.manual_seed(100 * attempt + rank)
params = [torch.nn.Parameter(torch.randn(20_000))]
avg = easgd_ext.ElasticAverager(params, tau=1, mode="async", center=name)
updates = sum(avg.center.segment.chunk_updates())
from_center = torch.equal(params[0].detach(), avg.center.snapshot()[:20_000])
sys.stdout.write(f"attempt {attempt} rank {rank}: {updates} chunk updates at start, "
                 f"starts from the center: {from_center}\n")
sys.stdout.flush()
dist.barrier()  # nobody exchanges before every worker has looked at its start
for step in range(30):
    with torch.no_grad():
        params[0].add_(0.01 * torch.randn(20_000))
    avg.step()
    if attempt == 0 and rank == 1 and step == 10:
        os._exit(17)  # a crash: no cleanup of any kind
avg.close()
dist.barrier()
if rank == 0:
    print(f"done after attempt {attempt}: {sum(avg.center.segment.chunk_updates())} chunk updates",
          flush=True)
    easgd_ext.SharedCenter.remove(name)
