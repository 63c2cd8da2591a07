"""The exchange on a slow link: ranks in their own network namespaces, every link shaped to
--rate with tbf in both directions, Gloo over the shaped interfaces, a real training step.

Needs root (it builds the namespaces, the bridge and the shaping itself, and deletes them on
exit, Ctrl-C included). Each variant in turn is built from the same initial weights, runs one
warm-up window of --tau steps, then --windows measured windows; it is freed before the next:
  local         the training step alone (the floor: no communication)
  ddp           DistributedDataParallel: a gradient all-reduce every step (--ddp-steps steps a
                window: every step costs the same)
  pma           PyTorch's PeriodicModelAverager, period tau (a parameter all-reduce)
  easgd_<wire>  ElasticAverager, one whole exchange every tau steps (wire fp32, bf16, int8,
                int4, int2)
  stream_<wire> the same, streamed: fragments=--fragments, delay=1 (a fragment leaves every
                step, its sum lands one step later, behind the next step's compute)
  stream_<wire>_d2  delay=2: a quantized wire's two collectives each get a step (over Gloo the
                host starts the all-gather when it has reduced what the all-to-all brought,
                at the step after the send; with delay=1 it then waits for it at once)
  downpour_int8, periodic_fp32, diloco_fp32, diloco_int8, diloco_int4: the other averagers,
                one exchange every tau steps
  sdiloco_<wire>[_d2]  Streaming DiLoCo: DiLoCoAverager with fragments=--fragments and delay
                1 (or 2)
  raw_<wire>    the collectives alone, on the same bytes as that wire's whole exchange (fp32:
                a ring all_reduce; int8/int4/int2: the all_to_all and all_gather of the records,
                in pieces as the wire sends them over Gloo); raw_<wire>_whole: each record in
                one message (what the wire did before it was cut into pieces)
Reported per variant: median step time over the windows and its spread, the ratios against
ddp, pma and local (peer time / ours, > 1 = faster), "blocked": seconds the call after
opt.step() blocked the loop per window, "waited": the part of it spent waiting for collectives
(stats.wait_seconds), and the bytes each rank sent per step as the interface counters saw them
(frames: with their Ethernet/IP/TCP headers, one set per GSO segment, plus the ACKs of what
it received; measured 0.2-5% over the payload) against bytes_per_step(), rank 0's process CPU
time per step (compute and Gloo threads) and the share of the machine's CPUs busy (the kernel's
network processing included: where it is near 100%, the exchange's cost is CPU, not link).
raw_* report the share of the link rate their payload used.

    python -m easgd_ext.bench link                              # world 2, 100mbit, ResNet-18
    python -m easgd_ext.bench link --rate 1gbit --world 4 --json link.json
    python -m easgd_ext.bench link --variants local,easgd_int8,stream_int2,raw_int8
    python -m easgd_ext.bench link --quick                      # a short check, ~1 minute
    python -m easgd_ext.bench link --rate 1gbit --gloo-chunk-kib 1024  # larger pieces, fast link
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from easgd_ext.settings import GLOO_CHUNK_ENV, check_gloo_chunk_bytes
from easgd_ext.stats import ring_allreduce_bytes

from .cli import RATIO_LINE, count, prog, ratio_cell, speedups
from .netns import RANK_IFACE, ShapedNetwork, interface_bytes, machine_cpu_jiffies, rate_bits, unavailable
from .report import warn_if_noisy, write_records

WIRES = ("fp32", "bf16", "int8", "int4", "int2")
VARIANTS = ("local", "ddp", "pma", *(f"easgd_{w}" for w in WIRES),
            *(f"stream_{w}" for w in ("fp32", "int8", "int4", "int2")),
            *(f"stream_{w}_d2" for w in ("int8", "int4", "int2")),
            "downpour_int8", "periodic_fp32", "diloco_fp32", "diloco_int8", "diloco_int4",
            "sdiloco_int8", "sdiloco_int4_d2", "raw_fp32", "raw_int8", "raw_int8_whole")
STREAMED = ("stream_", "sdiloco_")
RAW = ("raw_fp32", *(f"raw_{w}{whole}" for w in ("int8", "int4", "int2") for whole in ("", "_whole")))
QUICK = {"rate": "1gbit", "world": 2, "windows": 1, "ddp_steps": 1,
         "variants": "local,easgd_fp32,easgd_int8,stream_int8,raw_fp32,raw_int8"}
BETA = 0.9
PEERS = ("ddp", "pma", "local")


def wire_dtype(wire: str) -> str:
    return {"fp32": "float32", "bf16": "bfloat16"}.get(wire, wire)


def build_averager(name: str, params: Any, args: argparse.Namespace) -> Any:
    """The easgd_ext averager a variant name stands for."""
    import easgd_ext

    kind, wire = name.split("_")[:2]
    comm_dtype = wire_dtype(wire)
    if kind == "easgd":
        return easgd_ext.ElasticAverager(params, tau=args.tau, beta=BETA, comm_dtype=comm_dtype)
    if kind == "stream":
        return easgd_ext.ElasticAverager(params, tau=args.tau, beta=BETA, comm_dtype=comm_dtype,
                                         fragments=args.fragments, delay=stream_delay(name))
    if kind == "downpour":
        return easgd_ext.DownpourAverager(params, tau=args.tau, comm_dtype=comm_dtype)
    if kind == "periodic":
        return easgd_ext.PeriodicAverager(params, tau=args.tau, comm_dtype=comm_dtype)
    if kind == "diloco":
        return easgd_ext.DiLoCoAverager(params, tau=args.tau, comm_dtype=comm_dtype)
    if kind == "sdiloco":
        return easgd_ext.DiLoCoAverager(params, tau=args.tau, comm_dtype=comm_dtype,
                                        fragments=args.fragments, delay=stream_delay(name))
    raise ValueError(f"unknown variant {name!r}")


def stream_delay(name: str) -> int:
    """A streamed variant's delay: ``stream_int8`` 1, ``stream_int8_d2`` 2."""
    return 2 if name.endswith("_d2") else 1


