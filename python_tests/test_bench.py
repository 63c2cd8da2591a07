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
