"""What the averager costs in a real training step (a torchvision model's step alone, with
ElasticAverager at tau 1 and 10, and with the same exchange in plain torch), in one run.
The implementation lives in easgd_ext.bench.train_step (also: python -m easgd_ext.bench step).

    python benchmarks/train_step.py --help
"""

import sys

from easgd_ext.bench.train_step import main

if __name__ == "__main__":
    sys.exit(main())
