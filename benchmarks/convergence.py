"""The convergence study of the local-update methods (sync SGD, local SGD, DOWNPOUR, EASGD,
EAMSGD, DiLoCo, EASGD with an outer optimizer) on digits and a byte-level language model, at
equal communication, with each method's learning rate tuned on a validation split and
results over fresh seeds. The implementation is easgd_ext.study:

    python benchmarks/convergence.py             # = python -m easgd_ext.study
    python benchmarks/convergence.py --quick     # the pipeline end to end in under a minute
    python benchmarks/convergence.py --help
"""

import sys

from easgd_ext.study import main

if __name__ == "__main__":
    sys.exit(main())
