"""Effective bandwidth of the fused elastic kernels against their peers, in one run.

For each update and each parameter dtype it times the fused kernels:
  elastic_difference   wire = alpha (x - c)                   (sync, before the all-reduce)
  sync_apply           x -= d; c += reduced                   (sync, after the all-reduce)
  sync                 both together: one synchronous exchange less its all-reduce
  async                e = alpha (x - c); x -= e; c += e
  outer_apply          the outer optimizer's apply: m = mu m + sum; c += lr (sum + mu m); x -= d
  int8_send            the 8-bit wire's send: v = alpha (x - c) + residual, block-quantized
  int8_apply           its apply: x -= d; c += deq(sum); residual = v - deq(what was sent)
  int4_*, int2_*       the same at 4 and 2 bits a value (packed two or four to a byte)
and, for the whole sync and async updates and the 8-bit send and apply, the same update done by:
  eager    torch eager ops on the flat buffers (in place, preallocated temporaries)
  foreach  torch._foreach_* over ResNet-50's 161 parameter tensors (what an optimizer-style
           per-parameter implementation does)
  compile  torch.compile (Inductor, fullgraph, compiled afresh for each dtype and size; a
           recompile or a fallback to eager is an error, never a silent slow peer)
and the copy ceiling: the best of torch's copy_, the package's vectorized copy kernel (the
fused kernels' own launch shape) and, on CPU, a multi-threaded memcpy, each copying a float32
buffer of the same length, timed round-robin with the variants in the same loop; and the read
ceiling, the best of torch summing two float32 buffers of that length and (CPU) the package's
native one-pass read of them (the same bytes, all read): a kernel that reads far more than it
writes (int8_send reads 12 bytes per float32 element and writes 1) meets that rate first.

Reported: GB/s (bytes each update must move: inputs read once, outputs written once), "of
copy" (the time the copy ceiling needs for those bytes / the kernel's time), "of read" (the
same at the read ceiling) and the speedup over
each peer (peer time / fused time, > 1: the fused kernel is faster).

    python -m easgd_ext.bench kernels           # CPU, and CUDA too when present
    python -m easgd_ext.bench kernels --device cuda --numel 25557032 1.24e8 --json out.json
    python benchmarks/kernel_bandwidth.py ...   # the same
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import easgd_ext
from easgd_ext import ops
from easgd_ext._native import native, num_threads, stream_of, tensor_ref
from easgd_ext.ops.reference import QUANT_BLOCK
from easgd_ext.settings import COMM_DTYPES, QUANT_NAMES, quant_bits

from .cli import RATIO_LINE, count, prog, ratio_cell, speedup, speedups
from .report import write_records
from .timing import interleaved_medians

ALPHA = 0.225
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
READ_NAMES = {"read/torch": "torch sums", "read/native": "native one-pass read"}
COPY_NAMES = {"copy/torch": "torch copy_", "copy/native": "native copy kernel",
              "copy/memcpy": "multi-threaded memcpy"}


def resnet50_shapes() -> list[torch.Size]:
    import torchvision

    return [p.shape for p in torchvision.models.resnet50(weights=None).parameters()]


@dataclass
class Buffers:
    """Flat buffers for one (size, dtype) case, plus the same memory cut into per-parameter
    tensors for the _foreach peer."""
    x: torch.Tensor
    c: torch.Tensor
    wire: torch.Tensor
    tmp: torch.Tensor  # float32 scratch for the eager peers
    lists: dict[str, list[torch.Tensor]] = field(default_factory=dict)


def make_buffers(n: int, dtype: torch.dtype, device: torch.device,
                 shapes: list[torch.Size] | None) -> Buffers:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, generator=g, device=device).to(dtype)
    c = torch.randn(n, generator=g, device=device)
    b = Buffers(x, c, torch.randn(n, generator=g, device=device).to(dtype),
                torch.empty(n, device=device))
    if shapes is not None:
        # Separate allocations, as a model's parameters are: no shared flat storage.
        b.lists = {name: [t.new_empty(s).copy_(torch.randn(s, generator=g, device=device))
                          for s in shapes]
                   for name, t in (("x", x), ("c", c), ("wire", b.wire), ("tmp", b.tmp))}
    return b


# ---- the updates, as each implementation does them ------------------------------------------
def eager_pre(x, c, wire, tmp):
    if wire.dtype == torch.float32:  # d straight into the wire buffer
        torch.sub(x, c, out=wire).mul_(ALPHA)
    else:  # d in float32 first, then rounded once, as the fused kernel does
        wire.copy_(torch.sub(x, c, out=tmp).mul_(ALPHA))
    x.sub_(wire)


def eager_post(c, wire):
    c.add_(wire)


def eager_async(x, c, tmp):
    torch.sub(x, c, out=tmp).mul_(ALPHA)
    x.sub_(tmp)
    c.add_(tmp)


def foreach_pre(xs, cs, ws, ts):
    torch._foreach_copy_(ts, xs)
    torch._foreach_sub_(ts, cs)
    torch._foreach_mul_(ts, ALPHA)
    torch._foreach_copy_(ws, ts)
    torch._foreach_sub_(xs, ws)


def foreach_post(cs, ws):
    torch._foreach_add_(cs, ws)


def foreach_async(xs, cs, ts):
    torch._foreach_copy_(ts, xs)
    torch._foreach_sub_(ts, cs)
    torch._foreach_mul_(ts, ALPHA)
    torch._foreach_sub_(xs, ts)
    torch._foreach_add_(cs, ts)


def eager_int8_send(x, c, r, q, scales, tmp, scratch):
    """The 8-bit send as torch ops, in place in float32 scratch (whole blocks only: the tail of
    < 256 elements is left out): v = alpha (x - c) + r; per block m = max |v|, scale = m / 127,
    q = clamp(round(v * (127 / m)), -127, 127), the divisions correctly rounded as the kernel's."""
    m = q.numel()
    v = torch.sub(x[:m], c[:m], out=tmp[:m]).mul_(ALPHA).add_(r[:m]).view(-1, QUANT_BLOCK)
    absmax = torch.abs(v, out=scratch.view(-1, QUANT_BLOCK)).amax(1)
    torch.div(absmax, 127, out=scales)
    inv = torch.where(absmax > 0, torch.full_like(absmax, 127.0).div_(absmax), 0)
    q.copy_(v.mul_(inv[:, None]).round_().clamp_(-127, 127).view(-1))


