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


def spread_of(times: list[float]) -> float:
    """The inter-quartile range of ``times`` relative to their median: how noisy a variant was."""
    import statistics

    if len(times) < 4:
        return (max(times) - min(times)) / statistics.median(times) if times else 0.0
    q1, _, q3 = statistics.quantiles(times, n=4)
    return (q3 - q1) / statistics.median(times)


def machine_load() -> tuple[float, int]:
    """(1-minute load average, CPUs)."""
    import os

    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return load, os.cpu_count() or 1


def warn_if_noisy(records: list[dict]) -> None:
    """Adds ``warnings`` to each record whose ratios the noise could explain (a spread larger
    than the effect), and prints them on stderr once, with a warning when the machine is busier
    than its cores (the figures then mostly measure the other jobs)."""
    import sys

    spreads = {r["name"]: r.get("spread", 0.0) for r in records}
    load, cpus = machine_load()
    printed = False
    for r in records:
        notes = []
        for key, ratio in r.get("ratios", {}).items():
            peer = key.removeprefix("vs_")
            noise = max(r.get("spread", 0.0), spreads.get(peer, 0.0))
            if ratio and abs(ratio - 1.0) < noise:
                notes.append(f"{key} = {ratio:.2f}x is within the noise (spread {noise:.0%})")
        if load > cpus:
            notes.append(f"load average {load:.1f} exceeds the {cpus} CPUs: other jobs ran meanwhile")
        if notes:
            r["warnings"] = notes
            if not printed:
                print("warning: some ratios are within the measurement noise or the machine was "
                      "busy; see 'warnings' in the JSON records", file=sys.stderr)
                printed = True
            print(f"warning: {r['name']} (p={r.get('world_size', '-')}): {'; '.join(notes)}",
                  file=sys.stderr)
