"""How the benchmarks report: the table, an optional latency plot, the JSON records."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator


def write_records(path: Path | None, records: list[dict]) -> None:
    """Writes the benchmark records as a JSON list when a path was given. Each record has
    ``name``, ``device``, ``numel``, ``dtype``, ``seconds``, ``GBps`` (null where no byte count
    applies) and ``ratios`` (``{"vs_<peer>": peer_seconds / seconds}``: speedups over peers
    measured in the same run), plus keys of its own benchmark."""
    if path is not None:
        path.write_text(json.dumps(records, indent=1))
        print(f"\nwrote {len(records)} records to {path}")


def report(records: list[dict], print_table: Callable[[list[dict]], None],
           plot: Callable[[list[dict], Path], None], plot_path: Path | None,
           json_path: Path | None) -> None:
    """Prints the table, then writes the plot and the records where asked."""
    print_table(records)
    if plot_path is not None:
        plot(records, plot_path)
        print(f"\nplot: {plot_path}")
    write_records(json_path, records)


@contextlib.contextmanager
def latency_axes(path: Path, ylabel: str) -> Iterator[Any]:
    """Axes to draw latency-against-model-size lines on (log-log); saved to ``path`` after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        yield ax
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model size (bytes of float32 parameters)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
