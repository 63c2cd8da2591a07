"""The convergence study end to end on its quick grid (both tasks, simulated workers, tuning,
fresh seeds, table, plots, JSON), and its parts that decide what the table says."""

from __future__ import annotations

import json
import math

import pytest
import torch

from easgd_ext import study


def test_quick_study_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "study.json"
    assert study.main(["--quick", "--json", str(out), "--plot-dir", str(tmp_path)]) == 0
    result = json.loads(out.read_text())
    assert set(result["tasks"]) == {"digits", "lm"}
    for name, task in result["tasks"].items():
        assert task["runs"] and all(math.isfinite(r["final"]) for r in task["runs"])
        assert set(task["chosen_lr"]) == set(task["tuning"])
        for r in task["runs"]:
            assert r["seed"] >= 1  # final runs on fresh seeds, never the tuning seed 0
            assert r["mb_sent"] == sorted(r["mb_sent"]) and r["rounds"] == sorted(r["rounds"])
        assert (tmp_path / f"study_{name}.png").stat().st_size > 10_000
    digits = {r["method"]: r for r in result["tasks"]["digits"]["runs"]}
    # sync SGD all-reduces every step; EASGD every tau = 4 steps: 4x fewer rounds and bytes
    assert digits["sync-sgd"]["rounds"][-1] == 4 * digits["easgd"]["rounds"][-1]
    assert digits["sync-sgd"]["mb_sent"][-1] == pytest.approx(4 * digits["easgd"]["mb_sent"][-1], rel=0.01)
    text = capsys.readouterr().out
    assert "bits per byte" in text and "test error" in text


def test_every_method_maps_to_an_averager():
    for method in study.METHODS:
        name, kwargs = study.averager_for(method, 16)
        assert (name is None) == (method == "sync-sgd")
        if name is not None:
            assert kwargs["tau"] == 16
    with pytest.raises(ValueError, match="unknown method"):
        study.averager_for("adam", 4)


def test_summary_reports_mean_and_spread_over_seeds():
    runs = [{"method": "easgd", "workers": 4, "tau": 16, "final": v, "rounds": [10], "mb_sent": [1.0],
             "lr": 0.05, "diverged": False} for v in (0.1, 0.2, 0.3)]
    (row,) = study.summarize({"runs": runs})
    assert row["mean"] == pytest.approx(0.2) and row["std"] == pytest.approx(0.0816, abs=1e-4)
    assert row["seeds"] == 3


def test_bad_arguments_are_usage_errors(tmp_path):
    with pytest.raises(SystemExit):
        study.main(["--seeds", "0"])
    with pytest.raises(SystemExit):
        study.main(["--json", str(tmp_path / "missing" / "x.json")])
    for bad in (["--workers", "1"], ["--taus", "0"], ["--methods", "adam"], ["--wires", "int3"],
                ["--tasks", "lm", "--methods", "downpour"]):  # the lm task has no downpour
        with pytest.raises(SystemExit):
            study.main(bad)


def test_wires_give_each_difference_method_its_own_rows_and_bytes(tmp_path, capsys):
    out = tmp_path / "study.json"
    assert study.main(["--quick", "--tasks", "digits", "--methods", "easgd", "local-sgd",
                       "--wires", "float32", "int4", "--json", str(out), "--plot-dir", str(tmp_path)]) == 0
    task = json.loads(out.read_text())["tasks"]["digits"]
    runs = {study.label(r): r for r in task["runs"]}
    assert set(runs) == {"easgd", "easgd int4", "local-sgd"}  # averaging sends parameters: float only
    assert runs["easgd int4"]["lr"] == runs["easgd"]["lr"]  # tuned once, on the float wire
    assert runs["easgd int4"]["rounds"] == runs["easgd"]["rounds"]
    # 4 bits and a float32 scale per block against 32 bits: between 6x and 8x fewer bytes
    ratio = runs["easgd"]["mb_sent"][-1] / runs["easgd int4"]["mb_sent"][-1]
    assert 6 < ratio < 8, ratio
    assert "easgd int4" in capsys.readouterr().out


def test_a_wire_reaches_the_averager_and_is_refused_where_there_is_no_difference():
    name, kwargs = study.averager_for("diloco", 8, "int2")
    assert name == "diloco" and kwargs["comm_dtype"] == torch.int2 and kwargs["tau"] == 8
    assert "comm_dtype" not in study.averager_for("diloco", 8)[1]
    for method in study.FLOAT_ONLY:
        with pytest.raises(ValueError, match=f"{method!r} has no int8 wire"):
            study.averager_for(method, 8, "int8")
    with pytest.raises(ValueError, match="unknown wire 'int3'"):
        study.averager_for("easgd", 8, "int3")
    assert study.wires_for("sync-sgd", ("int8", "int4")) == ("float32",)


def test_summary_keeps_wires_apart():
    runs = [{"method": "easgd", "wire": wire, "workers": 4, "tau": 16, "final": 0.1, "rounds": [10],
             "mb_sent": [1.0], "lr": 0.05, "diverged": False} for wire in ("float32", "int8", "int8")]
    rows = study.summarize({"runs": runs})
    assert [(r["method"], r["seeds"]) for r in rows] == [("easgd", 1), ("easgd int8", 2)]
