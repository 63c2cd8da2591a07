"""The soak's short form (python -m easgd_ext.bench soak): an elastic job of real Gloo
processes trained through 20 random SIGKILLs and SIGSTOPs, each followed by a replacement that
joins from the center; no hang, every rank ends with the same center and a finite model."""

from __future__ import annotations

import json

import pytest

from easgd_ext.bench.__main__ import main as bench


def test_twenty_faults_no_hang_one_center(tmp_path, capsys):
    out = tmp_path / "soak.json"
    code = bench(["soak", "--faults", "20", "--world", "3", "--exchange-timeout", "2",
                  "--kill-share", "0.7", "--seed", "1", "--json", str(out)])
    record = json.loads(out.read_text())
    assert code == 0, record["problems"]
    assert record["faults"] == 20 and record["hangs"] == 0 and record["problems"] == []
    assert record["kills"] > 0 and record["freezes"] > 0
    # a killed rank is left behind within the survivors' settling (2 s) and a few windows; a
    # frozen one after the exchange timeout as well
    kills = [f for f in record["per_fault"] if f["kind"] == "kill"]
    assert max(f["went_on_seconds"] for f in kills) <= 5.0
    assert record["went_on_seconds"]["max"] <= 2 + 5.0
    assert record["final_test_error"] < 0.5  # it learned (chance is 0.9) through the faults
    assert "hangs: 0; problems: none" in capsys.readouterr().out


def test_soak_arguments_are_checked(capsys):
    for args, message in ((["--world", "1"], "--world must be at least 2"),
                          (["--faults", "0"], "--faults must be at least 1"),
                          (["--kill-share", "2"], "--kill-share must be in [0, 1]")):
        with pytest.raises(SystemExit) as exc:
            bench(["soak", *args])
        assert exc.value.code == 2 and message in capsys.readouterr().err
