"""One rank of the store-fault tests (python store_fault_worker.py OUT_DIR EXCHANGE_TIMEOUT).

Joins a Gloo group the way the environment says (env://: MASTER_ADDR, MASTER_PORT, RANK,
WORLD_SIZE, set by the test or by torchrun), builds ``ElasticAverager(tau=1,
exchange_timeout=...)`` on CPU tensors and exchanges in a loop, rewriting OUT_DIR/rank{R}.json
after each exchange (pid, exchanges so far). When step() raises ExchangeError it records the
message, the silent ranks and the wall-clock time of the raise there, and exits with code 3
through the interpreter's normal shutdown, as a user's script that does not catch it would.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import easgd_ext


def write(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)  # the test never reads a half-written file


def main() -> int:
    out, exchange_timeout = Path(sys.argv[1]), float(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    path = out / f"rank{rank}.json"
    record = {"pid": os.getpid(), "rank": rank, "exchanges": 0, "error": None}
    params = [torch.nn.Parameter(torch.randn(5000, generator=torch.Generator().manual_seed(rank)))]
    avg = easgd_ext.ElasticAverager(params, tau=1, exchange_timeout=exchange_timeout)
    write(path, record)
    while True:
        with torch.no_grad():
            params[0].add_(0.01)
        try:
            avg.step()
        except easgd_ext.ExchangeError as exc:
            record.update(error=str(exc), silent=exc.silent_ranks, raised_at=time.time())
            write(path, record)
            return 3
        record["exchanges"] += 1
        write(path, record)
        time.sleep(0.01)


if __name__ == "__main__":
    sys.exit(main())
