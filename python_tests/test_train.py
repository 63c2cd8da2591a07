"""The training CLI: argument errors, help, the table and plot, and short real runs on 2 spawned
workers."""

from __future__ import annotations

import json
import re

import pytest
import torch

from easgd_ext import data, train


@pytest.mark.parametrize("argv,message", [
    (["--algo", "easgd,sgd"], "--algo: unknown ['sgd']"),
    (["--tau", "0"], "--tau must be at least 1"),
    (["--steps", "5", "--epochs", "1"], "give --steps or --epochs, not both"),
    (["--beta", "1.5"], "stability condition"),
    (["--beta", "1.5"], "pass --allow-unstable to run anyway"),
    (["--beta", "0", "--allow-unstable"], "--beta must be positive"),
    (["--dataset", "cifar10"], "--dataset cifar10 needs --data-root DIR"),
    (["--dataset", "cifar10", "--data-root", "/nonexistent"], "cifar-10-batches-py"),
    (["--momentum", "1.0"], "--momentum must be in [0, 1)"),
    (["--mode", "async", "--algo", "average"], "--algo: average is synchronous only; with --mode async"),
    (["--seed", "-1"], "--seed must be in [0, 2^32), got -1"),
    (["--seed", "5000000000"], "--seed must be in [0, 2^32)"),
    (["--plot", "/nonexistent/dir/x.png"], "--plot /nonexistent/dir/x.png: folder /nonexistent/dir does not exist"),
    (["--json", "/nonexistent/x.json"], "--json /nonexistent/x.json: folder /nonexistent does not exist"),
    (["--data-root", "/tmp"], "--data-root applies to --dataset cifar10"),
    (["--fragments", "0"], "--fragments must be at least 1"),
    (["--delay", "4"], "--delay must be in [0, --tau) = [0, 4)"),
    (["--delay", "1", "--algo", "downpour"], "--delay 1 applies to easgd, eamsgd and diloco"),
    (["--comm-dtype", "int8", "--algo", "average"], "'average' sends the parameters"),
    (["--mode", "async", "--comm-dtype", "bfloat16"], "--comm-dtype applies to --mode sync"),
])
def test_bad_arguments_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_algorithms_by_spaces_or_commas():
    assert train.parse_args(["--algo", "easgd", "eamsgd"]).algos == ["easgd", "eamsgd"]
    assert train.parse_args(["--algo", "easgd,downpour", "average"]).algos == ["easgd", "downpour", "average"]


def test_an_incomplete_cifar_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(SystemExit):
        train.parse_args(["--dataset", "cifar10", "--data-root", str(tmp_path)])
    assert "lacks data_batch_2" in capsys.readouterr().err
    for name in data.CIFAR_FILES:
        (tmp_path / "cifar-10-batches-py" / name).write_bytes(b"not a pickle")
    with pytest.raises(RuntimeError, match="could not be read .* incomplete or corrupt"):
        data.cifar10(tmp_path)


