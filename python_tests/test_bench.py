"""The benchmark front door runs and writes what it promises (speed itself is not tested)."""

from __future__ import annotations

import json

from easgd_ext.bench import __main__ as bench


def test_comm_benchmark_small(tmp_path, capsys):
    out, png = tmp_path / "comm.json", tmp_path / "comm.png"
    assert bench.main(["comm", "--worlds", "2", "--sizes", "1e4", "--reps", "1", "--peers",
                       "--json", str(out), "--plot", str(png)]) == 0
    records = json.loads(out.read_text())
    names = {r["name"] for r in records}
    assert names == {"easgd_fp32", "easgd_bf16", "allreduce_fp32", "allreduce_bf16"}
    for r in records:
        assert r["world_size"] == 2 and r["numel"] == 10_000 and r["seconds"] > 0
        if r["name"].startswith("easgd"):
            assert set(r["ratios"]) == {"vs_allreduce_fp32", "vs_allreduce_bf16"}
    assert png.stat().st_size > 5_000
    assert "easgd_fp32" in capsys.readouterr().out


def test_unknown_benchmark_is_an_error(capsys):
    assert bench.main(["disks"]) == 2
    assert "unknown benchmark 'disks'" in capsys.readouterr().err


def test_async_benchmark_small(tmp_path, capsys):
    out, png = tmp_path / "async.json", tmp_path / "async.png"
    assert bench.main(["comm", "--mode", "async", "--sizes", "1e4", "--reps", "2", "--sharded",
                       "--json", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "shared_easgd" in text and "sharded_easgd" in text and "vs_floor" in text
    records = json.loads(out.read_text())
    names = {(r["transport"], r["name"]) for r in records}
    assert {("shared", "shared_easgd"), ("shared", "shared_downpour"), ("shared", "floor"),
            ("sharded", "sharded_easgd"), ("sharded", "pingpong")} <= names
    easgd = next(r for r in records if r["name"] == "shared_easgd")
    assert easgd["seconds"] > 0 and {"vs_floor", "vs_kernel_unlocked", "vs_torch_eager"} <= set(easgd["ratios"])
    assert png.stat().st_size > 10_000
