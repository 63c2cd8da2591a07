"""Latency of one exchange (ElasticAverager, fp32 and bf16 wire) against a raw all_reduce of
the same bytes, the same exchange in plain torch (torch_flat) and PyTorch's
PeriodicModelAverager, by size and world size, in one run; with
``--mode async``, the asynchronous transports (shared-memory center against the memory-traffic
floor, concurrent workers, the sharded center over Gloo against a raw ping-pong).
The implementation lives in easgd_ext.bench.comm (also: python -m easgd_ext.bench comm).

    python benchmarks/comm_latency.py --help
"""

import sys

from easgd_ext.bench.comm import main

if __name__ == "__main__":
    sys.exit(main())
