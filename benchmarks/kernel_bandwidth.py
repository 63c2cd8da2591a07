"""Fused elastic kernels against torch eager, torch._foreach_* and torch.compile, in one run.
The implementation lives in easgd_ext.bench.kernels (also: python -m easgd_ext.bench kernels).

    python benchmarks/kernel_bandwidth.py --help
"""

import sys

from easgd_ext.bench.kernels import main

if __name__ == "__main__":
    sys.exit(main())
