"""A byte-level language-modelling task that needs no download: a small decoder-only
transformer trained on the running Python's own standard-library sources, scored in bits per
byte on held-out files.

Standalone on purpose (torch, numpy and the standard library only, nothing from easgd_ext), so
training scripts and studies can use it without the compiled core.

    corpus = load_corpus()                       # train/val bytes, split by file
    model = ByteTransformer()                    # ~137k parameters by default
    stream = Batches(corpus.train, batch=16, seq_len=model.seq_len, seed=worker)
    x, y = stream.next()
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    bpb = bits_per_byte(model, corpus.val, model.seq_len, max_windows=512)
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["stdlib_files", "Corpus", "load_corpus", "ByteTransformer", "Batches",
           "bits_per_byte", "VOCAB", "SEPARATOR"]

VOCAB = 256
# Appended after every file. NUL never occurs in Python source, so it is an unambiguous
# end-of-file marker rather than text the model could confuse with code.
SEPARATOR = 0

# Directory names never descended into: installed third-party code, the test suites (large,
# repetitive, and partly data rather than code), IDLE, byte-code caches. lib2to3's test data
# lives under lib2to3/tests and is caught by "tests".
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib",
                        "__pycache__"})


def _check_int(name: str, value: object, minimum: int) -> int:
    # bool is an int subclass; True as a size is a bug in the caller, not a 1.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def stdlib_files(root: Optional[Path] = None) -> list[Path]:
    """The ``.py`` files of the running Python's standard library, as absolute paths.

    ``root`` defaults to ``sysconfig.get_paths()["stdlib"]``. Excluded: anything under a
    directory named site-packages, dist-packages, test, tests, idlelib or __pycache__; the
    build-configuration folder (``config-*``) and ``_sysconfigdata_*`` modules, whose contents
    depend on how this particular interpreter was built; and files that resolve (through a
    symlink) to outside ``root``. Sorted by their POSIX path relative to ``root``, so the list
    is the same on every machine with the same Python.
    """
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root).resolve()
    if not root.is_dir():
        return []
    found: list[tuple[str, Path]] = []
    # os.walk does not follow directory symlinks by default, so a link out of the tree is
    # never entered; file symlinks are checked after resolving below.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames
                       if d not in _SKIP_DIRS and not d.startswith("config-")]
        for name in filenames:
            if not name.endswith(".py") or name.startswith("_sysconfigdata_"):
                continue
            path = Path(dirpath) / name
            try:
                real = path.resolve()
                real.relative_to(root)
            except (OSError, ValueError):  # dangling link, or a link out of the stdlib
                continue
            if real.is_file():
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


@dataclass(eq=False)  # tensor fields: == would be ambiguous, so identity
class Corpus:
    """Training and validation bytes (1-D uint8, files concatenated, each followed by
    :data:`SEPARATOR`), which stdlib files (POSIX paths relative to the stdlib root) went where,
    listed in the order their bytes appear, and the Python version they came from."""

    train: torch.Tensor
    val: torch.Tensor
    files_train: list[str] = field(default_factory=list)
    files_val: list[str] = field(default_factory=list)
    python_version: str = ""


def _unit_hash(seed: int, rel: str) -> float:
    # sha256, not hash(): Python salts str hashes per process, and the split must be the same
    # on every run and machine.
    digest = hashlib.sha256(f"{seed}/{rel}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def load_corpus(max_bytes: int = 4_000_000, val_fraction: float = 0.1, seed: int = 0, *,
                root: Optional[Path] = None) -> Corpus:
    """The stdlib sources split BY FILE into train and validation, deterministically.

    Each file (by its path relative to the stdlib root) gets a number u in [0, 1) from
    sha256 of ``f"{seed}/{path}"``; it is a validation file if u < ``val_fraction``. The size
    cap is per split: the validation split gets ``val_fraction * max_bytes`` bytes and training
    the rest. Within a split, files are taken in order of u (a seeded shuffle, so the cap does
    not favour the alphabetically first packages); a file that would push the split over its
    budget is skipped and later, smaller ones may still fit. Byte counts include one separator
    per file, so ``len(train) + len(val) <= max_bytes``. Empty files are skipped.
    ``root`` overrides the stdlib directory (for tests).

    Raises TypeError/ValueError naming a bad argument, FileNotFoundError if no stdlib source
    is found (e.g. a Python shipped without its ``.py`` files), and ValueError if ``max_bytes``
    is too small to give both splits at least one file.
    """
    max_bytes = _check_int("max_bytes", max_bytes, 1)
    seed = _check_int("seed", seed, 0)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
        raise TypeError(f"val_fraction must be a float, got {type(val_fraction).__name__}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")

    files = stdlib_files(root)
    if not files:
        where = root if root is not None else sysconfig.get_paths()["stdlib"]
        raise FileNotFoundError(
            f"no standard-library .py sources found under {where}; this Python may ship only "
            "byte code (a stripped or embedded build). Use a full CPython installation.")
    base = Path(sysconfig.get_paths()["stdlib"] if root is None else root).resolve()

    ranked = sorted((_unit_hash(seed, f.relative_to(base).as_posix()), f) for f in files)
    val_budget = int(val_fraction * max_bytes)
    budgets = {"train": max_bytes - val_budget, "val": val_budget}
    chunks: dict[str, list[bytes]] = {"train": [], "val": []}
    names: dict[str, list[str]] = {"train": [], "val": []}
    used = {"train": 0, "val": 0}
    sep = bytes([SEPARATOR])
    for u, path in ranked:
        split = "val" if u < val_fraction else "train"
        size = path.stat().st_size + 1
        if size == 1 or used[split] + size > budgets[split]:
            continue
        data = path.read_bytes()
        if used[split] + len(data) + 1 > budgets[split]:  # changed since stat(); stay in budget
            continue
        chunks[split].append(data + sep)
        names[split].append(path.relative_to(base).as_posix())
        used[split] += len(data) + 1
    for split in ("train", "val"):
        if not chunks[split]:
            raise ValueError(f"max_bytes={max_bytes} (val_fraction={val_fraction}) leaves the "
                             f"{split} split with no file that fits its budget of "
                             f"{budgets[split]} bytes; raise max_bytes")

    def as_tensor(parts: list[bytes]) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(b"".join(parts), dtype=np.uint8).copy())

    return Corpus(train=as_tensor(chunks["train"]), val=as_tensor(chunks["val"]),
                  files_train=names["train"], files_val=names["val"],
                  python_version=platform.python_version())


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, d_model: int, heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # (B, T, 3, H, Dh) -> three (B, H, T, Dh) tensors, the layout SDPA expects.
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))
        return x + self.mlp(self.ln2(x))


class ByteTransformer(nn.Module):
    """A decoder-only transformer over bytes (vocabulary 256).

    Token and learned positional embeddings, ``layers`` pre-norm blocks (causal
    self-attention, GELU MLP), a final LayerNorm and a linear head (untied). The defaults
    (d_model 64, 2 layers, 4 heads, context 64) give about 137k
    parameters: small enough for many simulated workers on a CPU, large enough to learn
    Python's byte statistics well beyond unigrams in a few hundred steps.
    ``forward(tokens[B, T])`` with T <= ``seq_len`` returns logits ``[B, T, 256]``.
    Initialization draws only from torch's global generator, so it is reproducible under
    ``torch.manual_seed``.
    """

    def __init__(self, d_model: int = 64, layers: int = 2, heads: int = 4, seq_len: int = 64,
                 mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        d_model = _check_int("d_model", d_model, 1)
        layers = _check_int("layers", layers, 1)
        heads = _check_int("heads", heads, 1)
        self.seq_len = _check_int("seq_len", seq_len, 1)
        mlp_ratio = _check_int("mlp_ratio", mlp_ratio, 1)
        if d_model % heads:
            raise ValueError(f"heads ({heads}) must divide d_model ({d_model})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.tok = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(self.seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(d_model, heads, mlp_ratio, dropout)
                                    for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        # Not tied to the embedding: measured on this task, tying saves 16k parameters but
        # learns slower (3.72 vs 3.46 bits per byte after 300 steps) and its logits at init
        # favour repeating the input byte (7.7 instead of 8.0 bits per byte untrained).
        self.head = nn.Linear(d_model, VOCAB, bias=False)
        self._init(layers)

    def _init(self, layers: int) -> None:
        # GPT-2's scheme: N(0, 0.02) weights, zero biases, and residual output projections
        # shrunk by 1/sqrt(2 * layers) so the residual stream's variance does not grow with
        # depth. Small logits at init give a near-uniform prediction (8 bits per byte).
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            for residual_out in (block.proj, block.mlp[2]):
                nn.init.normal_(residual_out.weight, mean=0.0, std=0.02 / math.sqrt(2 * layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tuple(tokens.shape)}")
        t = tokens.shape[1]
        if not 1 <= t <= self.seq_len:
            raise ValueError(f"tokens has {t} positions; this model takes 1..{self.seq_len}")
        x = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class Batches:
    """An endless stream of training batches for one worker.

    Each batch is ``batch`` windows of ``seq_len + 1`` consecutive bytes starting at uniformly
    random offsets drawn from this stream's own ``torch.Generator`` (seeded with ``seed``), so
    each worker gets an independent, reproducible stream and no worker's draws disturb
    another's or the global RNG. :meth:`next` returns ``(inputs, targets)``, both int64
    ``[batch, seq_len]``, with ``targets`` the same windows shifted one byte ahead.
    Also an iterator: ``for x, y in stream`` never ends.
    """

    def __init__(self, data: torch.Tensor, batch: int, seq_len: int, seed: int) -> None:
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"data must be a torch.Tensor, got {type(data).__name__}")
        if data.dim() != 1 or data.dtype != torch.uint8:
            raise ValueError(f"data must be a 1-D uint8 tensor, got {data.dtype} "
                             f"of shape {tuple(data.shape)}")
        self.batch = _check_int("batch", batch, 1)
        self.seq_len = _check_int("seq_len", seq_len, 1)
        seed = _check_int("seed", seed, 0)
        if data.numel() < self.seq_len + 1:
            raise ValueError(f"data has {data.numel()} bytes; seq_len={self.seq_len} needs "
                             f"at least {self.seq_len + 1}")
        self.data = data
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(self.seq_len + 1)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(inputs, targets)`` pair."""
        # Last valid start leaves room for seq_len + 1 bytes; randint's high is exclusive.
        starts = torch.randint(0, self.data.numel() - self.seq_len, (self.batch,),
                               generator=self.generator)
        windows = self.data[(starts[:, None] + self._offsets).to(self.data.device)].long()
        return windows[:, :-1], windows[:, 1:]

    __next__ = next

    def __iter__(self) -> "Batches":
        return self


