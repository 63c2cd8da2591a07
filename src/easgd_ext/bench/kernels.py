"""Effective bandwidth of the fused elastic kernels against their peers, in one run.

For each update and each parameter dtype it times the fused kernels:
  elastic_difference   wire = alpha (x - c)                   (sync, before the all-reduce)
  sync_apply           x -= d; c += reduced                   (sync, after the all-reduce)
  sync                 both together: one synchronous exchange less its all-reduce
  async                e = alpha (x - c); x -= e; c += e
and, for the whole sync and async updates, the same update done by:
  eager    torch eager ops on the flat buffers (in place, preallocated temporaries)
  foreach  torch._foreach_* over ResNet-50's 161 parameter tensors (what an optimizer-style
           per-parameter implementation does)
  compile  torch.compile (Inductor) of the eager function
and reports GB/s (bytes each update must move: inputs read once, outputs written once), the
fraction of the copy ceiling measured in the same run (best of a multi-threaded memcpy and
torch's copy_ on CPU; a device-to-device copy_ on CUDA) and the speed-up over each peer.

    python -m easgd_ext.bench kernels           # CPU, and CUDA too when present
    python -m easgd_ext.bench kernels --device cuda --numel 25557032 124000000 --json out.json
    python benchmarks/kernel_bandwidth.py ...   # the same
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import easgd_ext
from easgd_ext import ops
from easgd_ext._native import native, tensor_ref

from .report import write_records
from .timing import interleaved_medians, median_seconds

ALPHA = 0.225
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def compiled_fns():
    def pre(x, c, wire):
        d = ((x.float() - c) * ALPHA).to(wire.dtype)
        wire.copy_(d)
        x.copy_((x.float() - d.float()).to(x.dtype))

    def post(c, wire):
        c.add_(wire.float())

    def exchange(x, c):
        xf = x.float()
        x_new = (xf - ALPHA * (xf - c)).to(x.dtype)
        c.add_(xf - x_new.float())
        x.copy_(x_new)

    return {name: torch.compile(fn, dynamic=False) for name, fn in
            (("pre", pre), ("post", post), ("async", exchange))}


# ---- measurement -------------------------------------------------------------------------------
def copy_ceiling(n: int, device: torch.device, reps: int) -> tuple[float, str]:
    """Bytes read + written per second by the fastest plain copy of a float32 buffer of n."""
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    candidates = {"torch copy_": lambda: dst.copy_(src)}
    if device.type == "cpu":
        refs = (tensor_ref("dst", dst), tensor_ref("src", src))
        candidates["parallel memcpy"] = lambda: native.memcpy(*refs, torch.get_num_threads())
    best = {name: 2 * n * 4 / median_seconds(fn, device, reps) for name, fn in candidates.items()}
    name = max(best, key=best.get)
    return best[name], name


def bytes_moved(update: str, n: int, dtype: torch.dtype) -> int:
    """Bytes the fused kernels read and write (the wire buffer has the parameters' dtype)."""
    sx = torch.finfo(dtype).bits // 8
    diff, apply = 2 * sx + 4, 3 * sx + 8
    return n * {"elastic_difference": diff, "sync_apply": apply, "sync": diff + apply,
                "async": 2 * (sx + 4)}[update]


def run_case(n: int, dtype: torch.dtype, device: torch.device, reps: int, copy_bw: float,
             shapes: list[torch.Size] | None, compiled: dict | None) -> list[dict]:
    b = make_buffers(n, dtype, device, shapes)
    x, c, w, t = b.x, b.c, b.wire, b.tmp
    # The peers do the sync exchange the way a plain torch implementation would (x -= d before
    # the all-reduce, c += sum after); the fused pair leaves x alone until the sum is known to be
    # finite, so a bad exchange can be skipped, at the cost of reading x and c once more.
    impls: dict[str, dict[str, Callable[[], object]]] = {
        "elastic_difference": {"fused": lambda: ops.elastic_difference(x, c, w, ALPHA)},
        "sync_apply": {"fused": lambda: ops.sync_apply(x, c, w, ALPHA)},
        "sync": {"fused": lambda: (ops.elastic_difference(x, c, w, ALPHA),
                                   ops.sync_apply(x, c, w, ALPHA)),
                 "eager": lambda: (eager_pre(x, c, w, t), eager_post(c, w))},
        "async": {"fused": lambda: ops.async_exchange(x, c, ALPHA),
                  "eager": lambda: eager_async(x, c, t)},
    }
    if b.lists:
        xs, cs, ws, ts = (b.lists[k] for k in ("x", "c", "wire", "tmp"))
        impls["sync"]["foreach"] = lambda: (foreach_pre(xs, cs, ws, ts), foreach_post(cs, ws))
        impls["async"]["foreach"] = lambda: foreach_async(xs, cs, ts)
    if compiled is not None:
        impls["sync"]["compile"] = lambda: (compiled["pre"](x, c, w), compiled["post"](c, w))
        impls["async"]["compile"] = lambda: compiled["async"](x, c)

    records = []
    dtype_name = str(dtype).removeprefix("torch.")
    for update, variants in impls.items():
        seconds = interleaved_medians(variants, device, reps)
        nbytes = bytes_moved(update, n, dtype)
        ratios = {"vs_copy": nbytes / seconds["fused"] / copy_bw}
        ratios.update({f"vs_{peer}": s / seconds["fused"] for peer, s in seconds.items()
                       if peer != "fused"})
        for name, s in seconds.items():
            records.append({
                "name": update if name == "fused" else f"{update}/{name}",
                "device": str(device), "numel": n, "dtype": dtype_name, "seconds": s,
                "GBps": nbytes / s / 1e9, "ratios": ratios if name == "fused" else {},
            })
    return records


def print_table(records: list[dict], copy_bw: float, copy_name: str) -> None:
    print(f"\ncopy ceiling: {copy_bw / 1e9:.1f} GB/s ({copy_name})")
    print(f"{'update':<20}{'device':<8}{'dtype':<10}{'numel':>11}{'fused ms':>10}{'GB/s':>8}"
          f"{'of copy':>9}{'vs eager':>10}{'vs foreach':>12}{'vs compile':>12}")
    for r in records:
        if "/" in r["name"]:
            continue
        q = r["ratios"]
        cell = lambda k: f"{q[k]:.2f}x" if k in q else "-"  # noqa: E731
        print(f"{r['name']:<20}{r['device']:<8}{r['dtype']:<10}{r['numel']:>11}"
              f"{r['seconds'] * 1e3:>10.3f}{r['GBps']:>8.1f}{q['vs_copy']:>8.0%} "
              f"{cell('vs_eager'):>10}{cell('vs_foreach'):>12}{cell('vs_compile'):>12}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: the CPU, and the GPU too when one is usable")
    parser.add_argument("--numel", type=int, nargs="+", default=None,
                        help="elements per buffer (default: ResNet-50's 25.56M parameters)")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=None, help="timed runs per variant (median)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    parser.add_argument("--no-foreach", action="store_true", help="skip the _foreach peer")
    parser.add_argument("--json", type=Path, help="write the records (DESIGN.md section 4) here")
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
    compiled = None if args.no_compile else compiled_fns()
    print(f"easgd_ext {easgd_ext.__version__}, torch {torch.__version__}, CPU ISA {info['cpu_isa']}, "
          f"{torch.get_num_threads()} CPU threads"
          + (f", GPU {torch.cuda.get_device_name()}" if cuda_ok else ""))

    from tqdm import tqdm

    records: list[dict] = []
    cases = [(d, n, DTYPES[t]) for d in devices for n in sizes for t in args.dtype]
    ceilings = {}
    for device, n, dtype in tqdm(cases, desc="kernel bandwidth", unit="case", file=sys.stderr):
        reps = args.reps or (11 if device.type == "cpu" else 50)
        if (device, n) not in ceilings:
            ceilings[(device, n)] = copy_ceiling(n, device, reps)
        use_shapes = shapes if shapes and n == resnet_numel else None
        records += run_case(n, dtype, device, reps, ceilings[(device, n)][0], use_shapes, compiled)
    for (device, n), (bw, name) in ceilings.items():
        print_table([r for r in records if r["device"] == str(device) and r["numel"] == n], bw, name)
    write_records(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
