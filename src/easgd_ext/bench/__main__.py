"""python -m easgd_ext.bench {kernels,comm} [options]: the benchmarks shipped with the package.

    kernels   fused kernel bandwidth vs torch eager, _foreach and torch.compile
    comm      exchange latency vs size and world size, vs a raw all_reduce and PyTorch's
              PeriodicModelAverager (table, --json, --plot PNG); with --mode async the
              shared-memory and sharded centers against the memory-traffic floor
"""

from __future__ import annotations

import sys

COMMANDS = ("kernels", "comm")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown benchmark {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    if argv[0] == "kernels":
        from .kernels import main as run
    else:
        from .comm import main as run
    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
