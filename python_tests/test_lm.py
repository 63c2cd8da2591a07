"""The byte-level language-modelling task (easgd_ext.lm): the stdlib corpus and its split, the
transformer's shape and causality, the per-worker batch streams, and that bits per byte start
near 8 and fall when the default model is trained for a short while."""

from __future__ import annotations

import math
import os
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from easgd_ext import lm

STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


@pytest.fixture(scope="module")
def corpus() -> lm.Corpus:
    return lm.load_corpus()


# ---------------------------------------------------------------- files and corpus


def test_stdlib_files_are_stdlib_sources_sorted_without_tests_or_site_packages() -> None:
    files = lm.stdlib_files()
    rel = [f.relative_to(STDLIB).as_posix() for f in files]
    for f in files:
        f.resolve().relative_to(STDLIB)  # raises if a link leads out of the stdlib
    assert len(files) > 100
    assert rel == sorted(rel)
    assert all(r.endswith(".py") for r in rel)
    skipped = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    assert not [r for r in rel if skipped & set(r.split("/")[:-1])]
    assert "os.py" in rel and "json/__init__.py" in rel
    if (STDLIB / "test" / "test_os.py").exists():
        assert "test/test_os.py" not in rel


def test_stdlib_files_exclusions_on_a_made_up_tree(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    outside = tmp_path / "elsewhere.py"
    outside.write_text("x = 1\n")
    for name in ["b.py", "a/z.py", "a/notes.txt", "site-packages/x.py", "dist-packages/x.py",
                 "test/t.py", "a/tests/u.py", "idlelib/i.py", "a/__pycache__/c.py",
                 "config-3.11-x86_64-linux-gnu/python-config.py",
                 "_sysconfigdata__linux_x86_64-linux-gnu.py"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("pass\n")
    os.symlink(outside, root / "link_out.py")
    os.symlink(tmp_path, root / "dir_link")  # a directory link out of the tree
    got = [f.relative_to(root).as_posix() for f in lm.stdlib_files(root)]
    assert got == ["a/z.py", "b.py"]


def test_corpus_bytes_are_the_listed_files_split_disjointly(corpus: lm.Corpus) -> None:
    for data in (corpus.train, corpus.val):
        assert data.dtype == torch.uint8 and data.dim() == 1 and data.numel() > 0
    assert corpus.train.numel() + corpus.val.numel() <= 4_000_000
    assert corpus.val.numel() <= 400_000
    assert corpus.files_train and corpus.files_val
    assert not set(corpus.files_train) & set(corpus.files_val)
    assert len(set(corpus.files_train)) == len(corpus.files_train)
    assert corpus.python_version.count(".") == 2
    # The split is by whole file: each tensor is exactly its files' bytes, each then a NUL.
    for data, names in ((corpus.train, corpus.files_train), (corpus.val, corpus.files_val)):
        expected = b"".join((STDLIB / n).read_bytes() + b"\0" for n in names)
        assert bytes(data.numpy()) == expected


def test_corpus_is_deterministic_and_seeded(corpus: lm.Corpus) -> None:
    again = lm.load_corpus()
    assert torch.equal(again.train, corpus.train) and torch.equal(again.val, corpus.val)
    assert again.files_train == corpus.files_train and again.files_val == corpus.files_val
    other = lm.load_corpus(seed=1)
    assert other.files_val != corpus.files_val


@pytest.mark.parametrize("max_bytes,val_fraction", [(300_000, 0.1), (1_000_000, 0.25)])
def test_corpus_respects_max_bytes(max_bytes: int, val_fraction: float) -> None:
    c = lm.load_corpus(max_bytes=max_bytes, val_fraction=val_fraction)
    assert c.train.numel() + c.val.numel() <= max_bytes
    assert c.val.numel() <= val_fraction * max_bytes
    # Budgets are filled, not left mostly empty (stdlib files are at most a few 100 kB).
    assert c.train.numel() > 0.8 * (1 - val_fraction) * max_bytes
    assert c.val.numel() > 0.5 * val_fraction * max_bytes


@pytest.mark.parametrize("kwargs,exc,name", [
    ({"max_bytes": 0}, ValueError, "max_bytes"),
    ({"max_bytes": "100"}, TypeError, "max_bytes"),
    ({"max_bytes": True}, TypeError, "max_bytes"),
    ({"max_bytes": 10}, ValueError, "max_bytes"),  # too small for any file
    ({"val_fraction": 0.0}, ValueError, "val_fraction"),
    ({"val_fraction": 1.0}, ValueError, "val_fraction"),
    ({"val_fraction": "0.1"}, TypeError, "val_fraction"),
    ({"seed": -1}, ValueError, "seed"),
    ({"seed": 1.5}, TypeError, "seed"),
])
def test_load_corpus_argument_errors_name_the_argument(kwargs: dict, exc: type,
                                                       name: str) -> None:
    with pytest.raises(exc, match=name):
        lm.load_corpus(**kwargs)


def test_load_corpus_without_sources_says_so(tmp_path: Path) -> None:
    (tmp_path / "os.pyc").write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match="no standard-library .py sources"):
        lm.load_corpus(root=tmp_path)


# ---------------------------------------------------------------- model


def test_model_shape_size_and_deterministic_init() -> None:
    torch.manual_seed(0)
    model = lm.ByteTransformer()
    assert 100_000 <= sum(p.numel() for p in model.parameters()) <= 300_000
    tokens = torch.randint(0, 256, (3, 64))
    logits = model(tokens)
    assert logits.shape == (3, 64, 256) and logits.dtype == torch.float32
    assert model(tokens[:, :10]).shape == (3, 10, 256)
    with pytest.raises(ValueError, match="positions"):
        model(torch.zeros(1, 65, dtype=torch.long))
    torch.manual_seed(0)
    same = lm.ByteTransformer()
    torch.manual_seed(1)
    other = lm.ByteTransformer()
    for (name, a), b, c in zip(model.state_dict().items(), same.state_dict().values(),
                               other.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(model.tok.weight, other.tok.weight)
    with pytest.raises(ValueError, match="heads"):
        lm.ByteTransformer(d_model=64, heads=3)


@pytest.mark.parametrize("t", [0, 1, 31, 63])
def test_model_is_causal(t: int) -> None:
    torch.manual_seed(0)
    model = lm.ByteTransformer(layers=2).eval()
    gen = torch.Generator().manual_seed(t)
    tokens = torch.randint(0, 256, (2, 64), generator=gen)
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 1 + torch.randint(0, 255, (2,), generator=gen)) % 256
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert torch.equal(before[:, :t], after[:, :t])  # exactly: no information flows back
    assert (before[:, t] != after[:, t]).any(dim=-1).all()  # the changed input is seen...
    if t < 63:
        assert (before[:, t + 1:] != after[:, t + 1:]).any()  # ...and attended to later


# ---------------------------------------------------------------- batches


def test_batches_are_shifted_windows_of_the_data() -> None:
    data = torch.arange(200, dtype=torch.uint8)  # distinct values: a window shows its start
    stream = lm.Batches(data, batch=16, seq_len=32, seed=0)
    for _ in range(5):
        x, y = stream.next()
        assert x.shape == y.shape == (16, 32)
        assert x.dtype == y.dtype == torch.int64
        start = x[:, :1]
        assert torch.equal(x, start + torch.arange(32))
        assert torch.equal(y, start + 1 + torch.arange(32))
    # Every start from 0 to len - seq_len - 1 is drawn, and none past it.
    short = lm.Batches(torch.arange(40, dtype=torch.uint8), batch=64, seq_len=32, seed=3)
    starts = set(int(s) for _ in range(5) for s in next(short)[0][:, 0])
    assert starts == set(range(8))


def test_batches_streams_are_reproducible_per_seed(corpus: lm.Corpus) -> None:
    def take(seed: int) -> list[torch.Tensor]:
        stream = lm.Batches(corpus.train, batch=4, seq_len=64, seed=seed)
        return [torch.cat(stream.next()) for _ in range(3)]

    a, b, c = take(7), take(7), take(8)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not any(torch.equal(u, v) for u, v in zip(a, c))
    before = torch.random.get_rng_state()
    take(9)
    assert torch.equal(before, torch.random.get_rng_state())  # the global RNG is untouched


def test_batches_argument_errors() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        lm.Batches(torch.zeros(10, dtype=torch.uint8), batch=1, seq_len=10, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        lm.Batches(torch.zeros(100, dtype=torch.int64), batch=1, seq_len=10, seed=0)
    with pytest.raises(ValueError, match="batch"):
        lm.Batches(torch.zeros(100, dtype=torch.uint8), batch=0, seq_len=10, seed=0)


# ---------------------------------------------------------------- bits per byte


class _Recorder(torch.nn.Module):
    """Predicts uniformly (exactly 8 bits per byte) and records the windows it is shown."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.seen.append(tokens.clone())
        return torch.zeros(*tokens.shape, 256) + self.w


def test_bits_per_byte_windows_do_not_overlap_and_spread_out() -> None:
    data = torch.arange(201, dtype=torch.uint8)  # 50 windows of 4 (+1) bytes
    probe = _Recorder()
    assert lm.bits_per_byte(probe, data, seq_len=4, batch=8) == pytest.approx(8.0, abs=1e-5)
    seen = torch.cat(probe.seen)
    assert torch.equal(seen[:, 0], torch.arange(0, 200, 4))
    probe.seen.clear()
    lm.bits_per_byte(probe, data, seq_len=4, max_windows=5)
    assert torch.cat(probe.seen)[:, 0].tolist() == [0, 40, 80, 120, 160]


def test_bits_per_byte_matches_direct_cross_entropy_and_restores_mode() -> None:
    torch.manual_seed(0)
    model = lm.ByteTransformer(seq_len=16)
    data = torch.randint(0, 256, (16 * 10 + 1,), dtype=torch.uint8)
    model.train()
    got = lm.bits_per_byte(model, data, seq_len=16, batch=3)
    assert model.training
    model.eval()
    windows = data[:-1].view(10, 16).long()
    targets = data[1:].view(10, 16).long()
    with torch.no_grad():
        want = F.cross_entropy(model(windows).reshape(-1, 256), targets.reshape(-1)).item()
    assert got == pytest.approx(want / math.log(2), rel=1e-5)
    lm.bits_per_byte(model, data, seq_len=16)
    assert not model.training


def test_untrained_model_is_near_8_bits_and_evaluation_is_deterministic(
        corpus: lm.Corpus) -> None:
    torch.manual_seed(0)
    model = lm.ByteTransformer()
    first = lm.bits_per_byte(model, corpus.val, 64, max_windows=256)
    assert abs(first - 8.0) < 0.5
    assert lm.bits_per_byte(model, corpus.val, 64, max_windows=256) == first


@pytest.fixture
def one_thread():
    """One intra-op thread for the duration of a test: this model's ops are too small to gain
    from more, and on a shared 2-core machine two spinning threads made 150 steps take 11 s
    instead of 2."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_training_lowers_validation_bits_per_byte(corpus: lm.Corpus, one_thread: None) -> None:
    # 150 Adam steps of batch 16 take about 2 s on one core (measured: 8.0 -> 3.85).
    torch.manual_seed(0)
    model = lm.ByteTransformer()
    start = lm.bits_per_byte(model, corpus.val, 64, max_windows=256)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    stream = lm.Batches(corpus.train, batch=16, seq_len=64, seed=0)
    for _ in range(150):
        x, y = stream.next()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = lm.bits_per_byte(model, corpus.val, 64, max_windows=256)
    assert end < 5.0 and end < start - 2.0, (start, end)
