"""DDP for real on CPU: two Gloo processes under torchrun train one epoch on a tiny synthetic shard
set; rank 0 alone writes the run folder, and the ranks' anchors are disjoint and cover the
training set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from agecl import dist
from agecl.build import main as build_main
from agecl.checkpoint import load_checkpoint
from agecl.reader import ShardSet
from agecl.train import CHECKPOINT_FILE, DEBUG_ANCHORS_ENV, METRICS_FILE, RESULTS_FILE

ROOT = Path(__file__).resolve().parents[1]


def test_single_process_helpers_are_identity():
    import torch

    assert not dist.is_initialized()
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce(t) is t and t.tolist() == [1.0, 2.0]
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist.broadcast_object(7) == 7
    dist.barrier()
    dist.destroy()  # no-ops without a process group


def test_env_info_reads_torchrun_variables(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert dist.env_info() == dist.DistInfo()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = dist.env_info()
    assert (info.rank, info.world_size, info.local_rank, info.ddp, info.is_main) == (3, 4, 1, True, False)


def test_torchrun_two_ranks_gloo(tmp_path):
    shards = tmp_path / "shards"
    assert build_main(["--synthetic", "60", "--out", str(shards), "--quiet"]) == 0
    out, debug = tmp_path / "run", tmp_path / "anchors"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           DEBUG_ANCHORS_ENV: str(debug), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "agecl.train", "--shards", str(shards), "--epochs", "1", "--image-size", "32",
        "--batch-size", "4", "--device", "cpu", "--loader", "torch", "--workers", "0",
        "--set", "loader.image_size=32", "--out", str(out), "--quiet", "--log-every", "2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # Rank 0 wrote the run folder; the checkpoint holds the plain module (no DDP / compile prefix).
    ckpt = load_checkpoint(out / CHECKPOINT_FILE)
    assert ckpt["epoch"] == 1
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    results = json.loads((out / RESULTS_FILE).read_text())
    assert results["world_size"] == 2 and results["protocol"] == "kfold" and "test_mae" in results
    assert list(tmp_path.glob("**/.*.tmp")) == []

    # The ranks' anchors: disjoint, and together every training sample exactly once.
    a0 = np.load(debug / "anchors-rank0-epoch0.npy")
    a1 = np.load(debug / "anchors-rank1-epoch0.npy")
    assert len(a0) and len(a1)
    assert not set(a0.tolist()) & set(a1.tolist())
    train_ids = ShardSet(shards).split_ids("kfold", 0, "train")
    assert sorted(np.concatenate([a0, a1]).tolist()) == train_ids.tolist()
    epoch_rows = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines() if '"epoch"' in line]
    epoch_rows = [r for r in epoch_rows if r["kind"] == "epoch"]
    assert len(epoch_rows) == 1 and epoch_rows[0]["anchors"] == len(train_ids)