def eager_int8_apply(x, c, r, q_sent, s_sent, q_got, s_got, tmp, deq):
    """The 8-bit apply as torch ops into float32 scratch: d recomputed, r += d - deq(sent),
    x -= d, c += deq(sum)."""
    m = q_sent.numel()
    d = torch.sub(x[:m], c[:m], out=tmp[:m]).mul_(ALPHA)
    blocks = deq.view(-1, QUANT_BLOCK)
    r[:m].add_(d).sub_(torch.mul(q_sent.view(-1, QUANT_BLOCK), s_sent[:, None], out=blocks).view(-1))
    x[:m].sub_(d)
    c[:m].add_(torch.mul(q_got.view(-1, QUANT_BLOCK), s_got[:, None], out=blocks).view(-1))


def int8_peer_buffers(n: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Residual, int8 values, scales and float32 scratch ("deq") of the whole blocks of n, for
    the eager 8-bit peers."""
    blocks = n // QUANT_BLOCK
    g = torch.Generator(device=device).manual_seed(1)
    q = lambda: torch.randint(-127, 128, (blocks * QUANT_BLOCK,), generator=g, device=device,
                              dtype=torch.int8)
    return {"r": torch.randn(n, generator=g, device=device), "q_sent": q(), "q_got": q(),
            "s_sent": torch.rand(blocks, generator=g, device=device),
            "s_got": torch.rand(blocks, generator=g, device=device),
            "deq": torch.empty(blocks * QUANT_BLOCK, device=device)}


def compile_pre(x, c, wire):
    d = ((x.float() - c) * ALPHA).to(wire.dtype)
    wire.copy_(d)
    x.copy_((x.float() - d.float()).to(x.dtype))


def compile_post(c, wire):
    c.add_(wire.float())


def compile_async(x, c):
    xf = x.float()
    x_new = (xf - ALPHA * (xf - c)).to(x.dtype)
    c.add_(xf - x_new.float())
    x.copy_(x_new)


# ---- the torch.compile peer, which must never fall back silently --------------------------------
class CompileFallbackError(RuntimeError):
    """The torch.compile peer recompiled past its limit or fell back to eager: its time would
    be eager's under compile's name, so the benchmark stops instead."""


_LIMIT_HIT = re.compile(r"(recompile|cache.size).?limit", re.IGNORECASE)


def fallback_count() -> int:
    """How many times, so far in this process, Dynamo gave up on a frame (ran it eagerly): frames
    that did not convert, and recompile-limit hits (by torch.compile's own counters)."""
    from torch._dynamo.utils import counters

    frames = counters.get("frames", {})
    failed = frames.get("total", 0) - frames.get("ok", 0)
    hits = sum(n for reason, n in counters.get("unimplemented", {}).items()
               if _LIMIT_HIT.search(str(reason)))
    return max(failed, 0) + hits


def check_no_fallback(before: int, what: str = "the torch.compile peer") -> None:
    """Raises :class:`CompileFallbackError` if Dynamo fell back since ``fallback_count()`` read
    ``before``."""
    now = fallback_count()
    if now > before:
        raise CompileFallbackError(
            f"{what} fell back to eager or recompiled past torch._dynamo.config's recompile "
            f"limit ({now - before} time(s)): its timing would not be torch.compile's. Each "
            "(dtype, size) case compiles afresh, so this is a bug in the benchmark or a guard "
            "that fails on every call; run with TORCH_LOGS=recompiles to see why")


class CompiledPeer:
    """The eager updates under ``torch.compile(fullgraph=True, dynamic=False)``, compiled for
    one (dtype, size) case after ``torch._dynamo.reset()``. Calls that hit the recompile limit
    raise :class:`CompileFallbackError`; :meth:`check` (after timing) raises it if Dynamo
    fell back in any other way."""

    def __init__(self, backend: str = "inductor") -> None:
        torch._dynamo.reset()
        self._before = fallback_count()
        self._fns = {name: torch.compile(fn, backend=backend, dynamic=False, fullgraph=True)
                     for name, fn in (("pre", compile_pre), ("post", compile_post),
                                      ("async", compile_async))}

    def __getitem__(self, name: str) -> Callable[..., None]:
        fn = self._fns[name]

        def call(*args: torch.Tensor) -> None:
            try:
                fn(*args)
            except CompileFallbackError:
                raise
            except Exception as exc:  # Dynamo's own FailOnRecompileLimitHit, Unsupported...
                if _LIMIT_HIT.search(f"{type(exc).__name__} {exc}"):
                    raise CompileFallbackError(
                        f"the torch.compile peer ({name}) hit the recompile limit "
                        f"({type(exc).__name__}: {exc}); it would have run eagerly") from exc
                raise
        return call

    def check(self) -> None:
        check_no_fallback(self._before, "the torch.compile peer")


@contextlib.contextmanager
def strict_dynamo() -> Iterator[None]:
    """Dynamo settings under which a recompile-limit hit raises instead of falling back
    (``fail_on_recompile_limit_hit`` where this torch has it) and compile errors are never
    suppressed; restored on leaving."""
    changes: dict[str, Any] = {"suppress_errors": False}
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(torch._dynamo.config, name):
            changes[name] = True
            break
    import torch._inductor.config as inductor_config

    # Compile in this process: a pool of compile workers warming up in the background would
    # steal cores from the timed loop (on a 2-core machine every kernel read 8 ms).
    with torch._dynamo.config.patch(**changes), inductor_config.patch(compile_threads=1):
        yield


# ---- measurement -------------------------------------------------------------------------------
def copy_candidates(n: int, device: torch.device) -> dict[str, Callable[[], object]]:
    """Ways to copy a float32 buffer of ``n``: the copy ceiling is the fastest of them."""
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    refs = (tensor_ref("dst", dst), tensor_ref("src", src))
    launch = native.prepare.copy(*refs)
    fns: dict[str, Callable[[], object]] = {
        "copy/torch": lambda: dst.copy_(src),
        "copy/native": lambda: native.run([launch], stream_of(device), num_threads()),
    }
    if device.type == "cpu":
        fns["copy/memcpy"] = lambda: native.memcpy(*refs, num_threads())
    return fns


def read_candidates(a: torch.Tensor, b: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Ways to read two float32 buffers of the same length (the copy's bytes, none written):
    the read ceiling is the fastest. A kernel that mostly reads is measured against it too."""
    fns: dict[str, Callable[[], object]] = {"read/torch": lambda: (a.sum(), b.sum())}
    if a.device.type == "cpu":  # the package's one-pass native reader (an integer test per value)
        refs = (tensor_ref("a", a), tensor_ref("b", b))
        fns["read/native"] = lambda: [native.count_nonfinite(r, num_threads()) for r in refs]
    return fns


def copy_ceiling(n: int, device: torch.device, reps: int) -> tuple[float, str]:
    """Bytes read + written per second by the fastest copy of a float32 buffer of n, and which
    copy it was (the candidates timed round-robin; for benchmarks without a loop of their own)."""
    seconds = interleaved_medians(copy_candidates(n, device), device, reps)
    best = min(seconds, key=seconds.get)
    return 2 * n * 4 / seconds[best], COPY_NAMES[best]


def bytes_moved(update: str, n: int, dtype: torch.dtype) -> int:
    """Bytes the fused kernels read and write (the wire buffer has the parameters' dtype; the
    8-bit wire's records carry one float32 scale per 256 values)."""
    sx = torch.finfo(dtype).bits // 8
    diff, apply = 2 * sx + 4, 3 * sx + 8
    wire, _, part = update.partition("_")
    if wire in QUANT_WIDTHS:
        q = n * QUANT_WIDTHS[wire] // 8  # the values' bytes
        if part == "send":  # read x, c, residual; write q and the scales
            return n * (sx + 8) + q + n // 64
        # apply: read x, c, residual, q sent, q summed (and their scales); write x, c, residual
        return n * (2 * sx + 16) + 2 * q + n // 32
    if update == "outer_apply":  # read x, c, momentum, the sum (x's dtype); write x, c, momentum
        return n * (3 * sx + 16)
    return n * {"elastic_difference": diff, "sync_apply": apply, "sync": diff + apply,
                "async": 2 * (sx + 4)}[update]


QUANT_WIDTHS = {name: quant_bits(COMM_DTYPES[name]) for name in QUANT_NAMES}  # int8: 8, ...
UPDATES = ("elastic_difference", "sync_apply", "sync", "async", "outer_apply",
           *(f"{wire}_{part}" for wire in QUANT_WIDTHS for part in ("send", "apply")))


def quantized_launches(x: torch.Tensor, c: torch.Tensor, bits: int = 8) -> tuple[Any, Any, list[torch.Tensor]]:
    """The quantized wire's send and apply (``bits`` a value) over x and c (one rank: the records
    it sends are the sum it applies), prepared once; and the buffers they point into (kept
    alive by the caller)."""
    n = x.numel()
    _, record = native.prepare.quant_layout(n, 1, bits)
    residual = torch.zeros(n, device=x.device)
    sent = torch.zeros(record, dtype=torch.uint8, device=x.device)
    gathered = torch.zeros(record, dtype=torch.uint8, device=x.device)
    status = torch.zeros(4, device=x.device)
    send = native.prepare.quantized_send(tensor_ref("x", x), tensor_ref("center", c), None,
                                         tensor_ref("residual", residual), tensor_ref("records", sent),
                                         1, ALPHA, nonfinite=tensor_ref("me_bad", status[0:1]), bits=bits)
    native.run([send], stream_of(x.device), num_threads())
    gathered.copy_(sent)
    guard = native.prepare.Guard(tensor_ref("bad_ranks", status[1:2]), tensor_ref("me_bad", status[0:1]), 0, 1)
    apply = native.prepare.quantized_apply(tensor_ref("x", x), tensor_ref("center", c), None,
                                           tensor_ref("residual", residual), tensor_ref("sent", sent),
                                           tensor_ref("gathered", gathered), 1, ALPHA, guard=guard, bits=bits)
    return send, apply, [residual, sent, gathered, status]


def run_case(n: int, dtype: torch.dtype, device: torch.device, reps: int,
             shapes: list[torch.Size] | None, compile_backend: str | None) -> list[dict]:
    """Every variant of one (size, dtype) case and the copy candidates, timed round-robin in one
    loop; returns the records (updates, their peers, the copies)."""
    b = make_buffers(n, dtype, device, shapes)
    x, c, w, t = b.x, b.c, b.wire, b.tmp
    # The peers do the sync exchange the way a plain torch implementation would (x -= d before
    # the all-reduce, c += sum after); the fused pair leaves x alone until the sum is known to be
    # finite, so a bad exchange can be skipped, at the cost of reading x and c once more.
    fns: dict[str, Callable[[], object]] = {
        "elastic_difference": lambda: ops.elastic_difference(x, c, w, ALPHA),
        "sync_apply": lambda: ops.sync_apply(x, c, w, ALPHA),
        "sync": lambda: (ops.elastic_difference(x, c, w, ALPHA), ops.sync_apply(x, c, w, ALPHA)),
        "sync/eager": lambda: (eager_pre(x, c, w, t), eager_post(c, w)),
        "async": lambda: ops.async_exchange(x, c, ALPHA),
        "async/eager": lambda: eager_async(x, c, t),
    }
    momentum = torch.zeros_like(c)
    fns["outer_apply"] = lambda: ops.outer_apply(x, c, momentum, w, ALPHA, 0.7, 0.9, 1.0, 0.0)
    stream = stream_of(device)
    keep_alive = []
    for wire, bits in QUANT_WIDTHS.items():
        send_q, apply_q, buffers = quantized_launches(x, c, bits)
        keep_alive += buffers
        fns[f"{wire}_send"] = lambda launch=send_q: native.run([launch], stream, num_threads())
        fns[f"{wire}_apply"] = lambda launch=apply_q: native.run([launch], stream, num_threads())
    if n >= QUANT_BLOCK:  # the eager peers do whole blocks only
        p8 = int8_peer_buffers(n, device)
        fns["int8_send/eager"] = lambda: eager_int8_send(x, c, p8["r"], p8["q_sent"], p8["s_sent"], t,
                                                         p8["deq"])
        fns["int8_apply/eager"] = lambda: eager_int8_apply(x, c, p8["r"], p8["q_sent"], p8["s_sent"],
                                                           p8["q_got"], p8["s_got"], t, p8["deq"])
    fns.update(read_candidates(c, momentum))
    if b.lists:
        xs, cs, ws, ts = (b.lists[k] for k in ("x", "c", "wire", "tmp"))
        fns["sync/foreach"] = lambda: (foreach_pre(xs, cs, ws, ts), foreach_post(cs, ws))
        fns["async/foreach"] = lambda: foreach_async(xs, cs, ts)
    fns.update(copy_candidates(n, device))

    with strict_dynamo() if compile_backend else contextlib.nullcontext():
        compiled = CompiledPeer(compile_backend) if compile_backend else None
        if compiled is not None:
            pre, post, exchange = compiled["pre"], compiled["post"], compiled["async"]
            fns["sync/compile"] = lambda: (pre(x, c, w), post(c, w))
            fns["async/compile"] = lambda: exchange(x, c)
        seconds = interleaved_medians(fns, device, reps)
        if compiled is not None:
            compiled.check()

    del keep_alive
    copies = {k: s for k, s in seconds.items() if k.startswith("copy/")}
    best = min(copies, key=copies.get)
    copy_bw = 2 * n * 4 / copies[best]
    read_bw = 2 * n * 4 / min(s for k, s in seconds.items() if k.startswith("read/"))
    dtype_name = str(dtype).removeprefix("torch.")
    records = []
    for update in UPDATES:
        nbytes = bytes_moved(update, n, dtype)
        mine = {k: s for k, s in seconds.items() if k == update or k.startswith(update + "/")}
        for name, s in mine.items():
            ratios = {"vs_copy": speedup(nbytes / copy_bw, s), "vs_read": speedup(nbytes / read_bw, s)}
            if name == update:
                ratios.update({f"vs_{peer.split('/', 1)[1]}": speedup(ps, s)
                               for peer, ps in mine.items() if peer != update})
            records.append({"name": name, "device": str(device), "numel": n, "dtype": dtype_name,
                            "seconds": s, "GBps": nbytes / s / 1e9, "ratios": ratios,
                            "copy_ceiling": COPY_NAMES[best], "copy_GBps": copy_bw / 1e9,
                            "read_GBps": read_bw / 1e9})
    reads = {k: s for k, s in seconds.items() if k.startswith("read/")}
    for group, fastest in ((copies, best), (reads, min(reads, key=reads.get))):
        for name, s in group.items():
            records.append({"name": name, "device": str(device), "numel": n, "dtype": "float32",
                            "seconds": s, "GBps": 2 * n * 4 / s / 1e9,
                            "ratios": speedups(group, name), "case_dtype": dtype_name,
                            "best": name == fastest})
    return records


def print_table(records: list[dict]) -> None:
    print(f"\n{RATIO_LINE}; 'of copy': the copy ceiling's time for the same bytes / ours; "
          "'of read': the same at the read ceiling")
    print("copy ceiling per case: the best of " + ", ".join(COPY_NAMES.values())
          + " (float32, timed with the variants); read ceiling: the best of torch sums and a native "
          "one-pass read of two float32 buffers")
    for r in records:
        if r["name"].startswith("copy/") and r["best"]:
            reads = ", ".join(f"{READ_NAMES[o['name']]} {o['GBps']:.1f}" for o in records
                              if o["name"].startswith("read/") and o["device"] == r["device"]
                              and o["numel"] == r["numel"] and o["case_dtype"] == r["case_dtype"])
            others = ", ".join(f"{COPY_NAMES[o['name']]} {o['GBps']:.1f}" for o in records
                               if o["name"].startswith("copy/") and not o["best"]
                               and o["device"] == r["device"] and o["numel"] == r["numel"]
                               and o["case_dtype"] == r["case_dtype"])
            print(f"  {r['device']:<6} {r['case_dtype']:<9} {r['numel']:>11}: {r['GBps']:.1f} GB/s "
                  f"({COPY_NAMES[r['name']]}; {others}); reads: {reads}")
    print(f"{'update':<20}{'device':<8}{'dtype':<10}{'numel':>11}{'fused ms':>10}{'GB/s':>8}"
          f"{'of copy':>9}{'of read':>9}{'speedup over eager':>20}{'over foreach':>14}{'over compile':>14}")
    for r in records:
        if "/" in r["name"]:
            continue
        q = r["ratios"]
        print(f"{r['name']:<20}{r['device']:<8}{r['dtype']:<10}{r['numel']:>11}"
              f"{r['seconds'] * 1e3:>10.3f}{r['GBps']:>8.1f}{q['vs_copy']:>9.0%}{q['vs_read']:>9.0%}"
              f"{ratio_cell(q, 'vs_eager', 20)}{ratio_cell(q, 'vs_foreach', 14)}"
              f"{ratio_cell(q, 'vs_compile', 14)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog("kernels"), description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: the CPU, and the GPU too when one is usable")
    parser.add_argument("--numel", type=count, nargs="+", default=None,
                        help="elements per buffer, e.g. 1e6 25557032 (default: ResNet-50's "
                             "25.56M parameters)")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--reps", type=count, default=None,
                        help="timed runs per variant (median; default 11 on CPU, 50 on CUDA)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compile peer (default inductor; "
                             "'eager' only to test the harness quickly)")
    parser.add_argument("--no-foreach", action="store_true", help="skip the _foreach peer")
    parser.add_argument("--json", type=Path, help="write the records (a JSON list) here")
    args = parser.parse_args(argv)

    info = easgd_ext.build_info()
    devices = [torch.device("cpu")] if args.device in ("auto", "cpu") else []
    cuda_ok = torch.cuda.is_available() and info["cuda"]
    if args.device == "cuda" and not cuda_ok:
        parser.error("--device cuda needs a GPU and easgd_ext built with CUDA "
                     f"(build_info: cuda={info['cuda']}, torch.cuda.is_available()={torch.cuda.is_available()})")
    if args.device in ("auto", "cuda") and cuda_ok:
        devices.append(torch.device("cuda"))

    shapes = None if args.no_foreach else resnet50_shapes()
    resnet_numel = sum(s.numel() for s in shapes) if shapes else 25_557_032
    sizes = args.numel or [resnet_numel]
    print(f"easgd_ext {easgd_ext.__version__}, torch {torch.__version__}, CPU ISA {info['cpu_isa']}, "
          f"{torch.get_num_threads()} CPU threads"
          + (f", GPU {torch.cuda.get_device_name()}" if cuda_ok else ""))

    from easgd_ext.progress import bar as tqdm

    records: list[dict] = []
    cases = [(d, n, DTYPES[t]) for d in devices for n in dict.fromkeys(sizes)
             for t in dict.fromkeys(args.dtype)]
    for device, n, dtype in tqdm(cases, desc="kernel bandwidth", unit="case", file=sys.stderr):
        reps = args.reps or (11 if device.type == "cpu" else 50)
        use_shapes = shapes if shapes and n == resnet_numel else None
        records += run_case(n, dtype, device, reps, use_shapes,
                            None if args.no_compile else args.compile_backend)
    for device in devices:
        for n in dict.fromkeys(sizes):
            print_table([r for r in records if r["device"] == str(device) and r["numel"] == n])
    write_records(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
