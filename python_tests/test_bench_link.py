"""bench link: the shaped network it builds (namespaces, bridge, tbf) and what it measures on
it, with real ranks in real namespaces. Needs root and tc; skipped with the reason otherwise."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from easgd_ext.bench import netns
from easgd_ext.bench.netns import rate_bits

REASON = netns.unavailable()
needs_root = pytest.mark.skipif(REASON is not None, reason=f"bench link {REASON}")
BENCH = [sys.executable, "-m", "easgd_ext.bench", "link"]


def test_rates_parse_in_tc_units_and_bad_ones_are_named():
    assert rate_bits("100mbit") == 100_000_000
    assert rate_bits("1gbit") == 1_000_000_000
    assert rate_bits("2.5Mbit") == 2_500_000
    for bad in ("100", "fast", "100mbps", "-1mbit"):
        with pytest.raises(ValueError, match=repr(bad)):
            rate_bits(bad)
    with pytest.raises(ValueError, match="100kbit"):
        rate_bits("10kbit")


def ours(pid: int) -> list[str]:
    return [n for n in netns.namespaces() if n.startswith(f"{netns.PREFIX}{pid}-")]


@needs_root
def test_the_quick_form_measures_every_variant_and_counts_the_bytes_the_averager_says(tmp_path):
    out = tmp_path / "link.json"
    done = subprocess.run(BENCH + ["--quick", "--json", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = {r["name"]: r for r in json.loads(out.read_text())}
    assert list(records) == ["local", "easgd_fp32", "easgd_int8", "stream_int8", "raw_fp32", "raw_int8"]
    assert all(r["parameters_finite"] for r in records.values())
    assert records["local"]["sent_bytes_per_step"] < 10_000  # nothing but the group's chatter
    # What the interfaces counted is what bytes_per_step() said (frames carry their headers,
    # one per GSO segment: a fraction of a percent).
    for name in ("easgd_fp32", "easgd_int8", "raw_fp32", "raw_int8"):
        assert 0.99 <= records[name]["wire_vs_expected"] <= 1.05, (name, records[name])
    # A streamed exchange has a fragment in flight at each edge of a window: its bytes may
    # fall on either side, up to one fragment's share of the window's.
    slack = 1 / records["stream_int8"]["fragments"]
    assert 0.99 - slack <= records["stream_int8"]["wire_vs_expected"] <= 1.05 + slack
    int8, fp32 = records["easgd_int8"], records["easgd_fp32"]
    assert int8["sent_bytes_per_step"] < 0.3 * fp32["sent_bytes_per_step"]
    assert records["raw_int8"]["link_share"] > 0 and records["stream_int8"]["fragments"] == 8
    assert "x local" in done.stdout and "link" in done.stdout
    for name, r in records.items():  # the ranks' own work is on the machine's CPUs
        assert r["cpu_seconds_per_step"] > 0 and 0 < r["machine_busy"] <= 1, (name, r)
    assert records["local"]["cpu_seconds_per_step"] > 0.2 * records["local"]["seconds"]


@needs_root
def test_an_interrupted_run_deletes_every_namespace_it_made():
    proc = subprocess.Popen(BENCH + ["--quick"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while len(ours(proc.pid)) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert len(ours(proc.pid)) == 3  # the bridge's and two ranks'
    time.sleep(2)  # the ranks are starting in them
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert ours(proc.pid) == []


@needs_root
def test_namespaces_left_by_a_killed_launcher_are_deleted_by_the_next():
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"{netns.PREFIX}{dead.pid}-r0"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in netns.delete_stale()
        assert name not in netns.namespaces()
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def test_without_root_it_says_so_in_one_line_and_exits_non_zero(monkeypatch, capsys):
    from easgd_ext.bench import link

    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # what an unprivileged user's process sees
    assert link.main(["--quick"]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["bench link: needs root (network namespaces and tc); run it as root or with sudo"]


def test_the_machine_cpu_counter_sees_a_busy_thread():
    busy0, total0 = netns.machine_cpu_jiffies()
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        pass
    busy1, total1 = netns.machine_cpu_jiffies()
    assert total1 > total0 and busy1 - busy0 >= 0.5 * (total1 - total0) / os.cpu_count()


def test_a_bad_chunk_size_is_a_usage_error(monkeypatch, capsys):
    from easgd_ext.bench import link

    with pytest.raises(SystemExit):
        link.parse(["--gloo-chunk-kib", "2"])
    monkeypatch.setenv("EASGD_EXT_GLOO_CHUNK_BYTES", "lots")
    with pytest.raises(SystemExit):
        link.parse([])
    assert "EASGD_EXT_GLOO_CHUNK_BYTES must be a whole number of bytes" in capsys.readouterr().err