def exchange_bytes(wire: str, params: list[torch.nn.Parameter], args: argparse.Namespace) -> int:
    """The bytes one rank sends in one whole exchange of ``wire``, as the averager counts them."""
    with torch.no_grad():
        shadow = [torch.nn.Parameter(p.detach().clone()) for p in params]
    return sum(build_averager(f"easgd_{wire}", shadow, args).bytes_per_step())


class Meter:
    """Times one variant's windows: step time, the time the call after opt.step() blocked,
    the host's wait for collectives, the interface's byte counters, the CPU time this rank's
    process used (its compute and its Gloo threads) and the share of the machine's CPUs that
    were busy (every rank and the kernel's network processing)."""

    def __init__(self, after: Callable[[], object] | None, averager: Any = None) -> None:
        self.after, self.averager = after, averager
        self.windows: list[dict[str, float]] = []

    def window(self, steps: int, step: Callable[[], None]) -> None:
        waited0 = self.averager.stats.wait_seconds if self.averager is not None else 0.0
        sent0, received0 = interface_bytes()
        busy0, ticks0 = machine_cpu_jiffies()
        cpu0 = time.process_time()
        blocked = 0.0
        start = time.perf_counter()
        for _ in range(steps):
            step()
            if self.after is not None:
                t = time.perf_counter()
                self.after()
                blocked += time.perf_counter() - t
        seconds = time.perf_counter() - start
        cpu = time.process_time() - cpu0
        busy1, ticks1 = machine_cpu_jiffies()
        sent1, received1 = interface_bytes()
        waited = (self.averager.stats.wait_seconds - waited0) if self.averager is not None else 0.0
        self.windows.append({"step": seconds / steps, "blocked": blocked, "waited": waited,
                             "sent": (sent1 - sent0) / steps, "received": (received1 - received0) / steps,
                             "cpu": cpu / steps,
                             "busy": (busy1 - busy0) / (ticks1 - ticks0) if ticks1 > ticks0 else None,
                             "steps": steps})


