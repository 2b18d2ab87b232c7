"""The training loop through real files: a tiny synthetic shard set (built once for the module),
ResNet-18 at 32 px, the torch loader without workers (deterministic and cheap), one thread.

Covers: a short run lowers the loss and writes config.json, metrics.jsonl, checkpoint.pt,
results.json, predictions.npz; killed and resumed equals uninterrupted (exactly, CPU fp32); a
checkpoint of another configuration is refused; an unknown --set key is an error; the command line
end to end with a real SIGKILL; every fold of a protocol with skip-on-rerun; the demo's core.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from agecl import demo
from agecl.build import main as build_main
from agecl.checkpoint import CheckpointError, load_checkpoint
from agecl.config import TrainConfig
from agecl.train import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    RESULTS_FILE,
    TrainError,
    config_from_args,
    cpu_name,
    get_args_parser,
    main,
    train,
    train_all_folds,
)

ROOT = Path(__file__).resolve().parents[1]
EPOCH_KEYS = {"kind", "epoch", "step", "total", "ce", "mean", "variance", "cosine", "train_mae", "lr", "images_per_sec",
              "epoch_time_s", "fallback_count", "anchors"}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The CI machine has 2 shared cores: one intra-op thread is faster there and keeps runs comparable.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("shards") / "syn"
    assert build_main(["--synthetic", "72", "--out", str(path), "--folds", "3", "--quiet"]) == 0
    return str(path)


def _cfg(shards: str, out: Path, **top) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.shards = shards
    cfg.loader.loader, cfg.loader.workers = "torch", 0
    cfg.loader.batch_size, cfg.loader.image_size = 8, 32
    cfg.device, cfg.log_every, cfg.epochs, cfg.out = "cpu", 2, 2, str(out)
    cfg.precision = "fp32"  # what "auto" picks depends on the CPU; the exact-resume checks need one
    for k, v in top.items():
        setattr(cfg, k, v)
    return cfg


def _cli(shards: str, out: Path, epochs: int = 2) -> list[str]:
    """The command line of `_cfg(shards, out, epochs=epochs)`."""
    return ["--shards", shards, "--epochs", str(epochs), "--image-size", "32", "--set", "loader.image_size=32",
            "--batch-size", "8", "--device", "cpu", "--precision", "fp32", "--loader", "torch", "--workers", "0", "--log-every", "2",
            "--out", str(out), "--quiet"]  # fmt: skip


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]


def _assert_same_state(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory):
    """Two epochs uninterrupted: the reference of the resume tests."""
    out = tmp_path_factory.mktemp("straight") / "run"
    t0 = time.time()
    results = train(_cfg(shards, out), quiet=True)
    return out, results, time.time() - t0


def test_short_run_lowers_the_loss_and_writes_the_run_folder(straight):
    out, results, _ = straight
    for name in (CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, RESULTS_FILE, "predictions.npz", "curves.png"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _rows(out)
    epochs = [r for r in rows if r["kind"] == "epoch"]
    steps = [r for r in rows if r["kind"] == "step"]
    assert [r["epoch"] for r in epochs] == [1, 2] and steps
    assert EPOCH_KEYS <= set(epochs[0])
    assert epochs[-1]["total"] < epochs[0]["total"], [r["total"] for r in epochs]
    assert all(r["images_per_sec"] > 0 for r in rows)

    on_disk = json.loads((out / RESULTS_FILE).read_text())
    assert on_disk == json.loads(json.dumps(results))
    for key in ("test_mae", "test_cs5", "protocol", "fold", "mae_by_age", "mean_age_baseline", "identity_feature_variance"):
        assert key in results, key
    assert results["protocol"] == "kfold" and results["fold"] == 0 and results["folds"] == 3
    assert 0 <= results["test_cs5"] <= 1 and results["test_mae"] > 0
    # What it ran on, for rows whose folds ran on different machines (agecl.evaluate.config_differences).
    machine = results["machine"]
    assert machine["device"] == "cpu" and machine["torch"] == str(torch.__version__)
    assert machine["threads"] == torch.get_num_threads() and machine["precision"] == "fp32"
    assert machine["processor"] == cpu_name()

    ckpt = load_checkpoint(out / CHECKPOINT_FILE)
    assert ckpt["epoch"] == 2 and ckpt["step"] == epochs[-1]["step"]
    assert ckpt["config"] == json.loads((out / CONFIG_FILE).read_text())
    assert ckpt["config"]["data"]["protocol"] == "kfold" and ckpt["config"]["model"]["input_size"] == 32
    assert ckpt["config"]["loader"]["output_size"] == 32  # the loader delivers what the network takes
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])


def test_resumed_run_equals_uninterrupted(shards, straight, tmp_path):
    ref = load_checkpoint(straight[0] / CHECKPOINT_FILE)
    out = tmp_path / "resumed"
    train(_cfg(shards, out, epochs=1), quiet=True)
    assert load_checkpoint(out / CHECKPOINT_FILE)["epoch"] == 1
    train(_cfg(shards, out, epochs=2), resume=True, quiet=True)
    got = load_checkpoint(out / CHECKPOINT_FILE)
    assert (got["epoch"], got["step"]) == (ref["epoch"], ref["step"])
    _assert_same_state(got["model"], ref["model"])
    _assert_same_state(got["optimizer"]["state"][0], ref["optimizer"]["state"][0])
    rows = _rows(out)
    keys = [(r["step"], r["kind"]) for r in rows]
    assert keys == sorted(set(keys), key=lambda k: (k[0], k[1] == "epoch")), "each log line once, in order"
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2]


def test_checkpoint_of_another_configuration_is_refused(shards, straight, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / CHECKPOINT_FILE).write_bytes((straight[0] / CHECKPOINT_FILE).read_bytes())
    with pytest.raises(CheckpointError, match=r"another configuration[\s\S]*model.input_size: checkpoint 32, now 16"):
        cfg = _cfg(shards, run, epochs=3)
        cfg.model.input_size = 16
        train(cfg, resume=True, quiet=True)
    assert main(_cli(shards, run, epochs=3) + ["--preset", "mv-triplet", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "loss.cosine" in err and "loss.triplet" in err
    # Without --resume a run folder holding a checkpoint is not overwritten.
    assert main(_cli(shards, run, epochs=3)) == 2
    assert "--resume" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == [CHECKPOINT_FILE], "nothing written by refused runs"


def test_unknown_set_key_and_bad_values_are_errors(shards, tmp_path, capsys):
    assert main(["--shards", shards, "--out", str(tmp_path / "x"), "--set", "loss.bogus=1"]) == 2
    assert "unknown key 'loss.bogus'" in capsys.readouterr().err
    assert main(["--shards", shards, "--out", str(tmp_path / "x"), "--set", "nosection.lr=1"]) == 2
    assert main(["--shards", shards, "--out", str(tmp_path / "x"), "--set", "epochs=many"]) == 2
    assert main(["--shards", shards, "--out", str(tmp_path / "x"), "--preset", "nope"]) == 2
    assert "unknown loss preset" in capsys.readouterr().err
    assert main(["--shards", str(tmp_path / "missing")]) == 2
    assert "no such shard folder" in capsys.readouterr().err
    assert main(["--shards", shards, "--out", str(tmp_path / "x"), "--set", "test_tta=rotate"]) == 2
    assert "test_tta 'rotate'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_age_balance_weighs_the_age_terms_and_refuses_a_negative_exponent(shards, straight, tmp_path, capsys):
    out = tmp_path / "balanced"
    assert main(_cli(shards, out, epochs=1) + ["--set", "loss.balance=1"]) == 0
    assert json.loads((out / CONFIG_FILE).read_text())["loss"]["balance"] == 1.0
    first, plain = _rows(out)[0], _rows(straight[0])[0]  # the same steps, data and start
    assert first["step"] == plain["step"] and first["ce"] != pytest.approx(plain["ce"], rel=1e-4)
    assert main(_cli(shards, tmp_path / "neg") + ["--set", "loss.balance=-1"]) == 2
    assert "loss.balance -1" in capsys.readouterr().err


def test_the_loader_delivers_the_network_input_and_the_run_says_its_precision(shards, tmp_path, capsys):
    """At --image-size 24 from 48 px crops the loader delivers 24 px images (the model does not
    resize them), the run prints the precision it chose and why, and on_epoch_end can stop it."""
    from agecl.model import AgeModel

    seen = []
    forward = AgeModel.forward

    def spy(self, x):
        seen.append(tuple(x.shape[-2:]))
        return forward(self, x)

    cfg = _cfg(shards, tmp_path / "run", epochs=3)
    cfg.loader.image_size, cfg.model.input_size = 48, 24
    ticks = []
    try:
        AgeModel.forward = spy
        results = train(cfg, quiet=True, on_epoch_end=lambda epoch, model: ticks.append(epoch) or epoch == 2)
    finally:
        AgeModel.forward = forward
    assert seen[0] == (24, 24)  # training batches: 24 px from the loader; evaluation: 48 px crops resized
    assert json.loads((tmp_path / "run" / CONFIG_FILE).read_text())["loader"]["output_size"] == 24
    assert ticks == [1, 2] and results["steps"] == load_checkpoint(tmp_path / "run" / CHECKPOINT_FILE)["step"]
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT_FILE)["epoch"] == 2
    assert "precision fp32 (set with --precision)" in capsys.readouterr().out


def test_config_precedence_preset_then_flags_then_set():
    args = get_args_parser().parse_args(
        ["--shards", "s", "--preset", "paper-morph-ternary", "--flip", "horizontal", "--set", "loss.triplet=0.5",
         "--seed", "7", "--no-compile", "--image-size", "64", "--batch-size", "16", "--set", "lr=0.01", "--tta", "flip"]
    )  # fmt: skip
    cfg = config_from_args(args)
    assert cfg.test_tta == "flip"
    assert cfg.preset == "paper-morph-ternary" and cfg.loss.cosine == 10.0  # from the preset
    assert cfg.loss.triplet == 0.5  # --set beats the preset
    assert cfg.loader.flip == "horizontal"  # a flag beats the preset's vertical flip
    assert (cfg.seed, cfg.loader.seed, cfg.compile, cfg.model.input_size, cfg.loader.batch_size, cfg.lr) == (7, 7, "off", 64, 16, 0.01)
    assert cfg.loader.image_size == 224  # the crop stays the paper's; the network input is resized
    assert config_from_args(get_args_parser().parse_args(["--shards", "s", "--set", "preset=mv"])).loss.cosine == 0.0


def test_command_line_killed_and_resumed(shards, straight, tmp_path):
    """`python -m agecl.train` end to end: SIGKILL during epoch 2, refused without --resume,
    finished with it, and the weights equal the uninterrupted run's."""
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "agecl.train", *_cli(shards, out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not (out / CHECKPOINT_FILE).is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stdout.read()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
        proc.stdout.close()
    assert load_checkpoint(out / CHECKPOINT_FILE)["epoch"] == 1
    assert not (out / RESULTS_FILE).exists()

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "test MAE" in resumed.stdout and "resuming" in resumed.stdout
    results = json.loads((out / RESULTS_FILE).read_text())
    assert results["epochs"] == 2
    got, ref = load_checkpoint(out / CHECKPOINT_FILE), load_checkpoint(straight[0] / CHECKPOINT_FILE)
    _assert_same_state(got["model"], ref["model"], atol=1e-6)
    assert [r["epoch"] for r in _rows(out) if r["kind"] == "epoch"] == [1, 2]
    assert list(out.glob(".*.tmp")) == []


def test_a_run_computes_only_the_parts_of_a_triplet_its_loss_reads(shards, tmp_path):
    """With loader.parts 0, MV reads the anchors alone: an epoch computes one image a triplet, the
    ternary loss three; by default every image of the triplet is computed; a loader.parts below
    what the loss reads is refused before anything is written."""
    from agecl.losses import apply_preset

    for preset, parts, asked in (("mv", 1, 0), ("paper-fgnet-ternary", 3, 0), ("mv", 3, 3)):
        cfg = _cfg(shards, tmp_path / preset / str(asked), epochs=1)
        apply_preset(preset, cfg.loss)
        cfg.loader.parts = asked
        train(cfg, quiet=True)
        (epoch,) = [r for r in _rows(tmp_path / preset / str(asked)) if r["kind"] == "epoch"]
        assert epoch["images_per_sec"] * epoch["epoch_time_s"] == pytest.approx(parts * epoch["anchors"], rel=1e-6)
        assert json.loads((tmp_path / preset / str(asked) / CONFIG_FILE).read_text())["loader"]["parts"] == asked
    cfg = _cfg(shards, tmp_path / "refused", epochs=1)
    cfg.loader.parts = 1
    with pytest.raises(TrainError, match="loader.parts 1: this loss reads 2 images of each triplet"):
        train(cfg, quiet=True)
    assert not (tmp_path / "refused").exists()
    # A resumed run compares loader.parts by the images delivered: 0 and 3 are one for the ternary
    # loss, not for MV.
    for preset, resumes in (("paper-fgnet-ternary", True), ("mv", False)):
        cfg = _cfg(shards, tmp_path / preset / "0", epochs=2)
        apply_preset(preset, cfg.loss)
        if resumes:
            assert train(cfg, resume=True, quiet=True)["epochs"] == 2
        else:
            with pytest.raises(CheckpointError, match="loader.parts: checkpoint 0, now 3"):
                train(cfg, resume=True, quiet=True)


def test_all_folds_then_rerun_skips_finished_folds(shards, tmp_path, capsys):
    out = tmp_path / "all"
    cfg = _cfg(shards, out, epochs=1)
    cfg.data.protocol = "kfold"
    summary = train_all_folds(cfg, quiet=True)
    assert summary["complete"] and summary["folds_finished"] == [0, 1, 2] and summary["rule"] == "mean_over_folds"
    for k in range(3):
        r = json.loads((out / f"fold-{k}" / RESULTS_FILE).read_text())
        assert r["fold"] == k and r["protocol"] == "kfold"
    assert (out / RESULTS_FILE).is_file() and (out / "results.md").is_file()
    # A finished fold keeps its model, not the optimizer state it will never train on with.
    for k in range(3):
        ckpt = load_checkpoint(out / f"fold-{k}" / CHECKPOINT_FILE)
        assert ckpt["optimizer"] is None and ckpt["epoch"] == 1 and ckpt["model"]
    stamp = (out / "fold-1" / RESULTS_FILE).stat().st_mtime_ns
    capsys.readouterr()
    train_all_folds(cfg, quiet=True)
    assert capsys.readouterr().out.count("skipped") == 3
    assert (out / "fold-1" / RESULTS_FILE).stat().st_mtime_ns == stamp


def test_folds_kept_in_git_outlive_the_run_folder(shards, tmp_path, capsys):
    """A row longer than a session: folds trained with --tta flip, kept by keep_run.py --folds,
    the run folder lost (a new machine), restored by --restore: every fold is skipped as finished,
    and rescore.py's mirror copies them, with no checkpoint, as agecl-eval --tta flip scores them."""
    import shutil

    from agecl import evaluate as ev

    out, kept = tmp_path / "runs" / "row", tmp_path / "kept"
    cfg = _cfg(shards, out, epochs=1)
    cfg.data.protocol, cfg.test_tta = "kfold", "flip"
    train_all_folds(cfg, quiet=True)
    keep = [sys.executable, str(ROOT / "benchmarks" / "keep_run.py")]
    rescore = [sys.executable, str(ROOT / "benchmarks" / "rescore.py"), "--suffix", "flip", "--eval", "--tta flip"]
    # Copying a fold tested with the mirror is what rescoring its checkpoint with the mirror gives.
    rescored = tmp_path / "rescored"
    # fp32 as the fold was tested (_cfg): agecl-eval's "auto" is bf16 on a CPU with AVX512-BF16 or
    # AMX, 0.01 years away.
    assert ev.main(["--checkpoint", str(out / "fold-1" / CHECKPOINT_FILE), "--tta", "flip", "--device", "cpu",
                    "--precision", "fp32", "--workers", "0", "--loader", "torch", "--out", str(rescored)]) == 0
    np.testing.assert_allclose(ev.load_predictions(rescored).expected, ev.load_predictions(out / "fold-1").expected,
                               atol=1e-4)

    r = subprocess.run(keep + ["--folds", str(out), "--into", str(kept)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "3 folds copied, 3 finished there" in r.stdout
    assert sorted(p.name for p in (kept / "row").iterdir()) == ["fold-0", "fold-1", "fold-2"]
    assert sorted(p.name for p in (kept / "row" / "fold-0").iterdir()) == ["predictions.npz", "results.json"]
    again = subprocess.run(keep + ["--folds", str(out), "--into", str(kept)], capture_output=True, text=True, cwd=ROOT)
    assert "0 folds copied, 3 finished there" in again.stdout

    before = ev.load_predictions(out)
    shutil.rmtree(out)  # the machine is gone; git kept the folds
    (out / "fold-2").mkdir(parents=True)
    (out / "fold-2" / CHECKPOINT_FILE).write_bytes(b"unfinished training")
    r = subprocess.run(keep + ["--restore", str(out), "--into", str(kept)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "2 folds copied, 2 finished there" in r.stdout
    assert f"{out / 'fold-2'}: a checkpoint of unfinished training is there; not restored" in r.stderr
    shutil.rmtree(out / "fold-2")
    r = subprocess.run(keep + ["--restore", str(out), "--into", str(kept)], capture_output=True, text=True, cwd=ROOT)
    assert "1 folds copied, 3 finished there" in r.stdout
    capsys.readouterr()
    summary = train_all_folds(cfg, quiet=True)
    assert capsys.readouterr().out.count("skipped") == 3 and summary["complete"]
    assert not list(out.glob(f"fold-*/{CHECKPOINT_FILE}"))  # nothing trained again
    np.testing.assert_array_equal(ev.load_predictions(out).expected, before.expected)

    r = subprocess.run(rescore + [str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    flipped = Path(f"{out}-flip")
    np.testing.assert_array_equal(ev.load_predictions(flipped).expected, before.expected)
    assert json.loads((flipped / RESULTS_FILE).read_text())["complete"]
    # A fold tested without the mirror has to be rescored, and without its checkpoint cannot be.
    plain = json.loads((out / "fold-0" / RESULTS_FILE).read_text())
    plain["config"]["test_tta"] = "none"
    (out / "fold-0" / RESULTS_FILE).write_text(json.dumps(plain))
    r = subprocess.run(rescore[:3] + ["mirror", *rescore[4:], str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and str(out / "fold-0" / CHECKPOINT_FILE) in r.stderr


def test_fold_none_trains_on_every_fold_and_tests_nothing(shards, tmp_path, capsys):
    """--fold none: the model to carry forward, trained on every sample of the protocol's folds."""
    from agecl.evaluate import main as eval_main
    from agecl.reader import ShardSet

    out = tmp_path / "all"
    assert main(_cli(shards, out, epochs=1) + ["--protocol", "kfold", "--fold", "none"]) == 0
    assert "trained on all 72 samples of kfold (no test fold)" in capsys.readouterr().out
    r = json.loads((out / RESULTS_FILE).read_text())
    assert (r["fold"], r["folds"], r["n_test"], r["n_train"]) == (-1, 3, 0, 72)
    fold0_train = len(ShardSet(shards).split_ids("kfold", 0, "train"))
    (epoch,) = [row for row in _rows(out) if row["kind"] == "epoch"]
    assert fold0_train < epoch["anchors"] <= 72  # every fold's samples are anchors, not four fifths
    ckpt = load_checkpoint(out / CHECKPOINT_FILE)
    assert ckpt["epoch"] == 1 and ckpt["config"]["data"]["fold"] == -1
    # Its checkpoint has no test fold to evaluate on: agecl-eval says what to do instead.
    assert eval_main(["--checkpoint", str(out / CHECKPOINT_FILE), "--device", "cpu"]) == 2
    assert "no test fold" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_cli(shards, tmp_path / "x") + ["--fold", "-1"])
    assert "a fold is a number >= 0, or none" in capsys.readouterr().err

def test_folds_at_once_equal_folds_one_at_a_time(shards, tmp_path):
    """--jobs 2: two worker processes (one thread each, as this module's runs) give the very
    predictions of the sequential run, write their logs, and aggregate the same way."""
    preds = {}
    for jobs in (1, 2):
        cfg = _cfg(shards, tmp_path / f"jobs{jobs}", epochs=1)
        cfg.data.protocol = "kfold"
        summary = train_all_folds(cfg, quiet=True, jobs=jobs)
        assert summary["complete"] and summary["folds_finished"] == [0, 1, 2]
        preds[jobs] = [np.load(tmp_path / f"jobs{jobs}" / f"fold-{k}" / "predictions.npz") for k in range(3)]
    for a, b in zip(preds[1], preds[2]):
        assert a.files == b.files
        for name in a.files:
            np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-5, err_msg=name)
    for k in range(3):
        assert load_checkpoint(tmp_path / "jobs2" / f"fold-{k}" / CHECKPOINT_FILE)["optimizer"] is None
    logs = list((tmp_path / "jobs2" / "jobs").glob("worker-*.log"))
    assert logs and sum(log.read_text().count("== fold") for log in logs) == 3


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's prctl")
def test_killing_a_jobs_run_ends_its_fold_workers(shards, tmp_path):
    """SIGTERM to `agecl-train --all-folds --jobs 2` mid-run: its worker processes end with it
    rather than training on, orphaned; the folds are left to --resume."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "agecl.train", *_cli(shards, out, epochs=200), "--protocol", "kfold",
           "--all-folds", "--jobs", "2"]
    parent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    deadline = time.monotonic() + 120
    while len(workers) < 2 and time.monotonic() < deadline:  # both workers have started a fold
        logs = list((out / "jobs").glob("worker-*.log")) if (out / "jobs").is_dir() else []
        workers = [int(log.stem.split("-")[1]) for log in logs if "== fold" in log.read_text()]
        time.sleep(0.5)
    assert len(workers) == 2 and parent.poll() is None, "the run did not start two training workers"

    def alive(pid: int) -> bool:  # a zombie (exited, not yet reaped by whoever adopted it) is gone
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    parent.send_signal(signal.SIGTERM)
    parent.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in workers if alive(pid)]
    for pid in left:  # a failing run of this test leaves no orphans behind either
        os.kill(pid, signal.SIGKILL)
    assert not left, "fold workers outlived their agecl-train"
    assert not (out / "fold-0" / RESULTS_FILE).exists()  # killed mid-fold: nothing claims to be finished


def test_a_failing_fold_is_reported_and_the_others_finish(shards, tmp_path):
    out = tmp_path / "run"
    (out / "fold-1").mkdir(parents=True)
    (out / "fold-1" / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")  # refused without --resume
    cfg = _cfg(shards, out, epochs=1)
    cfg.data.protocol = "kfold"
    with pytest.raises(TrainError, match=r"1 of 3 folds failed(.|\n)*fold 1: TrainError"):
        train_all_folds(cfg, quiet=True, jobs=2)
    assert (out / "fold-0" / RESULTS_FILE).is_file() and (out / "fold-2" / RESULTS_FILE).is_file()
    assert not (out / "fold-1" / RESULTS_FILE).exists()


def test_jobs_needs_all_folds(shards, tmp_path, capsys):
    assert main(_cli(shards, tmp_path / "x") + ["--jobs", "2"]) == 2
    assert "needs --all-folds" in capsys.readouterr().err


def test_demo_core_on_a_tiny_set(tmp_path, capsys):
    results = demo.run_demo(shards=str(tmp_path / "syn"), out=str(tmp_path / "demo"), samples=60, image_size=32,
                            epochs=1, batch_size=8, device="cpu", loader="torch", workers=0, quiet=True)  # fmt: skip
    text = capsys.readouterr().out
    assert "test MAE" in text and "mean training age" in text
    assert results["test_mae"] > 0 and results["mean_age_baseline"] > 0 and results["wall_time_s"] > 0
    # Again: the shards are reused and the finished run is re-evaluated, not retrained.
    demo.run_demo(shards=str(tmp_path / "syn"), out=str(tmp_path / "demo"), samples=60, image_size=32,
                  epochs=1, batch_size=8, device="cpu", loader="torch", workers=0, quiet=True)  # fmt: skip
    text = capsys.readouterr().out
    assert "not rebuilding" in text and "resuming" in text


def test_train_error_for_unknown_device_and_protocol(shards, tmp_path):
    with pytest.raises(TrainError):
        train(_cfg(shards, tmp_path / "d", device="tpu"), quiet=True)
    cfg = _cfg(shards, tmp_path / "p")
    cfg.data.protocol = "lopo"
    with pytest.raises(Exception, match="no split 'lopo'"):
        train(cfg, quiet=True)


def test_resume_is_exact_with_the_dali_loader(shards, tmp_path):
    """The default loader too: its augmentation is drawn per (seed, rank, epoch, step), so one
    epoch + resume gives the weights of two straight epochs (DALI's CPU backend, fp32)."""

    def dali(out, epochs):
        cfg = _cfg(shards, out, epochs=epochs)
        cfg.loader.loader, cfg.loader.workers = "dali", 1
        return cfg

    train(dali(tmp_path / "straight", 2), quiet=True)
    train(dali(tmp_path / "resumed", 1), quiet=True)
    train(dali(tmp_path / "resumed", 2), resume=True, quiet=True)
    ref, got = (load_checkpoint(tmp_path / name / CHECKPOINT_FILE) for name in ("straight", "resumed"))
    assert got["step"] == ref["step"]
    _assert_same_state(got["model"], ref["model"])


def test_config_file_trains_the_same_run_again(shards, straight, tmp_path, capsys):
    """--config <run folder> retrains that run into its own folder: the same configuration and weights."""
    src = straight[0]
    out = tmp_path / "again"
    assert main(["--config", str(src), "--out", str(out), "--quiet"]) == 0
    _assert_same_state(load_checkpoint(out / CHECKPOINT_FILE)["model"], load_checkpoint(src / CHECKPOINT_FILE)["model"])
    saved, original = (json.loads((d / CONFIG_FILE).read_text()) for d in (out, src))
    assert {**saved, "out": "", "name": ""} == {**original, "out": "", "name": ""} and saved["out"] == str(out)

    # The saved run's folder and name are cleared; flags and --set still win over the file.
    cfg = config_from_args(get_args_parser().parse_args(
        ["--config", str(src / CONFIG_FILE), "--epochs", "1", "--set", "loss.cosine=0.5"]))
    assert (cfg.out, cfg.name, cfg.epochs, cfg.loss.cosine) == ("", "", 1, 0.5)
    assert cfg.data.shards == shards and cfg.loader.batch_size == 8

    assert main(["--config", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: no such configuration file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"epochs": 2, "colour": "red"}')
    assert main(["--config", str(bad)]) == 2
    assert "bad.json: not an agecl configuration" in capsys.readouterr().err
    assert main(["--epochs", "1"]) == 2
    assert "no shard folder" in capsys.readouterr().err


def test_a_failing_chart_does_not_cost_the_run_its_result(shards, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("matplotlib cannot write its font cache")

    monkeypatch.setattr("agecl.train.plots.plot_training_curves", broken)
    out = tmp_path / "run"
    results = train(_cfg(shards, out, epochs=1), quiet=True)
    assert json.loads((out / RESULTS_FILE).read_text())["test_mae"] == results["test_mae"]
    assert not (out / "curves.png").exists()
    assert "could not draw curves.png (RuntimeError: matplotlib cannot write its font cache)" in capsys.readouterr().err


# --- Fine-tuning from another run (--init-from) ----------------------------------------------------


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_init_from_maps_the_head_by_age_and_records_the_source(shards, straight, tmp_path, capsys):
    from agecl.model import AgeModel
    from agecl.train import load_config

    src = straight[0] / CHECKPOINT_FILE
    source = load_checkpoint(src)
    lo, hi = source["min_age"], source["max_age"]
    out = tmp_path / "tuned"
    # Another age range: ages lo+3 .. hi the source knows, hi+1 .. hi+3 are new to the head. lr 0
    # keeps every weight as initialised (BatchNorm statistics aside), so the init itself is seen.
    argv = _cli(shards, out, epochs=1) + ["--init-from", str(straight[0]), "--min-age", str(lo + 3),
                                          "--max-age", str(hi + 3), "--lr", "0"]  # fmt: skip
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert f"init from {src}" in said and "framed otherwise" not in said  # the source's own frame
    saved = json.loads((out / CONFIG_FILE).read_text())
    record = saved["model"]["init_source"]
    assert saved["model"]["init_from"] == str(straight[0])
    assert record["path"] == str(src.resolve()) and record["sha256"] == _sha256(src)
    assert record["config"] == json.loads((straight[0] / CONFIG_FILE).read_text())
    assert (record["min_age"], record["max_age"], record["arch"]) == (source["min_age"], source["max_age"], "resnet18")
    got = load_checkpoint(out / CHECKPOINT_FILE)
    assert got["config"] == saved and (got["min_age"], got["max_age"]) == (lo + 3, hi + 3)
    head_w, head_b = got["model"]["head.weight"], got["model"]["head.bias"]
    assert torch.equal(head_w[:-3], source["model"]["head.weight"][3:])
    assert torch.equal(head_b[:-3], source["model"]["head.bias"][3:])
    assert not any(torch.equal(head_w[j], row) for j in (-3, -2, -1) for row in source["model"]["head.weight"])  # fresh
    params = {name for name, _ in AgeModel(0, 1).named_parameters() if name.startswith("backbone.")}
    for name in params:
        assert torch.equal(got["model"][name], source["model"][name]), name
    # config.json trains again (agecl-train --config): the same source, found again.
    assert load_config(out).model.init_from == str(straight[0])


def test_a_resumed_fine_tuning_run_does_not_init_again(shards, straight, tmp_path):
    src = tmp_path / "source.pt"
    src.write_bytes((straight[0] / CHECKPOINT_FILE).read_bytes())
    out = tmp_path / "tuned"
    assert main(_cli(shards, out, epochs=1) + ["--init-from", str(src)]) == 0
    record = json.loads((out / CONFIG_FILE).read_text())["model"]["init_source"]
    src.unlink()  # the source is gone: resuming must not need it
    assert main(_cli(shards, out, epochs=2) + ["--init-from", str(src), "--resume"]) == 0
    got = load_checkpoint(out / CHECKPOINT_FILE)
    assert got["epoch"] == 2 and got["config"]["model"]["init_source"] == record
    assert json.loads((out / CONFIG_FILE).read_text())["model"]["init_source"] == record


def test_freeze_keeps_the_sources_stages_and_trains_the_rest(shards, straight, tmp_path, capsys):
    src = straight[0] / CHECKPOINT_FILE
    source = load_checkpoint(src)["model"]
    out = tmp_path / "tuned"
    assert main(_cli(shards, out, epochs=1) + ["--init-from", str(src), "--freeze", "layer3"]) == 0
    got = load_checkpoint(out / CHECKPOINT_FILE)
    assert got["config"]["model"]["freeze"] == "layer3"
    for name, value in got["model"].items():
        held = name.startswith(("backbone.conv1", "backbone.bn1", "backbone.layer1", "backbone.layer2", "backbone.layer3"))
        if held:
            assert torch.equal(value, source[name]), name  # weights and BatchNorm statistics, counts too
        elif name.startswith("backbone.layer4") and name.endswith(("weight", "running_mean")):
            assert not torch.equal(value, source[name]), name
    # Adam holds state for the trained parameters only (layer4 and the head).
    trained = sum(1 for name in got["model"] if name.startswith(("backbone.layer4", "head")) and
                  not name.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert len(got["optimizer"]["state"]) == trained
    # A resumed run keeps its freeze; another one is another configuration.
    assert main(_cli(shards, out, epochs=2) + ["--init-from", str(src), "--freeze", "layer3", "--resume"]) == 0
    capsys.readouterr()
    assert main(_cli(shards, out, epochs=3) + ["--init-from", str(src), "--freeze", "layer2", "--resume"]) == 2
    assert "model.freeze: checkpoint 'layer3', now 'layer2'" in capsys.readouterr().err
    # Frozen stages of a random backbone would learn nothing.
    assert main(_cli(shards, tmp_path / "scratch", epochs=1) + ["--freeze", "layer1"]) == 2
    assert "a frozen stage of a randomly initialised backbone learns nothing" in capsys.readouterr().err


def test_init_from_with_all_folds_and_jobs(shards, straight, tmp_path):
    src = straight[0] / CHECKPOINT_FILE
    out = tmp_path / "folds"
    assert main(_cli(shards, out, epochs=1) + ["--all-folds", "--jobs", "2", "--init-from", str(src)]) == 0
    for k in range(3):
        record = json.loads((out / f"fold-{k}" / CONFIG_FILE).read_text())["model"]["init_source"]
        assert record["sha256"] == _sha256(src), k
    # A run of every fold is no source: which fold's model to start from is for the user to say.
    assert main(_cli(shards, tmp_path / "again", epochs=1) + ["--init-from", str(out)]) == 2


def test_init_from_a_source_of_another_face_frame_is_said(straight, tmp_path, capsys):
    # A model learns its frame (on AAF val coverage 1.4 scored 0.65 years worse than 1.0): fine-tuning
    # it on faces framed otherwise is allowed, and said before training.
    other = tmp_path / "syn-cov1.0"
    assert build_main(["--synthetic", "24", "--out", str(other), "--folds", "3", "--coverage", "1.0", "--quiet"]) == 0
    src = straight[0] / CHECKPOINT_FILE
    assert main(_cli(str(other), tmp_path / "tuned", epochs=1) + ["--init-from", str(src)]) == 0
    said = capsys.readouterr().out
    assert f"warning: {src} was trained on faces framed otherwise than this shard set's (coverage 1.4 there, 1.0 here)" in said


def test_init_from_a_foreign_file_or_another_architecture_exits_2(shards, straight, tmp_path, capsys):
    from agecl.model import AgeModel

    weights = tmp_path / "resnet18.pth"
    torch.save(AgeModel(0, 1).backbone.state_dict(), weights)  # backbone weights: model.pretrained's kind
    out = tmp_path / "x"
    assert main(_cli(shards, out) + ["--init-from", str(weights)]) == 2
    err = capsys.readouterr().err
    assert f"{weights}: not an agecl checkpoint" in err and "Traceback" not in err
    src = straight[0] / CHECKPOINT_FILE
    assert main(_cli(shards, out) + ["--init-from", str(src), "--arch", "resnet34"]) == 2
    assert f"{src}: a resnet18 model; this run's is resnet34" in capsys.readouterr().err
    assert main(_cli(shards, out) + ["--all-folds", "--init-from", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt: no such checkpoint file" in capsys.readouterr().err
    assert not out.exists() or not any(out.rglob(CHECKPOINT_FILE)), "a refused source trains nothing"
