"""Faults, the fast subset of benchmarks/faults.py: a full disk (RLIMIT_FSIZE: writes fail with
EFBIG part-way), bytes flipped after the build, a diverging loss, and a few trials of the suite
itself on the synthetic set (kills, full disks, corruption, divergence), so that CI keeps the
promises: no traceback, nothing half-written, no sample lost, the same command completes.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agecl import format as fmt
from agecl.atomic import EXIT_DISK_FULL
from agecl.build import main as build_main
from agecl.reader import ShardSet
from agecl.train import CHECKPOINT_FILE, TrainError
from agecl.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}


def _limited(args: list[str], limit: int | None, cwd: Path) -> subprocess.CompletedProcess:
    """`python args` with files capped at `limit` bytes (None: no cap)."""
    def cap():
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=cap)


def test_atomic_write_over_the_size_limit_names_the_file_and_leaves_nothing(tmp_path):
    code = ("import sys, numpy as np; from agecl.atomic import write_bytes, atomic_path, DiskFullError\n"
            "for what in ('bytes', 'npy'):\n"
            "    try:\n"
            "        if what == 'bytes': write_bytes('out/big.bin', b'x' * 100000)\n"
            "        else:\n"
            "            with atomic_path('out/big.npy') as tmp, open(tmp, 'wb') as f: np.save(f, np.zeros(100000))\n"
            "    except DiskFullError as e: print(e)\n")
    r = _limited(["-c", code], 20000, tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    # numpy reports a short write without an errno: the file at the limit decides it.
    assert len(lines) == 2 and all("File too large" in line and "Free space in out" in line for line in lines), lines
    assert "out/big.bin" in lines[0] and "out/big.npy" in lines[1]
    assert list((tmp_path / "out").iterdir()) == []


def test_make_shards_on_a_full_disk_is_one_message_then_resumes(tmp_path):
    out = tmp_path / "syn"
    cmd = [str(ROOT / "tools" / "make_shards.py"), "--synthetic", "30", "--out", str(out), "--folds", "3", "--quiet"]
    full = _limited(cmd, 40_000, tmp_path)  # the staged chunk of 30 faces is larger
    assert full.returncode == EXIT_DISK_FULL, full.stderr
    assert "Traceback" not in full.stderr and len(full.stderr.strip().splitlines()) == 1, full.stderr
    assert "cannot write: File too large" in full.stderr and f"Free space in {out}" in full.stderr
    assert not [p for p in out.rglob(".*.tmp")] and not (out / fmt.MANIFEST_FILE).exists()
    again = _limited(cmd, None, tmp_path)
    assert again.returncode == 0, again.stderr
    assert ShardSet(out).manifest["samples"] == 30


def test_a_byte_flipped_after_the_build_is_named_at_open(tmp_path):
    out = tmp_path / "syn"
    assert build_main(["--synthetic", "12", "--out", str(out), "--folds", "2", "--quiet"]) == 0
    index = fmt.load_index(out)
    i = 7
    o, n = int(index["offset"][i]), int(index["size"][i])
    path = fmt.shard_path(out, int(index["shard"][i]))
    data = bytearray(path.read_bytes())
    data[o + n // 2] ^= 0x10  # inside the scan: the markers still look right
    path.write_bytes(bytes(data))
    with pytest.raises(fmt.FormatError, match=rf"shard-00000\.tar: sample {i} \(key .*\): the JPEG's bytes changed"):
        ShardSet(out)


def test_a_diverging_loss_stops_naming_epoch_and_steps(tmp_path, capsys):
    out = tmp_path / "syn"
    assert build_main(["--synthetic", "60", "--out", str(out), "--folds", "3", "--quiet"]) == 0
    run = tmp_path / "run"
    argv = ["--shards", str(out), "--epochs", "1", "--image-size", "32", "--set", "loader.image_size=32",
            "--batch-size", "4", "--device", "cpu", "--loader", "torch", "--workers", "0", "--log-every", "100",
            "--lr", "1e34", "--out", str(run), "--quiet"]  # fmt: skip
    capsys.readouterr()
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert "the loss became non-finite in epoch 1, steps 1-" in err and "no checkpoint was written" in err, err
    assert not (run / CHECKPOINT_FILE).exists()
    with pytest.raises(TrainError, match="non-finite"):  # --debug: the exception (and its traceback) instead
        train_main(argv + ["--debug"])


def test_fault_suite_fast_subset(tmp_path):
    """A few trials of each cheap fault kind, through the benchmark itself on the synthetic set."""
    kinds = "kill-build,disk-build,corrupt-jpeg,corrupt-tar,corrupt-index,corrupt-checkpoint,corrupt-config,disk-checkpoint,diverge"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "faults.py"), "--work", str(tmp_path), "--synthetic",
                        "--kinds", kinds, "--scale", "0.1", "--seed", "1"],
                       env=ENV, capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    total = rows[-1]
    assert total["fault"] == "all" and total["trials"] >= 12, r.stdout + r.stderr[-3000:]
    assert (total["tracebacks"], total["half_written"], total["samples_lost"], total["other"]) == (0, 0, 0, 0), r.stdout
    assert r.returncode == 0
    for row in rows[1:-1]:
        assert row["survived"] + row["clean_errors"] >= row["trials"], row
    assert np.all([row["trials"] >= 1 for row in rows[1:-1]])
