"""benchmarks/gpu_session.sh, run as a dry run (the plan, nothing executed): every stage is
planned, the limits fit the session's deadline, and what comes back is two files."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"
STAGES = ["machine", "build", "tests", "kernels", "comm", "step", "async", "train_sync", "train_async"]


def test_the_dry_run_plans_every_stage_within_the_deadline_and_leaves_two_files(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), GPU_SESSION_DRY_RUN="1")
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["session.tar.gz", "summary.txt"]
    with tarfile.open(out / "session.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
        rows = tar.extractfile("./stages.tsv").read().decode().split("\n")
    assert {f"{s}.log" for s in STAGES} <= names
    plan = [row.split("\t") for row in rows if row]
    assert [r[0] for r in plan] == STAGES
    assert sum(int(r[3]) for r in plan) <= 480  # the default DEADLINE
    summary = (out / "summary.txt").read_text()
    assert "all stages passed" in summary
    # The GPU tests' filter takes the FSDP2 one-GPU test and the NCCL ones.
    assert "-k cuda or nccl or gpu or test_build" in summary