def spread(xs: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(xs), min(xs), max(xs)


def run_training_variant(name: str, base: torch.nn.Module, images: torch.Tensor,
                         labels: torch.Tensor, args: argparse.Namespace, world: int) -> dict:
    import torch.nn.functional as F

    model = copy.deepcopy(base)
    averager, after, expected, steps = None, None, None, args.tau
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    if name == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
        params = list(model.parameters())
        expected, steps = ring_allreduce_bytes(4 * numel, world), args.ddp_steps
    elif name == "pma":
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

        pma = PeriodicModelAverager(period=args.tau, warmup_steps=0)
        after = lambda: pma.average_parameters(params)  # noqa: E731
        expected = ring_allreduce_bytes(4 * numel, world) / args.tau
    elif name != "local":
        averager = build_averager(name, params, args)
        after = averager.step
        expected = sum(averager.bytes_per_step()) / args.tau
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=True)

    def step() -> None:
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    meter = Meter(after, averager)
    meter.window(steps, step)  # warm-up: allocations, the first exchange
    meter.windows.clear()
    for _ in range(args.windows):
        meter.window(steps, step)
    if averager is not None:
        averager.flush()  # what a delayed exchange left in flight: every rank alike
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    record = summarize(name, meter.windows, args, world, numel, expected)
    record["parameters_finite"] = finite
    if name == "ddp":
        record["blocked_seconds_per_window"] = None  # inside backward: not separable
    return record


def run_raw(name: str, base: torch.nn.Module, args: argparse.Namespace, world: int,
            kept: dict[str, list[Any]]) -> dict:
    """The collectives of one whole exchange of a wire alone, on its bytes (``raw_int8``, or
    ``raw_int8_whole``: its records sent whole)."""
    wire = name.split("_")[1]
    whole = name.endswith("_whole")
    params = list(base.parameters())
    numel = sum(p.numel() for p in params)
    total = exchange_bytes(wire, params, args)
    if wire == "fp32":
        buffer = torch.randn(numel)

        def collective() -> None:
            kept[name] = [dist.all_reduce(buffer, async_op=True)]
            kept[name][0].wait()
    else:
        # The quantized wire sends (p - 1) records in its all_to_all and (p - 1) in its
        # all_gather: a record is total / (2 (p - 1)) bytes. Over Gloo it moves them in
        # collectives of check_gloo_chunk_bytes(None) per peer (two run at a time); raw_<wire>_whole
        # sends each record whole, in one all_to_all and one all_gather.
        record = total // (2 * (world - 1))
        cut = record if whole else check_gloo_chunk_bytes(None)
        sizes = [min(cut, record - lo) for lo in range(0, record, cut)]
        sends = [torch.randint(0, 255, (world * n,), dtype=torch.uint8) for n in sizes]
        received = [torch.empty_like(t) for t in sends]
        gathered = [torch.empty_like(t) for t in sends]

        def collective() -> None:
            works = [dist.all_to_all_single(r, t, async_op=True) for r, t in zip(received, sends)]
            for w in works:
                w.wait()
            gathers = [dist.all_gather_into_tensor(g, t[:n], async_op=True)
                       for g, t, n in zip(gathered, sends, sizes)]
            for w in gathers:
                w.wait()
            kept[name] = works + gathers

    meter = Meter(collective)
    meter.window(1, lambda: None)
    meter.windows.clear()
    for _ in range(args.windows):
        meter.window(1, lambda: None)
    record = summarize(name, meter.windows, args, world, numel, total)
    seconds = record["seconds"]
    record["link_share"] = total * 8 / (args.rate_bits * seconds) if seconds else None
    record["parameters_finite"] = True
    return record


