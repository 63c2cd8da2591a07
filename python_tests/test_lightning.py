"""EASGDStrategy: Lightning's Trainer with an easgd_ext averager, in real processes (Lightning's
own spawn launcher, Gloo on the CPU)."""

from __future__ import annotations

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch", reason="PyTorch Lightning is not installed "
                         "(pip install 'easgd_ext[lightning]')")

from conftest import cuda_usable  # noqa: E402
from easgd_ext.integrations.lightning import EASGDStrategy  # noqa: E402
from lightning_workers import Record, Regression, loaders  # noqa: E402


def fit(folder, epochs: int, strategy: EASGDStrategy, ckpt_path=None, checkpoint_dir=None) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    callbacks = [Record(str(folder))]
    if checkpoint_dir is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=str(checkpoint_dir), save_last=True))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=epochs,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=checkpoint_dir is not None, callbacks=callbacks,
                         num_sanity_val_steps=0)
    train, val = loaders()
    trainer.fit(Regression(), train, val, ckpt_path=ckpt_path)
    return [torch.load(folder / f"rank{r}.pt") for r in range(2)]


def test_the_strategy_trains_replicas_linked_by_the_averager(tmp_path):
    ranks = fit(tmp_path, 1, EASGDStrategy(tau=3, comm_dtype=torch.int8, start_method="spawn"))
    steps = 192 // 8 // 2  # each rank its half of the batches
    for r in ranks:
        assert r["global_step"] == steps and r["clock"] == steps
        assert r["exchanges"] == steps // 3 and r["workers"] == 2
    assert torch.equal(ranks[0]["center"], ranks[1]["center"])  # one center, bit for bit
    assert not torch.equal(ranks[0]["worker"], ranks[1]["worker"])  # two replicas, each its own
    for r in ranks:  # validation saw the center (in the parameters' dtype), not the worker
        assert torch.equal(r["validated"], r["center"]) and not torch.equal(r["validated"], r["worker"])


def test_a_lightning_checkpoint_resumes_every_rank_exactly(tmp_path):
    straight = fit(tmp_path / "a", 2, EASGDStrategy("diloco", tau=4, start_method="spawn"))
    first = fit(tmp_path / "b", 1, EASGDStrategy("diloco", tau=4, start_method="spawn"),
                checkpoint_dir=tmp_path / "ckpt")
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert len(saved["easgd_ext"]["ranks"]) == 2
    center = torch.cat([t.flatten() for t in saved["state_dict"].values()])
    assert torch.equal(center, first[0]["center"])  # the checkpoint's model is the center
    resumed = fit(tmp_path / "c", 2, EASGDStrategy("diloco", tau=4, start_method="spawn"),
                  ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for a, c in zip(straight, resumed):
        assert torch.equal(a["worker"], c["worker"]) and torch.equal(a["center"], c["center"])
        assert a["exchanges"] == c["exchanges"] and a["clock"] == c["clock"]


def test_bad_arguments_name_what_is_wrong():
    with pytest.raises(ValueError, match="method must be one of 'easgd', 'diloco', 'downpour', 'local_sgd', got 'adam'"):
        EASGDStrategy("adam")
    with pytest.raises(TypeError, match="sets the averager's process_group itself"):
        EASGDStrategy(process_group=None)


def test_the_registered_names_build_the_strategy():
    from lightning.pytorch.strategies import StrategyRegistry

    for name in ("easgd", "diloco", "downpour", "local_sgd"):
        strategy = StrategyRegistry.get(name)
        assert isinstance(strategy, EASGDStrategy) and strategy.method == name


@pytest.mark.skipif(not cuda_usable(), reason="needs a CUDA GPU and easgd_ext built with CUDA")
def test_the_strategy_on_a_gpu(tmp_path):
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_epochs=1, logger=False,
                         strategy=EASGDStrategy(tau=2, start_method="spawn"),
                         enable_progress_bar=False, enable_checkpointing=False,
                         callbacks=[Record(str(tmp_path))], num_sanity_val_steps=0)
    train, val = loaders()
    trainer.fit(Regression(), train, val)
    (r,) = [torch.load(tmp_path / "rank0.pt")]
    assert r["exchanges"] == 192 // 8 // 2 and torch.isfinite(r["center"]).all()


def test_the_readme_example_runs_as_written(tmp_path):
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "lightning_digits.py"
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"center test error ([\d.]+)% after (\d+) exchanges", done.stdout)
    assert found, done.stdout
    assert float(found.group(1)) < 15 and int(found.group(2)) > 0  # it learned, and it exchanged
    assert list(tmp_path.glob("lightning_digits/checkpoints/*.ckpt"))