@torch.no_grad()
def bits_per_byte(model: nn.Module, data: torch.Tensor, seq_len: int, batch: int = 64,
                  max_windows: Optional[int] = None) -> float:
    """Mean cross-entropy of ``model`` on ``data`` in bits per byte (8.0 = uniform guessing).

    ``data`` is cut into non-overlapping windows of ``seq_len + 1`` bytes stepping by
    ``seq_len`` (window i predicts bytes i*seq_len+1 .. (i+1)*seq_len), so every byte after the
    first is scored exactly once and early positions see a short context, as in training.
    ``max_windows`` caps the count for speed by taking evenly spaced windows across the whole
    of ``data`` rather than a prefix. Deterministic: the same windows every call. The model is
    evaluated in eval mode (no dropout) on its own device and put back in its previous mode.
    """
    if not isinstance(data, torch.Tensor) or data.dim() != 1:
        raise ValueError("data must be a 1-D tensor of bytes")
    seq_len = _check_int("seq_len", seq_len, 1)
    batch = _check_int("batch", batch, 1)
    count = (data.numel() - 1) // seq_len
    if count < 1:
        raise ValueError(f"data has {data.numel()} bytes; seq_len={seq_len} needs at least "
                         f"{seq_len + 1}")
    if max_windows is not None:
        max_windows = _check_int("max_windows", max_windows, 1)
        if max_windows < count:
            # Integer spacing: distinct, evenly spread, first window always included.
            index = torch.tensor([i * count // max_windows for i in range(max_windows)])
        else:
            index = torch.arange(count)
    else:
        index = torch.arange(count)

    device = next(model.parameters()).device
    offsets = torch.arange(seq_len + 1)
    was_training = model.training
    model.eval()
    try:
        total, n = 0.0, 0
        for chunk in index.split(batch):
            windows = data[chunk[:, None] * seq_len + offsets].long().to(device)
            logits = model(windows[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                   windows[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)  # summed in float64 on the host: no drift over many chunks
            n += windows[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / n / math.log(2.0)