def summarize(name: str, windows: list[dict[str, float]], args: argparse.Namespace, world: int,
              numel: int, expected: float | None) -> dict:
    steps = [w["step"] for w in windows]
    median, low, high = spread(steps)
    # Over all windows: a streamed exchange's bytes straddle each window's edges.
    total_steps = sum(w["steps"] for w in windows)
    sent = sum(w["sent"] * w["steps"] for w in windows) / total_steps
    record = {
        "name": name, "device": "cpu", "numel": numel, "dtype": "float32", "seconds": median,
        "GBps": None, "ratios": {}, "min_seconds": low, "max_seconds": high,
        "spread": (high - low) / median if median else 0.0,
        "blocked_seconds_per_window": statistics.median(w["blocked"] for w in windows),
        "waited_seconds_per_window": statistics.median(w["waited"] for w in windows),
        "sent_bytes_per_step": sent,
        "cpu_seconds_per_step": statistics.median(w["cpu"] for w in windows),
        "machine_busy": _median_known([w["busy"] for w in windows]),
        "received_bytes_per_step": sum(w["received"] * w["steps"] for w in windows) / total_steps,
        "expected_bytes_per_step": expected,
        "wire_vs_expected": sent / expected if expected else None,
        "window_steps": windows[0]["steps"], "windows": len(windows), "tau": args.tau,
        "world_size": world, "rate": args.rate, "rate_bits": args.rate_bits,
        "model": args.model, "batch": args.batch, "image_size": args.image_size,
        "fragments": args.fragments if name.startswith(STREAMED) else 1,
        "delay": stream_delay(name) if name.startswith(STREAMED) else 0,
        "gloo_chunk_bytes": check_gloo_chunk_bytes(None),
    }
    return record


def _median_known(xs: list[float | None]) -> float | None:
    known = [x for x in xs if x is not None]
    return statistics.median(known) if known else None


def worker(rank: int, args: argparse.Namespace) -> int:
    """One rank, inside its namespace: joins Gloo over the shaped interface, measures every
    variant, and rank 0 writes the records to --out."""
    import torchvision

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # subnormal weights would slow the CPU steps for no reason
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}:{args.port}", rank=rank,
                            world_size=args.world, timeout=timedelta(seconds=args.time_limit))
    kept: dict[str, list[Any]] = {}
    records = []
    try:
        torch.manual_seed(args.seed)
        base = getattr(torchvision.models, args.model)(weights=None)
        gen = torch.Generator().manual_seed(args.seed)
        images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen)
        labels = torch.randint(0, 1000, (args.batch,), generator=gen)
        for name in args.variant_list:
            start = time.perf_counter()
            if name.startswith("raw_"):
                records.append(run_raw(name, base, args, args.world, kept))
            else:
                records.append(run_training_variant(name, base, images, labels, args, args.world))
            if rank == 0:
                r = records[-1]
                print(f"  {name:<15} {r['seconds'] * 1e3:9.1f} ms   ({time.perf_counter() - start:.0f} s)",
                      file=sys.stderr, flush=True)
        done = torch.zeros(1)
        kept["drain"] = [dist.all_reduce(done, async_op=True)]
        kept["drain"][0].wait()
    finally:
        dist.destroy_process_group()
        import gc

        gc.collect()
    if rank == 0:
        Path(args.out).write_text(json.dumps(records))
    del kept
    return 0


def add_ratios(records: list[dict]) -> None:
    seconds = {r["name"]: r["seconds"] for r in records if not r["name"].startswith("raw_")}
    for r in records:
        if not r["name"].startswith("raw_"):
            r["ratios"] = speedups(seconds, r["name"], list(PEERS))
    by_name = {r["name"]: r for r in records}
    fp32 = by_name.get("easgd_fp32")
    for r in records:
        if fp32 and r["name"].startswith(("easgd_", *STREAMED)) and fp32["blocked_seconds_per_window"]:
            r["blocked_vs_easgd_fp32"] = r["blocked_seconds_per_window"] / fp32["blocked_seconds_per_window"]
        if "local" in by_name and not r["name"].startswith("raw_"):
            r["vs_local_step"] = r["seconds"] / by_name["local"]["seconds"]


