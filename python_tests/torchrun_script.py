"""A user's script, run by the tests under torchrun: an averager trains to the end and the
process must exit 0 (python torchrun_script.py ALGORITHM MODE)."""

import sys, torch, torch.distributed as dist
import easgd_ext
dist.init_process_group("gloo")
kind, mode = sys.argv[1], sys.argv[2]
torch.manual_seed(dist.get_rank())
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
cls = {"easgd": easgd_ext.ElasticAverager, "downpour": easgd_ext.DownpourAverager, "average": easgd_ext.PeriodicAverager}[kind]
avg = cls(model.parameters(), tau=2, mode=mode)
for step in range(40):
    x = torch.randn(16, 32); y = torch.randint(0, 10, (16,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step(); opt.zero_grad(); avg.step()
if mode == "async":
    avg.close()
print("rank", dist.get_rank(), "done", avg.stats.exchanges)
