"""The training CLI: argument errors, and a short real run on 2 spawned workers."""

from __future__ import annotations

import json

import pytest
import torch

from easgd_ext import data, train


@pytest.mark.parametrize("argv,message", [
    (["--algo", "easgd,sgd"], "--algo: unknown ['sgd']"),
    (["--tau", "0"], "--tau must be at least 1"),
    (["--steps", "5", "--epochs", "1"], "give --steps or --epochs, not both"),
    (["--beta", "1.5"], "stability condition"),
    (["--dataset", "cifar10"], "--dataset cifar10 needs --data-root DIR"),
    (["--dataset", "cifar10", "--data-root", "/nonexistent"], "cifar-10-batches-py"),
    (["--momentum", "1.0"], "--momentum must be in [0, 1)"),
    (["--mode", "async", "--algo", "average"], "--algo: unknown ['average'] with --mode async"),
    (["--mode", "async", "--comm-dtype", "bfloat16"], "--comm-dtype applies to --mode sync"),
])
def test_bad_arguments_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_digits_split_and_streams():
    split = data.digits(0)
    assert len(split.train_y) == 1437 and len(split.test_y) == 360
    assert split.train_x.shape[1:] == (1, 8, 8) and 0 <= split.train_x.min() <= split.train_x.max() <= 1
    a = data.Stream(split.train_x, split.train_y, 32, seed=1)
    b = data.Stream(split.train_x, split.train_y, 32, seed=2)
    assert not torch.equal(a.next()[1], b.next()[1]), "workers must draw different streams"
    seen = torch.cat([a.next()[1] for _ in range(100)])
    assert len(seen) == 3200  # wraps around epochs without running dry


def test_two_workers_learn_and_report(tmp_path, capsys):
    out, png = tmp_path / "run.json", tmp_path / "run.png"
    assert train.main(["--workers", "2", "--steps", "300", "--eval-every", "150", "--tau", "4", "--lr", "0.1",
                       "--algo", "easgd,eamsgd,average,sync-sgd", "--plot", str(png),
                       "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "algorithm" in text and "test error" in text and "eamsgd" in text
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["steps"] == 300
    by_algo = {r["algo"]: r for r in report["results"]}
    assert set(by_algo) == {"easgd", "eamsgd", "average", "sync-sgd"}
    for algo, r in by_algo.items():
        assert r["steps"] == [150, 300]
        assert r["test_error"][-1] < 0.5, f"{algo} did not learn: {r['test_error']}"  # chance: 0.9
        assert r["bytes_sent"][0] < r["bytes_sent"][1]
        assert r["exchanges"] == (300 if algo == "sync-sgd" else 75)
        assert r["skipped_exchanges"] == 0
    assert png.stat().st_size > 10_000


def test_two_async_workers_learn(tmp_path, capsys):
    out = tmp_path / "async.json"
    assert train.main(["--mode", "async", "--workers", "2", "--steps", "200", "--eval-every", "100",
                       "--lr", "0.1", "--plot", str(tmp_path / "a.png"), "--json", str(out)]) == 0
    assert "2 async workers" in capsys.readouterr().out
    by_algo = {r["algo"]: r for r in json.loads(out.read_text())["results"]}
    assert set(by_algo) == {"easgd", "eamsgd", "downpour"}
    for algo, r in by_algo.items():
        assert r["test_error"][-1] < 0.5, f"{algo} did not learn: {r['test_error']}"
        assert r["exchanges"] == 50 and r["skipped_exchanges"] == 0