def print_table(records: list[dict]) -> None:
    r0 = records[0]
    print(f"\n{r0['model']}, batch {r0['batch']}, {r0['image_size']}px, world {r0['world_size']}, "
          f"{r0['rate']} links (tbf, both directions), tau {r0['tau']}, {r0['numel']:,} parameters; "
          f"median of {r0['windows']} windows per variant (spread: (max - min) / median); "
          f"quantized pieces of {r0['gloo_chunk_bytes'] // 1024} KiB per peer")
    print(f"{RATIO_LINE}; x local: step time / the local step's; blocked/waited: ms per window "
          "of tau steps; sent: bytes per step per rank on the interface / bytes_per_step(); "
          "cpu: rank 0's process CPU ms per step; busy: the machine's CPUs busy")
    print(f"{'variant':<15}{'step ms':>9}{'spread':>8}{'x local':>8}{'vs ddp':>8}{'vs pma':>8}"
          f"{'blocked':>9}{'waited':>8}{'sent MB':>9}{'/expected':>10}{'link':>7}{'cpu':>7}{'busy':>6}")
    for r in records:
        blocked = r["blocked_seconds_per_window"]
        share = r.get("link_share")
        ratio = r["wire_vs_expected"]
        note = "" if r["parameters_finite"] else "  (parameters became non-finite)"
        print(f"{r['name']:<15}{r['seconds'] * 1e3:>9.1f}{r['spread']:>7.0%} "
              f"{(format(r['vs_local_step'], '.2f') + 'x') if 'vs_local_step' in r else '-':>8}"
              f"{ratio_cell(r['ratios'], 'vs_ddp', 8)}{ratio_cell(r['ratios'], 'vs_pma', 8)}"
              f"{'-' if blocked is None else format(blocked * 1e3, '.0f'):>9}"
              f"{r['waited_seconds_per_window'] * 1e3:>8.0f}{r['sent_bytes_per_step'] / 1e6:>9.2f}"
              f"{'-' if ratio is None else format(ratio, '.3f'):>10}"
              f"{'-' if share is None else format(share, '.0%'):>7}"
              f"{r['cpu_seconds_per_step'] * 1e3:>7.0f}"
              f"{'-' if r['machine_busy'] is None else format(r['machine_busy'], '.0%'):>6}{note}")
    by_name = {r["name"]: r for r in records}
    lines = []
    if "blocked_vs_easgd_fp32" in by_name.get("easgd_int8", {}):
        lines.append(f"easgd_int8 blocks {by_name['easgd_int8']['blocked_vs_easgd_fp32']:.2f}x as "
                     "long per window as easgd_fp32")
    streamed = [r for r in records if r["name"].startswith(STREAMED) and "vs_local_step" in r]
    if streamed:
        best = min(streamed, key=lambda r: r["seconds"])
        lines.append(f"best streamed wire: {best['name']} at {best['vs_local_step']:.2f}x the local step")
    for r in records:
        if r.get("link_share") is not None:
            lines.append(f"{r['name']}: its payload at {r['link_share']:.0%} of the link rate")
    for line in lines:
        print(line)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog("link"), description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", default="100mbit", help="each link's rate, both directions "
                        "(tc units: kbit, mbit, gbit; default %(default)s)")
    parser.add_argument("--world", type=count, default=2, help="ranks (default %(default)s)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated, run in this order (default: all of them)")
    parser.add_argument("--model", default="resnet18", help="a torchvision model (default %(default)s)")
    parser.add_argument("--batch", type=count, default=4)
    parser.add_argument("--image-size", type=count, default=64)
    parser.add_argument("--tau", type=count, default=8)
    parser.add_argument("--fragments", type=count, default=8, help="the streamed variants' fragments")
    parser.add_argument("--windows", type=count, default=3, help="measured windows per variant")
    parser.add_argument("--ddp-steps", type=count, default=2, help="ddp's steps per window")
    parser.add_argument("--threads", type=count, default=None,
                        help="torch threads per rank (default: the CPUs shared among the ranks)")
    parser.add_argument("--gloo-chunk-kib", type=count, default=None,
                        help="the quantized wire's piece per peer over Gloo, in KiB (sets "
                             f"{GLOO_CHUNK_ENV} for the ranks; default 64: right up to a few "
                             "hundred Mbit/s; 1024 at 1 Gbit/s)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=count, default=1800,
                        help="seconds before the ranks are stopped (default %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a short check: {', '.join(f'{k}={v}' for k, v in QUICK.items())}")
    parser.add_argument("--json", type=Path, help="write the records (a JSON list) here")
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)  # set for the ranks
    parser.add_argument("--master", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        given = set(a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv or sys.argv[1:]))
        for key, value in QUICK.items():
            if key not in given:
                setattr(args, key, value)
    try:
        args.rate_bits = rate_bits(args.rate)
    except ValueError as e:
        parser.error(f"--rate: {e}")
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_list if v not in VARIANTS and v not in RAW]
    if unknown or not args.variant_list:
        parser.error(f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from "
                     f"{', '.join(VARIANTS)}, {', '.join(r for r in RAW if r not in VARIANTS)}")
    if args.world < 2:
        parser.error("--world: a link needs 2 or more ranks")
    if args.gloo_chunk_kib is not None and args.gloo_chunk_kib < 4:
        parser.error(f"--gloo-chunk-kib must be at least 4, got {args.gloo_chunk_kib}")
    if args.gloo_chunk_kib is None:
        try:
            check_gloo_chunk_bytes(None)
        except ValueError as e:
            parser.error(str(e))
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.world)
    return args


