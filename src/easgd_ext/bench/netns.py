"""A slow network on one machine: one network namespace per rank, all on one bridge, every
link shaped with ``tbf`` in both directions (full duplex: each rank can send and receive at the
rate at once).

    bridge namespace  easgd-<pid>-br:   br0 <- r0, r1, ...   (tbf on each rN: what rank N receives)
    rank namespace    easgd-<pid>-rN:   eth0 = 10.213.0.(N+1)/24   (tbf on eth0: what rank N sends)

Needs root (``ip netns``, ``tc``); nothing leaves the namespaces it makes, and every one of them
is deleted on exit (also on Ctrl-C or SIGTERM; namespaces left by a launcher that was killed
are deleted by the next one). ``netem`` is not needed: the link's rate is what the benchmark
is about, and ``tbf`` alone shapes it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

PREFIX = "easgd-"
SUBNET = "10.213.0"
RANK_IFACE = "eth0"
UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


def rate_bits(rate: str) -> int:
    """``"100mbit"`` -> 100_000_000 (tc's units: kbit, mbit, gbit are powers of 1000). A
    ``ValueError`` naming the value for anything else."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)", rate.strip().lower())
    if match is None:
        raise ValueError(f"rate {rate!r}: give a number and a unit of bit, kbit, mbit or gbit "
                         "(e.g. 100mbit, 1gbit)")
    bits = int(float(match.group(1)) * UNITS[match.group(2)])
    if bits < 10**5:
        raise ValueError(f"rate {rate!r}: below 100kbit a model's exchange would take hours")
    return bits


def unavailable() -> str | None:
    """Why a shaped network cannot be built here (one line), or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc); run it as root or with sudo"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} command (iproute2), which is not on PATH"
    return None


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or 'exit %d' % done.returncode}")
    return done.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespaces() -> list[str]:
    """The names of the network namespaces on this machine."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def delete_stale() -> list[str]:
    """Deletes the namespaces of launchers that no longer run (killed before their cleanup);
    returns their names."""
    stale = []
    for name in namespaces():
        match = re.fullmatch(rf"{PREFIX}(\d+)-(br|r\d+)", name)
        if match and not _alive(int(match.group(1))):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
            stale.append(name)
    return stale


def tbf(rate: int) -> list[str]:
    """The ``tbf`` qdisc's arguments for ``rate`` bits/s: a bucket of 5 ms at the rate (at
    least 64 KiB, so a full-size segment passes whole), a queue of 100 ms (TCP's window fills
    it instead of losing packets)."""
    burst = max(rate // 8 // 200, 64 * 1024)
    return ["tbf", "rate", f"{rate}bit", "burst", str(burst), "latency", "100ms"]


class ShapedNetwork:
    """``world`` namespaces on one bridge, each link shaped to ``rate`` bits/s both ways.

    Use as a context manager; :meth:`address` is rank N's IP, :meth:`exec_prefix` the command
    prefix that runs a program in rank N's namespace. Raises ``RuntimeError`` naming the
    command that failed (e.g. a kernel without ``tbf``), after deleting what it made."""

    def __init__(self, world: int, rate: int) -> None:
        if world < 2 or world > 200:
            raise ValueError(f"world {world}: give 2 to 200 ranks")
        self.world, self.rate = world, rate
        self.tag = f"{PREFIX}{os.getpid()}"
        self.bridge_ns = f"{self.tag}-br"
        self.made: list[str] = []

    def rank_ns(self, rank: int) -> str:
        return f"{self.tag}-r{rank}"

    def address(self, rank: int) -> str:
        return f"{SUBNET}.{rank + 1}"

    def exec_prefix(self, rank: int) -> list[str]:
        return ["ip", "netns", "exec", self.rank_ns(rank)]

    def __enter__(self) -> "ShapedNetwork":
        delete_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self.made.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        br = self.bridge_ns
        self._add_ns(br)
        _run("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", br, "link", "set", "br0", "up")
        shape = tbf(self.rate)
        for rank in range(self.world):
            ns, port = self.rank_ns(rank), f"r{rank}"
            self._add_ns(ns)
            _run("ip", "-n", br, "link", "add", port, "type", "veth", "peer", "name",
                 RANK_IFACE, "netns", ns)
            _run("ip", "-n", br, "link", "set", port, "master", "br0")
            _run("ip", "-n", br, "link", "set", port, "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.address(rank)}/24", "dev", RANK_IFACE)
            _run("ip", "-n", ns, "link", "set", RANK_IFACE, "up")
            _run("tc", "-n", ns, "qdisc", "add", "dev", RANK_IFACE, "root", *shape)  # sends
            _run("tc", "-n", br, "qdisc", "add", "dev", port, "root", *shape)  # receives

    def close(self) -> None:
        """Deletes every namespace this network made (their links go with them)."""
        while self.made:
            subprocess.run(["ip", "netns", "delete", self.made.pop()], capture_output=True)


def interface_bytes(iface: str = RANK_IFACE) -> tuple[int, int]:
    """(sent, received) bytes of ``iface`` in this process's namespace, from its counters
    (frames with their Ethernet/IP/TCP headers)."""
    stats = Path("/sys/class/net") / iface / "statistics"
    return int((stats / "tx_bytes").read_text()), int((stats / "rx_bytes").read_text())


def machine_cpu_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of every CPU of the machine since boot, from /proc/stat (not
    namespaced: the ranks, their Gloo threads and the kernel's network processing, softirqs
    included, all count)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return total - idle, total
