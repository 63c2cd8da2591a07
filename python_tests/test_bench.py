"""The benchmark front door runs and writes what it promises, in the one ratio convention
(speed itself is not tested: every check here holds on any machine)."""

from __future__ import annotations

import argparse
import json
import time

import pytest
import torch

from easgd_ext.bench import __main__ as bench
from easgd_ext.bench import cli, kernels
from easgd_ext.ops import reference

SCHEMA = {"name", "device", "numel", "dtype", "seconds", "GBps", "ratios"}


def by_name(records: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in records}


# ---- command lines ---------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, program", [
    (["kernels"], "python -m easgd_ext.bench kernels"),
    (["comm"], "python -m easgd_ext.bench comm"),
    (["async"], "python -m easgd_ext.bench async"),
    (["comm", "--mode", "async"], "python -m easgd_ext.bench async"),
    (["step"], "python -m easgd_ext.bench step"),
])
def test_usage_names_the_command(argv, program, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv + ["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {program} ")
    assert "__main__.py" not in out and "DESIGN" not in out


def test_unknown_benchmark_is_an_error(capsys):
    assert bench.main(["disks"]) == 2
    assert "unknown benchmark 'disks'" in capsys.readouterr().err


def test_counts_may_be_written_as_floats():
    assert cli.count("1e6") == 1_000_000
    assert cli.count("2.56e7") == 25_600_000
    assert cli.count("161") == 161
    for bad in ("0", "0.5", "1.5", "-3", "inf", "nan", "many"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.count(bad)


@pytest.mark.parametrize("argv, message", [
    (["kernels", "--numel", "0.5"], "argument --numel: '0.5' is not a whole number"),
    (["kernels", "--numel", "0"], "argument --numel: '0' is less than 1"),
    (["comm", "--sizes", "1.5e0"], "argument --sizes: '1.5e0' is not a whole number"),
    (["comm", "--sizes", "resnet51"], "argument --sizes: 'resnet51' is not a number"),
    (["comm", "--sizes", "resnet50:0"], "argument --sizes: '0' is less than 1"),
    (["comm", "--mode", "async", "--sizes", "1e-3"], "argument --sizes: '1e-3' is not a whole number"),
    (["step", "--block", "15"], "--block 15: give a multiple of --tau 4"),
])
def test_bad_numbers_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


# ---- kernels -------------------------------------------------------------------------------------------
def test_kernels_small_records_and_speedups(tmp_path, capsys, monkeypatch):
    # The eager async peer made artificially slow: its ratio must say the fused kernel is faster.
    eager_async = kernels.eager_async

    def slow_eager_async(x, c, tmp):
        time.sleep(0.05)  # far above any scheduling hiccup of the fused kernel
        eager_async(x, c, tmp)

    monkeypatch.setattr(kernels, "eager_async", slow_eager_async)
    out = tmp_path / "kernels.json"
    assert bench.main(["kernels", "--device", "cpu", "--numel", "1e4", "--dtype", "float32",
                       "--reps", "3", "--no-foreach", "--compile-backend", "eager",
                       "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert all(SCHEMA <= r.keys() and r["numel"] == 10_000 for r in records)
    r = by_name(records)
    assert set(r) == {"elastic_difference", "sync_apply", "sync", "sync/eager", "sync/compile",
                      "async", "async/eager", "async/compile", "outer_apply", "int8_send", "int8_apply",
                      "int4_send", "int4_apply", "int2_send", "int2_apply", "int8_send/eager", "int8_apply/eager", "copy/torch", "copy/native", "copy/memcpy",
                      "read/torch", "read/native"}
    # The 8-bit kernels are judged against the copy and read ceilings of the bytes they move.
    for name in ("int8_send", "int8_apply"):
        nbytes = kernels.bytes_moved(name, 10_000, torch.float32)
        assert r[name]["ratios"]["vs_copy"] == pytest.approx(nbytes / (r[name]["copy_GBps"] * 1e9) / r[name]["seconds"])
        assert r[name]["ratios"]["vs_read"] == pytest.approx(nbytes / (r[name]["read_GBps"] * 1e9) / r[name]["seconds"])
        assert r[name]["read_GBps"] * 1e9 == pytest.approx(2 * 10_000 * 4 / min(
            r[k]["seconds"] for k in ("read/torch", "read/native")))
        assert r[name]["ratios"]["vs_eager"] == pytest.approx(r[f"{name}/eager"]["seconds"] / r[name]["seconds"])
    # Every ratio is peer_seconds / our_seconds.
    for update in ("sync", "async"):
        for peer in ("eager", "compile"):
            assert r[update]["ratios"][f"vs_{peer}"] == pytest.approx(
                r[f"{update}/{peer}"]["seconds"] / r[update]["seconds"])
    assert r["async"]["ratios"]["vs_eager"] > 1  # the slowed peer
    # The copy ceiling: the fastest of the three copies timed in the same loop.
    copies = {k: v for k, v in r.items() if k.startswith("copy/")}
    best = min(copies.values(), key=lambda c: c["seconds"])
    assert [c["best"] for c in copies.values()].count(True) == 1 and best["best"]
    assert r["async"]["copy_ceiling"] == kernels.COPY_NAMES[best["name"]]
    ceiling_seconds = kernels.bytes_moved("async", 10_000, torch.float32) / (8 * 10_000) * best["seconds"]
    assert r["async"]["ratios"]["vs_copy"] == pytest.approx(ceiling_seconds / r["async"]["seconds"])
    text = capsys.readouterr().out
    assert "speedup over eager" in text and cli.RATIO_LINE in text and "copy ceiling" in text
    assert "read ceiling" in text and "of read" in text


def test_the_eager_8bit_peers_do_what_the_kernels_do():
    """The eager peers time the same work: their quantized values, scales and updates match the
    float64-checked reference on whole blocks (fresh random inputs)."""
    g = torch.Generator().manual_seed(7)
    n = 64 * kernels.QUANT_BLOCK + 100  # and a tail the peers leave out
    x, c, r = (torch.randn(n, generator=g) for _ in range(3))
    block = slice(3 * kernels.QUANT_BLOCK, 4 * kernels.QUANT_BLOCK)
    x[block], c[block], r[block] = 1.5, 1.5, 0.0  # a block of zeros: scale 0, q 0
    p = kernels.int8_peer_buffers(n, torch.device("cpu"))
    tmp = torch.empty(n)
    kernels.eager_int8_send(x, c, r, p["q_sent"], p["s_sent"], tmp, p["deq"])
    whole = p["q_sent"].numel()
    q, scale = reference.quantize_blocks((kernels.ALPHA * (x - c) + r)[:whole])
    assert torch.equal(p["q_sent"], q) and torch.equal(p["s_sent"], scale)
    assert p["s_sent"][3] == 0 and not p["q_sent"][block].any()

    x0, c0, r0 = x.double(), c.double(), r.double()
    kernels.eager_int8_apply(x, c, r, p["q_sent"], p["s_sent"], p["q_got"], p["s_got"], tmp, p["deq"])
    d = (kernels.ALPHA * (x0 - c0))[:whole]
    own = reference.dequantize_blocks(p["q_sent"], p["s_sent"]).double()
    summed = reference.dequantize_blocks(p["q_got"], p["s_got"]).double()
    for got, want in ((x, x0[:whole] - d), (c, c0[:whole] + summed), (r, r0[:whole] + d - own)):
        assert torch.allclose(got[:whole].double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(x[whole:].double(), x0[whole:])  # the tail: left out


def recompile_limit(n: int):
    """Dynamo's recompile limit set to ``n`` in the block (through its own config.patch:
    pytest's monkeypatch deletes the entry from Dynamo's config module on undo)."""
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    return torch._dynamo.config.patch(**{name: n})


def test_compile_peer_hitting_the_recompile_limit_is_an_error():
    c = torch.zeros(64)
    with recompile_limit(1), kernels.strict_dynamo():
        peer = kernels.CompiledPeer(backend="eager")
        peer["async"](torch.ones(64), c)
        with pytest.raises(kernels.CompileFallbackError, match="recompile limit"):
            peer["async"](torch.ones(64, dtype=torch.bfloat16), c)  # a second graph: over the limit
    torch._dynamo.reset()


def test_silent_compile_fallback_is_detected():
    # Without fullgraph (not how the peer compiles), Dynamo falls back to eager silently at the
    # recompile limit; the check run after timing must still see it.
    torch._dynamo.reset()
    before = kernels.fallback_count()
    fn = torch.compile(kernels.compile_async, backend="eager", dynamic=False)
    c = torch.zeros(64)
    with recompile_limit(1), torch._dynamo.config.patch(suppress_errors=False):
        fn(torch.ones(64), c)
        kernels.check_no_fallback(before)  # one graph: fine
        fn(torch.ones(64, dtype=torch.bfloat16), c)  # runs, eagerly
    with pytest.raises(kernels.CompileFallbackError):
        kernels.check_no_fallback(before)
    torch._dynamo.reset()


# ---- comm ------------------------------------------------------------------------------------------------
def test_comm_world_1_host_overhead_case(tmp_path, capsys):
    out, png = tmp_path / "comm.json", tmp_path / "comm.png"
    assert bench.main(["comm", "--worlds", "1", "--sizes", "resnet50:1", "--reps", "3",
                       "--json", str(out), "--plot", str(png)]) == 0
    records = json.loads(out.read_text())
    r = by_name(records)
    assert set(r) == {"easgd_fp32", "easgd_bf16", "easgd_int8", "easgd_f4", "allreduce_fp32",
                      "allreduce_bf16", "torch_flat", "pytorch_periodic", "per_param"}
    for rec in records:
        assert SCHEMA <= rec.keys()
        assert rec["world_size"] == 1 and rec["numel"] == 161 and rec["tensors"] == 161
        assert 0 < rec["host_seconds"] <= rec["seconds"]
    for name, same in (("easgd_fp32", "allreduce_fp32"), ("easgd_bf16", "allreduce_bf16")):
        ratios = r[name]["ratios"]
        assert set(ratios) - {"vs_easgd_fp32"} == {
            "vs_allreduce", "vs_allreduce_fp32", "vs_allreduce_bf16", "vs_torch_flat",
            "vs_pytorch_periodic", "vs_per_param"}
        for peer in ("allreduce_fp32", "allreduce_bf16", "torch_flat", "pytorch_periodic", "per_param"):
            assert ratios[f"vs_{peer}"] == pytest.approx(r[peer]["seconds"] / r[name]["seconds"])
        assert ratios["vs_allreduce"] == ratios[f"vs_{same}"]
        assert r[name]["host_over_allreduce_s"] == pytest.approx(
            r[name]["host_seconds"] - r[same]["host_seconds"])
    assert png.stat().st_size > 5_000
    text = capsys.readouterr().out
    assert cli.RATIO_LINE in text and "over torch_flat" in text and "resnet50:1" in text


def test_comm_two_ranks_exit_cleanly(tmp_path):
    # Two spawned Gloo ranks; a rank dying at exit (SIGABRT) would fail mp.spawn here.
    out = tmp_path / "comm.json"
    assert bench.main(["comm", "--worlds", "2", "--sizes", "1e4", "--reps", "1", "--peers",
                       "torch_flat", "--json", str(out)]) == 0
    r = by_name(json.loads(out.read_text()))
    assert set(r) == {"easgd_fp32", "easgd_bf16", "easgd_int8", "easgd_f4", "allreduce_fp32",
                      "allreduce_bf16", "torch_flat"}
    assert all(rec["world_size"] == 2 and rec["numel"] == 10_000 for rec in r.values())
    assert r["easgd_fp32"]["ratios"]["vs_torch_flat"] == pytest.approx(
        r["torch_flat"]["seconds"] / r["easgd_fp32"]["seconds"])
    # Bytes on the network per rank and call: a ring all-reduce at p = 2 sends its payload once;
    # the 8-bit wire about a quarter of it; one fragment of four about a quarter.
    fp32 = r["easgd_fp32"]["bytes_per_rank"]
    assert fp32 >= 4 * 10_000 and r["allreduce_fp32"]["bytes_per_rank"] == 4 * 10_000
    assert r["easgd_int8"]["bytes_vs_easgd_fp32"] <= 0.3
    assert r["easgd_f4"]["bytes_vs_easgd_fp32"] <= 0.3


def test_async_benchmark_small(tmp_path, capsys):
    out, png = tmp_path / "async.json", tmp_path / "async.png"
    assert bench.main(["async", "--sizes", "1e4", "--reps", "2", "--sharded",
                       "--json", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "shared_easgd" in text and "sharded_easgd" in text and "vs_floor" in text
    assert cli.RATIO_LINE in text
    records = json.loads(out.read_text())
    assert all(SCHEMA <= r.keys() for r in records)
    names = {(r["transport"], r["name"]) for r in records}
    assert {("shared", "shared_easgd"), ("shared", "shared_downpour"), ("shared", "floor"),
            ("sharded", "sharded_easgd"), ("sharded", "pingpong")} <= names
    shared = {r["name"]: r for r in records if r["transport"] == "shared"}
    easgd = shared["shared_easgd"]
    assert easgd["seconds"] > 0
    assert easgd["ratios"]["vs_floor"] == pytest.approx(shared["floor"]["seconds"] / easgd["seconds"])
    for peer in ("kernel_unlocked", "torch_eager"):
        assert easgd["ratios"][f"vs_{peer}"] == pytest.approx(shared[peer]["seconds"] / easgd["seconds"])
    for workers in (1, 2):
        sharded = {r["name"]: r for r in records
                   if r["transport"] == "sharded" and r["workers"] == workers}
        assert sharded["sharded_easgd"]["ratios"]["vs_pingpong"] == pytest.approx(
            sharded["pingpong"]["seconds"] / sharded["sharded_easgd"]["seconds"])
    assert png.stat().st_size > 10_000


# ---- step --------------------------------------------------------------------------------------------------
def test_step_benchmark_small(tmp_path, capsys):
    out = tmp_path / "step.json"
    assert bench.main(["step", "--device", "cpu", "--model", "resnet18", "--batch", "2",
                       "--image-size", "32", "--rounds", "2", "--world", "2", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    r = by_name(records)
    assert list(r) and set(r) == {"step", "easgd", "easgd_stream", "easgd_tau1", "torch_flat"}
    step = r["step"]["seconds"]
    for rec in records:
        assert SCHEMA <= rec.keys()
        assert rec["device"] == "cpu" and rec["world_size"] == 2 and rec["parameters_finite"]
        assert rec["numel"] == 11_689_512 and rec["dtype"] == "float32"
        assert rec["q1_seconds"] <= rec["seconds"] <= rec["q3_seconds"]
        assert rec["overhead_pct"] == pytest.approx((rec["seconds"] / step - 1) * 100)
        if rec["name"] != "step":
            assert rec["ratios"]["vs_step"] == pytest.approx(step / rec["seconds"])
    assert r["easgd_tau1"]["ratios"]["vs_torch_flat"] == pytest.approx(
        r["torch_flat"]["seconds"] / r["easgd_tau1"]["seconds"])
    assert [r[n]["tau"] for n in ("step", "easgd", "easgd_stream", "easgd_tau1", "torch_flat")] == [
        None, 4, 4, 1, 1]
    # The streamed exchange sends a quarter of the model per step (ring all-reduce at p = 2:
    # the payload once), and blocks the loop for less than the whole exchange does.
    whole = 4 * (11_689_512 + 64 * 62)  # float32, each tensor's slot padded to 64 elements
    assert r["easgd"]["peak_bytes_per_step"] >= 4 * 11_689_512
    assert r["easgd_stream"]["peak_bytes_vs_easgd"] <= 1.1 / 4
    assert 0 < r["easgd_stream"]["blocked_seconds_per_window"]
    # Waiting for collectives is part of the blocked time, and only averagers' (Gloo) have it.
    for rec in records:
        assert 0 <= rec["waited_seconds_per_window"] <= rec["blocked_seconds_per_window"] + 1e-6
    assert r["step"]["waited_seconds_per_window"] == r["torch_flat"]["waited_seconds_per_window"] == 0
    assert r["easgd"]["waited_seconds_per_window"] > 0
    assert r["easgd"]["peak_bytes_per_step"] <= whole + 4 * 64
    text = capsys.readouterr().out
    assert "speedup over step" in text and "overhead" in text and "easgd_stream" in text