def launch(args: argparse.Namespace) -> list[dict] | None:
    """Builds the shaped network, runs one rank per namespace, returns rank 0's records (None
    when a rank failed or the time limit passed; the reason is printed)."""
    with tempfile.TemporaryDirectory() as tmp, ShapedNetwork(args.world, args.rate_bits) as net:
        out = os.path.join(tmp, "records.json")
        port = 20000 + os.getpid() % 20000
        env = dict(os.environ, GLOO_SOCKET_IFNAME=RANK_IFACE, PYTHONUNBUFFERED="1")
        if args.gloo_chunk_kib is not None:
            env[GLOO_CHUNK_ENV] = str(args.gloo_chunk_kib * 1024)
        forwarded = [a for a in (sys.argv[1:] if args.argv is None else args.argv) if a != "--quick"]
        procs = []
        try:
            for rank in range(args.world):
                cmd = net.exec_prefix(rank) + [
                    sys.executable, "-m", "easgd_ext.bench.link", *forwarded,
                    "--rank", str(rank), "--master", net.address(0), "--port", str(port),
                    "--out", out, "--rate", args.rate, "--world", str(args.world),
                    "--variants", ",".join(args.variant_list), "--windows", str(args.windows),
                    "--ddp-steps", str(args.ddp_steps), "--threads", str(args.threads)]
                procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
            deadline = time.monotonic() + args.time_limit + 60
            while any(p.poll() is None for p in procs):
                failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode not in (None, 0)]
                if failed:
                    print(f"bench link: rank {failed[0][0]} exited with {failed[0][1]}; stopping "
                          "the others", file=sys.stderr)
                    return None
                if time.monotonic() > deadline:
                    print(f"bench link: the ranks ran past --time-limit {args.time_limit} s; "
                          "stopped", file=sys.stderr)
                    return None
                time.sleep(0.2)
            failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
            if failed:
                print(f"bench link: rank {failed[0][0]} exited with {failed[0][1]}", file=sys.stderr)
                return None
            return json.loads(Path(out).read_text())
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # the same cleanup as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.rank is not None:
        return worker(args.rank, args)
    reason = unavailable()
    if reason is not None:
        print(f"bench link: {reason}", file=sys.stderr)
        return 1
    args.argv = argv
    previous = signal.signal(signal.SIGTERM, _sigterm)
    import easgd_ext
    from .report import machine_load

    load, cpus = machine_load()
    print(f"easgd_ext {easgd_ext.__version__}, torch {torch.__version__}, {cpus} CPUs "
          f"(load {load:.1f}), {args.world} ranks x {args.threads} threads, links {args.rate}",
          file=sys.stderr)
    try:
        records = launch(args)
    except KeyboardInterrupt:
        print("bench link: interrupted; the namespaces are deleted", file=sys.stderr)
        return 130
    except RuntimeError as e:  # a namespace, link or qdisc that could not be made
        print(f"bench link: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    if records is None:
        return 1
    add_ratios(records)
    warn_if_noisy(records)
    print_table(records)
    write_records(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