def test_cifar_errors_are_whole_sentences(tmp_path, capsys):
    # The reason and the how-to were once run together: "needs --data-root DIR expected ...".
    with pytest.raises(SystemExit):
        train.parse_args(["--dataset", "cifar10"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("--dataset cifar10 needs --data-root DIR, a folder holding CIFAR-10. "
                        "Download cifar-10-python.tar.gz (the Python version of CIFAR-10) from "
                        "https://www.cs.toronto.edu/~kriz/cifar.html and extract it into DIR; "
                        "that makes DIR/cifar-10-batches-py with data_batch_1..5 and test_batch.")
    with pytest.raises(SystemExit):
        train.parse_args(["--dataset", "cifar10", "--data-root", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--data-root {tmp_path} has no cifar-10-batches-py folder. Download " in err
    assert err.endswith(".")
    with pytest.raises(FileNotFoundError, match=r"folder\. Download .*test_batch\.$"):
        data.cifar10(tmp_path)


def test_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    # One block per option: its flags, then its help (wrapped).
    options = re.split(r"\n  (?=-)", text.split("\noptions:\n")[1].rstrip())
    blocks = {b.split()[0]: " ".join(b.split()) for b in options if b.strip()}
    assert "(default: None)" not in text
    assert {"--seed", "--device", "--dataset", "--allow-unstable"} <= set(blocks)
    for flag, block in blocks.items():
        assert block.count("default") <= 1, block
        assert len(block.split()) > 2, f"{flag} has no help: {block!r}"  # more than FLAG METAVAR
    assert "(default: 1000, unless --epochs)" in blocks["--steps"]
    assert "(default: 4)" in blocks["--workers"] and "(default: 0.9)" in blocks["--beta"]


def test_allow_unstable_reaches_the_averager():
    args = train.parse_args(["--beta", "1.5", "--allow-unstable", "--algo", "easgd"])
    assert args.allow_unstable and args.beta == 1.5
    avg = train.make_averager("easgd", data.make_model("digits"), args)
    # One process: p = 1, so the averager runs with alpha = beta = 1.5 and pulls past the center.
    assert avg.beta == 1.5 and avg.alpha == 1.5
    # Without --allow-unstable the same beta is refused: by the CLI, and by the averager.
    with pytest.raises(SystemExit):
        train.parse_args(["--beta", "1.5", "--algo", "easgd"])
    args.allow_unstable = False
    with pytest.raises(ValueError, match="breaks the stability condition"):
        train.make_averager("easgd", data.make_model("digits"), args)


def fake_results(mode: str) -> list[dict]:
    """Two algorithms' curves as a run reports them; async mode sends no bytes."""
    sent = (lambda i: 0) if mode == "async" else (lambda i: 1_000_000 * i)
    return [{"algo": algo, "steps": [20, 40], "seconds": [0.1, 0.2], "test_error": [0.5, 0.2],
             "bytes_sent": [sent(1), sent(2)], "total_exchanges": [10, 20], "comm_seconds": 0.01,
             "exchanges": 10, "skipped_exchanges": 0} for algo in ("easgd", "downpour")]


def test_async_table_and_plot_show_exchanges_not_bytes(capsys):
    train.print_table(fake_results("async"), "async")
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("easgd", "downpour"))]
    assert [row[6] for row in rows] == ["-", "-"]  # not a network figure of 0.00 MB
    assert train.ASYNC_NOTE in out and "nothing crosses a network" in out
    train.print_table(fake_results("sync"), "sync")
    out = capsys.readouterr().out
    assert "2.00" in out and train.ASYNC_NOTE not in out

    import matplotlib.pyplot as plt

    fig = train.figure(fake_results("async"), "title", "async")
    try:
        right = fig.axes[1]
        assert "exchanges" in right.get_xlabel() and right.get_xscale() == "linear"
        assert [list(line.get_xdata()) for line in right.get_lines()] == [[10, 20], [10, 20]]
    finally:
        plt.close(fig)
    fig = train.figure(fake_results("sync"), "title", "sync")
    try:
        assert fig.axes[1].get_xlabel() == "MB sent, all workers"
        assert fig.axes[1].get_xscale() == "log"
    finally:
        plt.close(fig)


def test_digits_split_and_streams():
    split = data.digits(0)
    assert len(split.train_y) == 1437 and len(split.test_y) == 360
    assert split.train_x.shape[1:] == (1, 8, 8) and 0 <= split.train_x.min() <= split.train_x.max() <= 1
    a = data.Stream(split.train_x, split.train_y, 32, seed=1)
    b = data.Stream(split.train_x, split.train_y, 32, seed=2)
    assert not torch.equal(a.next()[1], b.next()[1]), "workers must draw different streams"
    seen = torch.cat([a.next()[1] for _ in range(100)])
    assert len(seen) == 3200  # wraps around epochs without running dry


def test_two_workers_learn_and_report(tmp_path, capfd):
    out, png = tmp_path / "run.json", tmp_path / "run.png"
    assert train.main(["--workers", "2", "--steps", "300", "--eval-every", "150", "--tau", "4", "--lr", "0.1",
                       "--algo", "easgd,eamsgd,average,sync-sgd", "--plot", str(png),
                       "--json", str(out)]) == 0
    text, err = capfd.readouterr()  # capfd: the spawned workers write to the same stderr
    assert "algorithm" in text and "test error" in text and "eamsgd" in text
    assert text.startswith("digits, 2 workers (sync), tau=4, 300 steps, lr=0.1, wire=param dtype\n")
    # Progress on stderr from the start (it used to be silent until the first progress bar);
    # stdout holds only the report.
    assert err.startswith("starting 2 worker processes (Gloo, CPU)...\n")
    assert "loading digits and building the model...\n" in err
    assert "training easgd, eamsgd, average, sync-sgd: 300 steps per worker" in err
    assert "starting" not in text and "algorithm" not in err
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["steps"] == 300
    by_algo = {r["algo"]: r for r in report["results"]}
    assert set(by_algo) == {"easgd", "eamsgd", "average", "sync-sgd"}
    for algo, r in by_algo.items():
        assert r["steps"] == [150, 300]
        assert r["test_error"][-1] < 0.5, f"{algo} did not learn: {r['test_error']}"  # chance: 0.9
        assert r["bytes_sent"][0] < r["bytes_sent"][1]
        assert r["exchanges"] == (300 if algo == "sync-sgd" else 75)
        every = 1 if algo == "sync-sgd" else 4
        assert r["total_exchanges"] == [150 // every * 2, 300 // every * 2]  # both workers
        assert r["skipped_exchanges"] == 0
    assert png.stat().st_size > 10_000


def test_two_async_workers_learn(tmp_path, capsys):
    out = tmp_path / "async.json"
    assert train.main(["--mode", "async", "--workers", "2", "--steps", "200", "--eval-every", "100",
                       "--lr", "0.1", "--plot", str(tmp_path / "a.png"), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("digits, 2 workers (async), tau=4, 200 steps, lr=0.1, "
                           "shared-memory center\n")
    assert train.ASYNC_NOTE in text
    by_algo = {r["algo"]: r for r in json.loads(out.read_text())["results"]}
    assert set(by_algo) == {"easgd", "eamsgd", "downpour"}
    for algo, r in by_algo.items():
        assert r["test_error"][-1] < 0.5, f"{algo} did not learn: {r['test_error']}"
        assert r["exchanges"] == 50 and r["skipped_exchanges"] == 0
        assert r["total_exchanges"] == [50, 100]


def test_simulated_workers_train_in_one_process(tmp_path, capsys):
    out = tmp_path / "sim.json"
    assert train.main(["--simulate", "--workers", "3", "--algo", "eamsgd,sync-sgd", "--steps", "40",
                       "--eval-every", "20", "--fragments", "2", "--json", str(out),
                       "--plot", str(tmp_path / "sim.png")]) == 0
    results = {r["algo"]: r for r in json.loads(out.read_text())["results"]}
    assert results["eamsgd"]["test_error"][-1] < 0.8  # it learned (chance is 0.9)
    # two fragments every tau = 4 steps; sync-sgd all-reduces its gradients every step
    assert results["eamsgd"]["exchanges"] == 2 * 40 // 4 and results["sync-sgd"]["exchanges"] == 40
    assert "3 workers (sync)" in capsys.readouterr().out


def test_streaming_diloco_on_the_4bit_wire_trains_on_request(tmp_path):
    assert "diloco" not in train.parse_args([]).algos  # the default set is the paper's methods
    out = tmp_path / "diloco.json"
    assert train.main(["--simulate", "--workers", "2", "--algo", "diloco", "--steps", "40",
                       "--eval-every", "20", "--fragments", "2", "--delay", "1", "--comm-dtype", "int4",
                       "--json", str(out), "--plot", str(tmp_path / "d.png")]) == 0
    result = json.loads(out.read_text())["results"][0]
    assert result["algo"] == "diloco" and result["exchanges"] == 2 * 40 // 4
    assert result["test_error"][-1] < 0.8  # it learned (chance is 0.9)


def test_simulate_is_sync_only():
    with pytest.raises(SystemExit):
        train.parse_args(["--simulate", "--mode", "async"])


def test_progress_in_a_log_is_a_line_per_tenth(tmp_path):
    from easgd_ext.progress import LineProgress, bar

    log = tmp_path / "log.txt"
    with log.open("w") as f:
        p = bar(total=100, desc="easgd", unit="step", file=f)
        assert isinstance(p, LineProgress)  # a file is not a terminal
        for _ in range(100):
            p.update(1)
        p.close()
    lines = log.read_text().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("easgd: 100/100 steps") and "\r" not in log.read_text()
