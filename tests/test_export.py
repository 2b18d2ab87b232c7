"""agecl-export: ONNX, TorchScript and torch.export round trips agree with the checkpoint.

Tolerance: max abs difference of the age and the std <= 1e-3 years in fp32, on random batches
whose sizes (1, 4) differ from the export batch (2). ONNX runs in onnxruntime when installed,
and in any case in the ONNX reference evaluator (pure numpy), so the check never depends on it.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from agecl import format as fmt
from agecl.checkpoint import load_model, save_checkpoint
from agecl.config import TrainConfig
from agecl.export import EXPORT_BATCH, load_runner, sidecar_path
from agecl.export import main as export_main
from agecl.model import AgeModel
from agecl.predict import AgePredictor

MIN_AGE, MAX_AGE = 10, 79
CROP = 64
TOLERANCE = 1e-3  # years
CHECK_BATCHES = (1, 4)  # unlike EXPORT_BATCH
assert EXPORT_BATCH not in CHECK_BATCHES


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    cfg = TrainConfig()
    cfg.loader.image_size = CROP
    torch.manual_seed(1)
    model = AgeModel(MIN_AGE, MAX_AGE)
    # A head that is not near uniform, so the distribution (and its std) is not trivially flat.
    with torch.no_grad():
        model.head.weight.mul_(20.0)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    save_checkpoint(path, config=cfg, model=model, min_age=MIN_AGE, max_age=MAX_AGE,
                    template={"size": 256, "coverage": 1.4}, epoch=3, step=30)
    return path


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory) -> dict[str, Path]:
    """All three artifacts, written by one CLI run (which verifies them itself)."""
    d = tmp_path_factory.mktemp("export")
    paths = {"onnx": d / "age.onnx", "torchscript": d / "age.pt", "torch.export": d / "age.pt2"}
    rc = export_main(["--checkpoint", str(ckpt), "--onnx", str(paths["onnx"]), "--torchscript",
                      str(paths["torchscript"]), "--export", str(paths["torch.export"])])
    assert rc == 0
    return paths


def _reference(ckpt: Path, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    model, _ = load_model(ckpt, "cpu")
    with torch.no_grad():
        _, logits = model(x)
        return model.expected_age(logits).numpy(), model.age_std(logits).numpy()


def _onnx_runners(path: Path, monkeypatch) -> list:
    runners = []
    try:
        import onnxruntime  # noqa: F401

        runners.append(load_runner("onnx", path))
    except ImportError:
        pass
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "onnxruntime", None)  # import fails: the reference evaluator is used
        runners.append(load_runner("onnx", path))
    return runners


@pytest.mark.parametrize("kind", ["onnx", "torchscript", "torch.export"])
def test_round_trip_agrees_with_checkpoint(kind, ckpt, exported, monkeypatch):
    path = exported[kind]
    runners = _onnx_runners(path, monkeypatch) if kind == "onnx" else [load_runner(kind, path)]
    g = torch.Generator().manual_seed(7)
    for n in CHECK_BATCHES:
        x = torch.randn(n, 3, CROP, CROP, generator=g)  # (n, 3, S, S) normalised crops
        want_age, want_std = _reference(ckpt, x)
        assert want_std.min() > 0.1  # a real distribution, not a spike
        for run, runtime in runners:
            age, std = run(x.numpy())
            assert age.shape == std.shape == (n,), runtime
            assert np.abs(age - want_age).max() <= TOLERANCE, runtime
            assert np.abs(std - want_std).max() <= TOLERANCE, runtime
    # The sidecar records the same check, made by the exporter on its own batches.
    meta = json.loads(sidecar_path(path).read_text())
    v = meta["verification"]
    assert v["passed"] and v["max_abs_diff_age"] <= TOLERANCE and v["max_abs_diff_std"] <= TOLERANCE
    assert EXPORT_BATCH not in v["batch_sizes"]


def test_sidecar_is_enough_to_serve(ckpt, exported):
    """Preprocess an aligned face from the sidecar alone; the exported graph then agrees with agecl-predict."""
    meta = json.loads(sidecar_path(exported["torch.export"]).read_text())
    pre = meta["preprocess"]
    assert meta["kind"] == "torch.export" and meta["artifact"] == "age.pt2"
    assert (meta["min_age"], meta["max_age"]) == (MIN_AGE, MAX_AGE)
    assert meta["inputs"][0]["shape"] == ["batch", 3, CROP, CROP]
    assert [o["name"] for o in meta["outputs"]] == ["age", "std"]
    assert (pre["template_size"], pre["coverage"], pre["crop_size"]) == (256, 1.4, CROP)
    assert pre["border"] == "reflect"  # a checkpoint that names no border was made with the old default
    np.testing.assert_allclose(pre["template_points"], fmt.face_template(256, 1.4), atol=1e-3)
    rng = np.random.default_rng(3)
    faces = rng.integers(0, 256, size=(3, 256, 256, 3), dtype=np.uint8)  # aligned faces
    o, s = pre["crop_offset"], pre["crop_size"]
    x = faces[:, o : o + s, o : o + s].astype(np.float32) * np.float32(pre["scale"])
    x = (x - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)
    x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # (N, 3, S, S)
    program = torch.export.load(str(exported["torch.export"])).module()
    with torch.no_grad():
        age, std = (t.numpy() for t in program(torch.from_numpy(x)))
    want_age, want_std = AgePredictor(ckpt, "cpu").predict_aligned(faces)
    assert np.abs(age - want_age).max() <= TOLERANCE and np.abs(std - want_std).max() <= TOLERANCE


def test_probabilities_output(ckpt, tmp_path):
    path = tmp_path / "age.pt2"
    assert export_main(["--checkpoint", str(ckpt), "--export", str(path), "--probs"]) == 0
    program = torch.export.load(str(path)).module()
    x = torch.randn(3, 3, CROP, CROP)
    with torch.no_grad():
        age, std, probs = program(x)
    assert probs.shape == (3, MAX_AGE - MIN_AGE + 1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    torch.testing.assert_close(age, MIN_AGE + probs @ torch.arange(MAX_AGE - MIN_AGE + 1.0))
    meta = json.loads(sidecar_path(path).read_text())
    assert [o["name"] for o in meta["outputs"]] == ["age", "std", "probs"]


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export_main(["--checkpoint", "x.pt"])  # no artifact asked for
    assert e.value.code == 2
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 10)
    assert export_main(["--checkpoint", str(bad), "--export", str(tmp_path / "a.pt2")]) == 2
    assert "bad.pt" in capsys.readouterr().err
    assert not (tmp_path / "a.pt2").exists()


def test_onnx_without_its_packages_is_a_clear_error(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails, as where agecl[export] is absent
    with pytest.raises(SystemExit) as e:
        export_main(["--checkpoint", str(ckpt), "--onnx", str(tmp_path / "a.onnx")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "onnxscript" in err and "agecl[export]" in err
    assert not (tmp_path / "a.onnx").exists()
