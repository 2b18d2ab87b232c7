"""Evaluation: metrics against hand arithmetic, identity invariance on constructed vectors, fold
results and their aggregation through real files, the plots as real PNGs, `predict` with real
modules, and the `agecl-eval --aggregate` command line end to end."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from agecl import evaluate as ev
from agecl.evaluate import (
    Predictions,
    aggregate,
    identity_variance,
    main,
    mean_age_baseline,
    metrics,
    predict,
    write_fold_results,
)

# --- metrics: hand-computed ----------------------------------------------------------------------


def test_mae_cs5_bias_by_hand():
    ages = np.array([20, 30, 40, 50])
    expected = np.array([25.0, 30.5, 34.0, 50.0])  # errors 5 (boundary), 0.5, 6, 0
    m = metrics(expected, ages)
    assert m["n"] == 4
    assert m["mae"] == pytest.approx((5 + 0.5 + 6 + 0) / 4)
    assert m["cs5"] == pytest.approx(3 / 4), "|e| = 5 counts as within 5 years"
    assert m["bias"] == pytest.approx((5 + 0.5 - 6 + 0) / 4)
    assert "identity_feature_variance" not in m


def test_mae_by_age_groups_including_70_plus():
    ages = np.array([0, 9, 10, 19, 45, 69, 70, 85])
    expected = np.array([1.0, 11.0, 10.0, 16.0, 45.5, 60.0, 74.0, 80.0])
    by = metrics(expected, ages)["mae_by_age"]
    assert list(by) == ["0-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+"]
    assert by["0-9"] == {"mae": pytest.approx(1.5), "n": 2}  # |1-0|, |11-9|
    assert by["10-19"] == {"mae": pytest.approx(1.5), "n": 2}  # 0, 3
    assert by["20-29"] == {"mae": None, "n": 0}, "empty group: n = 0, mae null"
    assert by["40-49"] == {"mae": pytest.approx(0.5), "n": 1}
    assert by["60-69"] == {"mae": pytest.approx(9.0), "n": 1}
    assert by["70+"] == {"mae": pytest.approx(4.5), "n": 2}  # 4, 5
    assert sum(g["n"] for g in by.values()) == len(ages)
    json.dumps(by)  # plain values only


def test_metrics_rejects_mismatched_and_empty():
    with pytest.raises(ValueError):
        metrics(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError):
        metrics(np.zeros(0), np.zeros(0))


def test_mean_age_baseline():
    # mean training age 30: |20-30|, |30-30|, |45-30| -> (10 + 0 + 15) / 3
    assert mean_age_baseline([20, 30, 40], [20, 30, 45]) == pytest.approx(25 / 3)
    with pytest.raises(ValueError):
        mean_age_baseline([], [1])


# --- identity invariance -------------------------------------------------------------------------


def test_identity_variance_zero_for_identical_features():
    ids = np.array([3, 3, 3, 7, 7])
    f = np.repeat(np.arange(2 * 4, dtype=np.float32).reshape(2, 4), [3, 2], axis=0)  # same row within a person
    value, groups = identity_variance(f, ids)
    assert value == 0.0 and groups == 2


def test_identity_variance_known_values():
    # Person 0: rows (0,0), (2,4): per-dim unbiased variances 2 and 8 -> mean 5.
    # Person 1: rows (1,1), (1,1), (4,1): dim 0 values 1,1,4 -> mean 2, var (1+1+4)/2 = 3; dim 1: 0 -> mean 1.5.
    # Person 2: one image: skipped. Mean over persons: (5 + 1.5) / 2.
    f = np.array([[0, 0], [1, 1], [2, 4], [1, 1], [4, 1], [9, 9]], dtype=np.float32)
    ids = np.array([10, 20, 10, 20, 20, 30])
    value, groups = identity_variance(f, ids)
    assert groups == 2
    assert value == pytest.approx((5 + 1.5) / 2)
    # The same number by the definition, with numpy's per-person var (ddof=1).
    ref = np.mean([f[ids == i].var(axis=0, ddof=1).mean() for i in (10, 20)])
    assert value == pytest.approx(ref)


def test_direction_variance_ignores_the_scale_of_features():
    # Person 0: the same direction at three scales; person 1: two orthogonal unit vectors, each
    # scaled. Unit vectors: person 0 has variance 0; person 1 has (1,0), (0,1): per-dim var 0.5, 0.5.
    f = np.array([[1, 1], [3, 3], [0, 2], [10, 10], [5, 0]], dtype=np.float32)
    ids = np.array([0, 0, 1, 0, 1])
    m = metrics(np.zeros(5), np.zeros(5), ids, features=f)
    assert m["identity_feature_variance"] > 1  # raw features: scale counts
    assert m["identity_direction_variance"] == pytest.approx((0 + 0.5) / 2)
    scaled = metrics(np.zeros(5), np.zeros(5), ids, features=f * np.array([[7], [0.1], [2], [3], [0.5]]))
    assert scaled["identity_direction_variance"] == pytest.approx(m["identity_direction_variance"])


def test_identity_variance_random_against_loop_and_in_metrics():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 9, 200)
    f = rng.normal(size=(200, 512)).astype(np.float32)
    s = rng.dirichlet(np.ones(6), 200).astype(np.float32)
    m = metrics(rng.uniform(0, 60, 200), rng.integers(0, 60, 200), ids, f, s)
    ref_f = np.mean([f[ids == i].var(axis=0, ddof=1).mean() for i in np.unique(ids) if (ids == i).sum() >= 2])
    ref_s = np.mean([s[ids == i].var(axis=0, ddof=1).mean() for i in np.unique(ids) if (ids == i).sum() >= 2])
    assert m["identity_feature_variance"] == pytest.approx(ref_f, rel=1e-6)
    assert m["identity_softmax_variance"] == pytest.approx(ref_s, rel=1e-6)
    assert m["identity_groups"] == 9


def test_identity_variance_single_images_only():
    assert identity_variance(np.ones((3, 4)), np.array([1, 2, 3])) == (None, 0)


# --- predict with real modules -------------------------------------------------------------------


def _batches(images: torch.Tensor, ages, identities, batch_size: int):
    """An evaluation loader's batches: the real EvalBatch when agecl.loader exists."""
    try:
        from agecl.loader import EvalBatch
    except ImportError:  # the loader module not written yet: same fields
        EvalBatch = lambda **kw: SimpleNamespace(**kw)  # noqa: E731
    ages, identities = torch.as_tensor(ages, dtype=torch.int64), torch.as_tensor(identities, dtype=torch.int64)
    ids = torch.arange(len(images)) + 100
    out = []
    for lo in range(0, len(images), batch_size):
        sl = slice(lo, lo + batch_size)
        out.append(EvalBatch(images=images[sl], ages=ages[sl], identities=identities[sl], ids=ids[sl]))
    return out


class OneHot(nn.Module):
    """Puts (almost) all probability on class `x[:, 0, 0, 0]`: the expected age is known exactly."""

    def __init__(self, classes: int, min_age: int):
        super().__init__()
        self.min_age = min_age
        self.classes = classes
        self.proj = nn.Linear(3, 8)

    def forward(self, x):
        f = self.proj(x.mean(dim=(2, 3)))  # (B, 8)
        logits = 100.0 * nn.functional.one_hot(x[:, 0, 0, 0].long(), self.classes).float()  # (B, A)
        return f, logits


def test_predict_known_distribution_and_bf16_autocast():
    cls = torch.tensor([0, 3, 5, 2, 1])
    images = cls[:, None, None, None].float().expand(5, 3, 4, 4).contiguous()
    model = OneHot(classes=6, min_age=10)
    model.train()
    for ctx in (None, torch.autocast("cpu", dtype=torch.bfloat16)):
        p = predict(model, _batches(images, [10, 13, 15, 12, 11], [0, 0, 1, 1, 2], 2), ctx)
        assert model.training, "the model's mode is restored"
        np.testing.assert_allclose(p.expected, 10 + cls.numpy(), atol=1e-4)
        np.testing.assert_allclose(p.std, 0, atol=1e-3)
        assert p.expected.dtype == np.float32 and p.features.dtype == np.float32 and p.probs.dtype == np.float32
        assert p.features.shape == (5, 8) and p.probs.shape == (5, 6)
        assert p.ids.tolist() == [100, 101, 102, 103, 104] and p.ids.dtype == np.int64
        assert p.identities.tolist() == [0, 0, 1, 1, 2] and p.ages.tolist() == [10, 13, 15, 12, 11]
    m = metrics(p.expected, p.ages, p.identities, p.features, p.probs)
    assert m["mae"] == pytest.approx(0, abs=1e-4)
    assert m["identity_groups"] == 2


def test_predict_real_age_model():
    from agecl.model import AgeModel

    torch.manual_seed(0)
    model = AgeModel(min_age=16, max_age=30).eval()
    images = torch.randn(6, 3, 16, 16)  # tiny crops: ResNet-18 pools to 1x1 anyway
    p = predict(model, _batches(images, [16, 20, 25, 30, 18, 22], [1, 1, 2, 2, 3, 3], 4))
    with torch.no_grad():
        f, logits = model(images)
        want = model.expected_age(logits).numpy()
        want_std = model.age_std(logits).numpy()
    np.testing.assert_allclose(p.expected, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(p.std, want_std, rtol=1e-4, atol=1e-4)
    assert p.features.shape == (6, 512) and p.probs.shape == (6, 15)
    np.testing.assert_allclose(p.probs.sum(1), 1, atol=1e-5)
    assert np.all((p.expected >= 16) & (p.expected <= 30))
    p2 = predict(model, _batches(images, [16] * 6, [0] * 6, 6), keep_features=False)
    assert p2.features is None and p2.probs is None


class LeftColumn(nn.Module):
    """All probability on class `x[:, 0, 0, 0]`, the top-left pixel: its mirror reads the top-right one."""

    def __init__(self, classes: int, min_age: int):
        super().__init__()
        self.min_age, self.classes = min_age, classes

    def forward(self, x):
        f = x[:, 0, 0, :2].float()  # (B, 2): the two leftmost pixels of the first row
        return f, 100.0 * nn.functional.one_hot(x[:, 0, 0, 0].long(), self.classes).float()


def test_predict_flip_averages_each_face_with_its_mirror():
    # Face k: class a_k at its left edge, b_k at its right edge. With the mirror averaged in, the
    # distribution is half a, half b: expected age min_age + (a + b) / 2, std |a - b| / 2, and the
    # features the mean of the face's and its mirror's.
    a, b = torch.tensor([0, 4, 2, 5]), torch.tensor([4, 4, 5, 1])
    images = torch.zeros(4, 3, 4, 4)
    images[:, 0, 0, 0], images[:, 0, 0, -1] = a.float(), b.float()
    model = LeftColumn(classes=6, min_age=20)
    plain = predict(model, _batches(images, [20] * 4, [0, 0, 1, 1], 3))
    flip = predict(model, _batches(images, [20] * 4, [0, 0, 1, 1], 3), tta="flip")
    np.testing.assert_allclose(plain.expected, 20 + a.numpy(), atol=1e-4)
    np.testing.assert_allclose(flip.expected, 20 + (a + b).numpy() / 2, atol=1e-4)
    np.testing.assert_allclose(flip.std, (a - b).abs().numpy() / 2, atol=1e-3)
    np.testing.assert_allclose(flip.features, 0.5 * (images[:, 0, 0, :2] + images[:, 0, 0, [-1, -2]]).numpy())
    np.testing.assert_allclose(flip.probs.sum(1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="tta"):
        predict(model, _batches(images, [20] * 4, [0] * 4, 4), tta="rotate")


def test_predict_flip_of_a_real_age_model_is_the_mean_of_two_softmaxes():
    from agecl.model import AgeModel

    torch.manual_seed(1)
    model = AgeModel(min_age=0, max_age=20).eval()
    images = torch.randn(5, 3, 16, 16)
    p = predict(model, _batches(images, [5] * 5, range(5), 2), tta="flip")
    with torch.no_grad():
        s = 0.5 * (model(images)[1].softmax(-1) + model(images.flip(-1))[1].softmax(-1))  # (5, 21)
    np.testing.assert_allclose(p.probs, s.numpy(), atol=1e-5)
    np.testing.assert_allclose(p.expected, (s @ torch.arange(21.0)).numpy(), atol=1e-4)


def test_predict_empty_loader():
    with pytest.raises(ValueError, match="no batches"):
        predict(OneHot(3, 0), [])


# --- fold results and aggregation through real files ---------------------------------------------


def _fold(run: Path, fold: int, ages, expected, protocol: str, n_folds: int | None, ids=None, features=True,
          config=None, machine=None) -> dict:
    ages = np.asarray(ages, np.int64)
    expected = np.asarray(expected, np.float32)
    n = len(ages)
    ident = np.full(n, fold, np.int64)
    p = Predictions(
        ids=np.arange(n, dtype=np.int64) + 1000 * fold if ids is None else np.asarray(ids, np.int64),
        ages=ages,
        expected=expected,
        std=np.full(n, 2.0, np.float32),
        identities=ident,
        features=np.random.default_rng(fold).normal(size=(n, 4)).astype(np.float32) if features else None,
        probs=None,
    )
    m = metrics(p.expected, p.ages, p.identities, p.features, p.probs)
    return write_fold_results(
        run / f"fold-{fold}", p, m, protocol, fold,
        {"mean_age_baseline": 10.0 + fold, "epochs": 3, **({"config": config} if config else {}),
         **({"machine": machine} if machine else {})}, n_folds=n_folds
    )


def _assert_png(path: Path):
    from PIL import Image
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    assert mpimg.imread(str(path)).ndim == 3


def test_write_fold_results_files(tmp_path):
    r = _fold(tmp_path, 2, [20, 30, 40], [25, 30, 30], "rs", 5)
    d = tmp_path / "fold-2"
    on_disk = json.loads((d / "results.json").read_text())
    assert on_disk == r
    assert r["protocol"] == "rs" and r["fold"] == 2 and r["folds"] == 5 and r["n_test"] == 3
    assert r["test_mae"] == pytest.approx(5.0) and r["test_cs5"] == pytest.approx(2 / 3)
    assert r["mean_age_baseline"] == 12.0 and r["epochs"] == 3
    assert set(r["mae_by_age"]) >= {"20-29", "70+"}
    assert r["identity_feature_variance"] is not None and r["identity_groups"] == 1
    with np.load(d / "predictions.npz") as z:
        assert sorted(z.files) == ["ages", "expected", "identities", "ids", "std"]
        assert z["expected"].tolist() == [25, 30, 30]
    assert not list(d.glob(".*")), "no temporary files left behind"


def test_aggregate_mean_over_folds(tmp_path):
    # Fold 0: errors 1, 1 -> MAE 1, CS 1. Fold 1: errors 0, 6, 9, 3 -> MAE 4.5, CS 0.5.
    _fold(tmp_path, 0, [20, 30], [21, 29], "morph-rs", 2)
    _fold(tmp_path, 1, [20, 30, 40, 50], [20, 36, 31, 53], "morph-rs", 2)
    s = aggregate(tmp_path)
    assert s["rule"] == "mean_over_folds" and s["complete"] and s["folds_missing"] == []
    assert s["test_mae"] == pytest.approx((1 + 4.5) / 2)
    assert s["test_mae_std"] == pytest.approx(np.std([1, 4.5], ddof=1))
    assert s["test_cs5"] == pytest.approx((1 + 0.5) / 2)
    assert s["pooled"]["mae"] == pytest.approx((1 + 1 + 0 + 6 + 9 + 3) / 6)
    assert s["pooled"]["n"] == s["n_test"] == 6
    assert s["mean_age_baseline"] == pytest.approx(10.5)  # plain mean of 10 and 11 under this rule
    assert [f["fold"] for f in s["per_fold"]] == [0, 1]
    assert json.loads((tmp_path / "results.json").read_text())["test_mae"] == pytest.approx(2.75)
    md = (tmp_path / "results.md").read_text()
    assert "mean +- sample std" in md and "| 0 | 2 | 1.00 | 100.0% | 10.00 |" in md
    assert "| 1 | 4 | 4.50 | 50.0% | 11.00 |" in md
    assert "| **mean ± std over folds** | 2 folds | 2.75 ± 2.47 |" in md
    assert "| **pooled** | 6 | 3.33 |" in md
    assert "All 2 folds finished" in md
    _assert_png(tmp_path / "pred_vs_true.png")
    _assert_png(tmp_path / "mae_by_age.png")


def test_aggregate_lopo_pools_predictions(tmp_path):
    # Three people with 1, 2 and 5 images: the pooled MAE weights images, the fold mean people.
    _fold(tmp_path, 0, [5], [9], "lopo", 3)  # error 4
    _fold(tmp_path, 1, [10, 12], [10, 12], "lopo", 3)  # errors 0, 0
    _fold(tmp_path, 2, [60, 65, 70, 75, 80], [61, 66, 71, 76, 90], "lopo", 3)  # 1, 1, 1, 1, 10
    s = aggregate(tmp_path)
    assert s["rule"] == "pooled" and "pooled over all 8 test predictions" in s["rule_text"]
    assert s["test_mae"] == pytest.approx((4 + 0 + 0 + 1 + 1 + 1 + 1 + 10) / 8)
    assert s["test_cs5"] == pytest.approx(7 / 8)
    assert s["test_mae_std"] is None
    assert s["over_folds"]["mae_mean"] == pytest.approx((4 + 0 + 14 / 5) / 3), "mean over folds still reported"
    # baseline under the pooled rule: weighted by test images, (10*1 + 11*2 + 12*5) / 8
    assert s["mean_age_baseline"] == pytest.approx((10 + 22 + 60) / 8)
    assert s["pooled"]["mae_by_age"]["70+"]["n"] == 3
    # Identity invariance: the mean over persons with >= 2 images (folds 1 and 2; fold 0 has one).
    per = {k: json.loads((tmp_path / f"fold-{k}" / "results.json").read_text()) for k in range(3)}
    assert per[0]["identity_feature_variance"] is None and per[0]["identity_groups"] == 0
    want = (per[1]["identity_feature_variance"] + per[2]["identity_feature_variance"]) / 2
    assert s["identity_feature_variance"] == pytest.approx(want) and s["identity_groups"] == 2
    md = (tmp_path / "results.md").read_text()
    assert "Rule: leave-one-person-out" in md and "**MAE 2.25, CS(5) 87.5%** on 8 test images" in md
    assert "Identity invariance (Table 5) over 2 identities" in md
    assert ev.is_pooled_protocol("fgnet-lopo") and not ev.is_pooled_protocol("morph-se")


def test_aggregate_reports_missing_folds(tmp_path):
    for k in (0, 1, 3):
        _fold(tmp_path, k, [20, 30], [22, 30], "se", 5)
    (tmp_path / "fold-2").mkdir()  # started, killed before its results
    s = aggregate(tmp_path)
    assert s["folds_finished"] == [0, 1, 3] and s["folds_missing"] == [2, 4] and not s["complete"]
    assert s["status"] == "3 of 5 folds finished: 0, 1, 3 (missing: 2, 4)"
    md = (tmp_path / "results.md").read_text()
    assert "3 of 5 folds finished: 0, 1, 3" in md and "Partial result" in md
    # Without a recorded fold count: the fold folders tell (0..3 exist, 2 unfinished).
    for k in (0, 1, 3):
        r = json.loads((tmp_path / f"fold-{k}" / "results.json").read_text())
        del r["folds"]
        (tmp_path / f"fold-{k}" / "results.json").write_text(json.dumps(r))
    assert aggregate(tmp_path)["folds_missing"] == [2]


def test_aggregate_says_when_folds_were_not_trained_alike(tmp_path):
    # A LOPO row resumed in a later session: folds 2-3 fine-tuned from a rebuilt source model (another
    # sha256, found at another path) and fold 3 also with another learning rate.
    def config(fold, sha, path, lr=2e-4):
        return {"data": {"shards": "shards/fgnet", "fold": fold}, "out": f"runs/row/fold-{fold}", "name": f"row-fold{fold}",
                "lr": lr, "model": {"arch": "resnet18", "init_source": {"path": path, "sha256": sha}}}

    for k in (0, 1):
        _fold(tmp_path, k, [20, 30], [22, 30], "lopo", 4, config=config(k, "a" * 64, "/work/main/runs/aaf/checkpoint.pt"))
    _fold(tmp_path, 2, [20, 30], [22, 30], "lopo", 4, config=config(2, "b" * 64, "/tmp/ci/runs/aaf/checkpoint.pt"))
    _fold(tmp_path, 3, [20, 30], [22, 30], "lopo", 4, config=config(3, "b" * 64, "/tmp/ci/runs/aaf/checkpoint.pt", 1e-3))
    s = aggregate(tmp_path)
    # The fold, its folder, its name and the source's path differ by design; the rest is reported.
    assert s["config_differences"] == {
        "lr": {"0.0002": [0, 1, 2], "0.001": [3]},
        "model.init_source.sha256": {json.dumps("a" * 64): [0, 1], json.dumps("b" * 64): [2, 3]},
    }
    line = "the folds were not trained alike: lr = 0.0002 (folds 0-2), 0.001 (folds 3); model.init_source.sha256 = "
    assert s["problems"] == [line + '"aaaaaaaaaaaaaaaaaaaaaa… (folds 0, 1), "bbbbbbbbbbbbbbbbbbbbbb… (folds 2, 3)']
    assert "- Warning: " + line in (tmp_path / "results.md").read_text()
    # Folds trained alike (the same source model, wherever it lay) raise nothing.
    (tmp_path / "fold-3").rename(tmp_path / "set-aside-3")
    for k in (0, 1):
        _fold(tmp_path, k, [20, 30], [22, 30], "lopo", 4, config=config(k, "b" * 64, "/work/main/runs/aaf/checkpoint.pt"))
    s = aggregate(tmp_path)
    assert s["config_differences"] == {} and s["problems"] == []
    # A source rebuilt bit for bit: the files' sha256 differ, the weights' do not. One model.
    for k, sha in ((0, "a"), (1, "a"), (2, "b")):
        c = config(k, sha * 64, "/work/main/runs/aaf/checkpoint.pt")
        c["model"]["init_source"]["weights_sha256"] = "w" * 64
        _fold(tmp_path, k, [20, 30], [22, 30], "lopo", 4, config=c)
    assert aggregate(tmp_path)["config_differences"] == {}
    c["model"]["init_source"]["weights_sha256"] = "v" * 64  # fold 2 from other weights after all
    _fold(tmp_path, 2, [20, 30], [22, 30], "lopo", 4, config=c)
    assert set(aggregate(tmp_path)["config_differences"]) == {"model.init_source.sha256", "model.init_source.weights_sha256"}


def test_aggregate_names_the_folds_that_ran_on_another_machine(tmp_path):
    # One recipe, one source model; a row resumed on another machine (fold 0 of a LOPO row scored
    # 4.78 with one thread, on a Zen 4 and a Zen 5 alike, and 4.70 with two threads).
    def machine(family, threads):
        return {"device": "cpu", "processor": f"AMD EPYC (family {family}, model 2)", "threads": threads,
                "precision": "bf16", "torch": "2.15.0"}

    config = {"lr": 2e-4, "model": {"arch": "resnet18"}}
    _fold(tmp_path, 0, [20], [22], "lopo", 3, config=config, machine=machine(25, 1))
    _fold(tmp_path, 1, [30], [30], "lopo", 3, config=config, machine=machine(26, 1))
    _fold(tmp_path, 2, [40], [41], "lopo", 3, config=config, machine=machine(26, 2))
    s = aggregate(tmp_path)
    assert s["config_differences"] == {
        "machine.processor": {json.dumps("AMD EPYC (family 25, model 2)"): [0], json.dumps("AMD EPYC (family 26, model 2)"): [1, 2]},
        "machine.threads": {"1": [0, 1], "2": [2]},
    }
    assert s["problems"] == ['the folds were not trained alike: machine.processor = "AMD EPYC (family 25, m… (folds 0), '
                             '"AMD EPYC (family 26, m… (folds 1, 2); machine.threads = 1 (folds 0, 1), 2 (folds 2)']
    # Folds from before the machine was recorded, beside folds that record one: unknown is named.
    _fold(tmp_path, 0, [20], [22], "lopo", 3, config=config)
    assert s["config_differences"]["machine.processor"] and aggregate(tmp_path)["config_differences"]["machine.torch"] == {
        "null": [0], json.dumps("2.15.0"): [1, 2]}


def test_aggregate_nothing_finished(tmp_path):
    (tmp_path / "fold-0").mkdir()
    with pytest.raises(FileNotFoundError, match="no finished fold"):
        aggregate(tmp_path)


def test_ranges():
    assert ev._ranges([0, 1, 2, 3, 5, 7, 8, 10]) == "0-3, 5, 7, 8, 10"


# --- the command line ----------------------------------------------------------------------------


def test_cli_aggregate_end_to_end(tmp_path, capsys):
    run = tmp_path / "fgnet-lopo"
    _fold(run, 0, [5, 7], [6, 7], "fgnet-lopo", 3)
    _fold(run, 2, [40], [48], "fgnet-lopo", 3)
    assert main(["--aggregate", str(run)]) == 0
    out = capsys.readouterr().out
    assert "2 of 3 folds finished: 0, 2 (missing: 1)" in out
    assert "| fold | n | MAE | CS(5) | baseline MAE |" in out and "| **pooled** | 3 | 3.00 |" in out
    for name in ("results.json", "results.md", "pred_vs_true.png", "mae_by_age.png"):
        assert (run / name).is_file()
    _assert_png(run / "pred_vs_true.png")
    assert main(["--aggregate", str(tmp_path / "nothing")]) == 2
    assert "no such run folder" in capsys.readouterr().err


def _tiny_shards(root: Path) -> np.ndarray:
    """Ten real 256x256 JPEG samples of five people in two person-disjoint folds; returns the folds."""
    import io

    from PIL import Image

    from agecl.shards import Sample, write_manifest, write_samples, write_split

    samples = []
    for i in range(10):
        buf = io.BytesIO()
        Image.fromarray(np.full((256, 256, 3), 20 * i, np.uint8)).save(buf, "JPEG", quality=90)
        samples.append(Sample(age=18 + 3 * i, identity=f"p{i % 5}", source=f"p{i % 5}_{i}.jpg", jpeg=buf.getvalue()))
    written = write_samples(root, samples, shard_size=4)
    person = np.array([int(written.identities[k][1:]) for k in written.index["identity"]])
    folds = (person % 2).astype(np.int16)
    write_split(root, "kfold", folds, {"protocol": "kfold", "seed": 0})
    write_manifest(root, written, dataset="test", default_protocol="kfold", splits=["kfold"])
    return folds


def test_cli_checkpoint_end_to_end(tmp_path, capsys):
    from agecl.checkpoint import save_checkpoint
    from agecl.config import TrainConfig, apply_overrides
    from agecl.model import AgeModel
    from agecl.reader import ShardSet

    shards = tmp_path / "shards"
    folds = _tiny_shards(shards)
    cfg = apply_overrides(
        TrainConfig(),
        [f"data.shards={shards}", "data.fold=1", "loader.loader=torch", "loader.workers=0", "loader.image_size=32"],
    )
    torch.manual_seed(0)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(
        ckpt, config=cfg, model=AgeModel(18, 45), min_age=18, max_age=45,
        template={"size": 256, "coverage": 1.4}, epoch=2, step=10,
    )
    assert main(["--checkpoint", str(ckpt), "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "kfold fold 1" in out.out and "MAE " in out.out and "mean-age baseline MAE" in out.out
    assert "identity invariance over" in out.out and "WARNING" not in out.err
    r = json.loads((tmp_path / "run" / "eval-kfold-fold-1" / "results.json").read_text())
    ages = ShardSet(shards).ages
    assert r["protocol"] == "kfold" and r["fold"] == 1 and r["folds"] == 2 and r["n_test"] == int((folds == 1).sum())
    assert r["mean_age_baseline"] == pytest.approx(mean_age_baseline(ages[folds == 0], ages[folds == 1]))
    assert r["epochs"] == 2 and r["identity_groups"] == 2  # persons p1, p3: two images each
    with np.load(tmp_path / "run" / "eval-kfold-fold-1" / "predictions.npz") as z:
        assert sorted(z["ids"].tolist()) == np.flatnonzero(folds == 1).tolist()
        assert np.all((z["expected"] >= 18) & (z["expected"] <= 45))
    # Another fold than the one trained for: evaluated, with a warning; a missing checkpoint: exit 2.
    assert main(["--checkpoint", str(ckpt), "--device", "cpu", "--fold", "0", "--out", str(tmp_path / "f0")]) == 0
    assert "WARNING" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    # --tta flip: the mirror averaged in, recorded; without the flag, the checkpoint's test_tta.
    assert main(["--checkpoint", str(ckpt), "--device", "cpu", "--tta", "flip", "--out", str(tmp_path / "flip")]) == 0
    assert "each with its mirror" in capsys.readouterr().out
    assert json.loads((tmp_path / "flip" / "results.json").read_text())["tta"] == "flip"
    assert r["tta"] == "none"
    cfg.test_tta = "flip"
    save_checkpoint(
        tmp_path / "flip-run" / "checkpoint.pt", config=cfg, model=AgeModel(18, 45), min_age=18, max_age=45,
        template={"size": 256, "coverage": 1.4}, epoch=2, step=10,
    )
    assert main(["--checkpoint", str(tmp_path / "flip-run" / "checkpoint.pt"), "--device", "cpu"]) == 0
    assert "each with its mirror" in capsys.readouterr().out


def test_cli_wise_ft_tests_the_blend_with_the_recorded_source(tmp_path, capsys):
    """--wise-ft W: the fine-tuned weights moved towards the source's; W=0 scores the source itself
    (on the fine-tuned run's head range), W=1 the model as it is; no recorded source: exit 2."""
    from agecl.checkpoint import save_checkpoint
    from agecl.config import TrainConfig, apply_overrides
    from agecl.finetune import describe, load_source
    from agecl.model import AgeModel

    shards = tmp_path / "shards"
    _tiny_shards(shards)
    cfg = apply_overrides(
        TrainConfig(),
        [f"data.shards={shards}", "data.fold=1", "loader.loader=torch", "loader.workers=0", "loader.image_size=32"],
    )
    template = {"size": 256, "coverage": 1.4}
    torch.manual_seed(0)
    source = tmp_path / "source" / "checkpoint.pt"
    save_checkpoint(source, config=cfg, model=AgeModel(18, 45), min_age=18, max_age=45, template=template, epoch=3, step=9)
    cfg.model.init_from = str(source)
    cfg.model.init_source = describe(load_source(str(source), "resnet18"))
    torch.manual_seed(1)
    tuned = tmp_path / "tuned" / "checkpoint.pt"
    save_checkpoint(tuned, config=cfg, model=AgeModel(18, 45), min_age=18, max_age=45, template=template, epoch=1, step=2)

    def expected(out: str, *flags: str) -> np.ndarray:
        assert main(["--checkpoint", str(tuned), "--device", "cpu", "--out", str(tmp_path / out), *flags]) == 0
        with np.load(tmp_path / out / "predictions.npz") as z:
            return z["expected"][np.argsort(z["ids"])]

    as_tuned, halfway, as_source = expected("w1"), expected("w05", "--wise-ft", "0.5"), expected("w0", "--wise-ft", "0")
    assert "wise-ft 0: 0 x fine-tuned + 1 x source" in capsys.readouterr().out
    assert main(["--checkpoint", str(source), "--device", "cpu", "--out", str(tmp_path / "src")]) == 0
    with np.load(tmp_path / "src" / "predictions.npz") as z:
        np.testing.assert_allclose(as_source, z["expected"][np.argsort(z["ids"])], rtol=1e-5)
    assert not np.allclose(halfway, as_tuned) and not np.allclose(halfway, as_source)
    assert json.loads((tmp_path / "w05" / "results.json").read_text())["wise_ft"] == 0.5
    assert json.loads((tmp_path / "w1" / "results.json").read_text())["wise_ft"] == 1.0
    capsys.readouterr()
    # A model trained from scratch has no source to blend with.
    assert main(["--checkpoint", str(source), "--device", "cpu", "--wise-ft", "0.5", "--out", str(tmp_path / "y")]) == 2
    assert "not fine-tuned from another agecl run" in capsys.readouterr().err
    # The source has changed since: not the recorded file (sha256), exit 2 naming it.
    torch.manual_seed(2)
    save_checkpoint(source, config=cfg, model=AgeModel(18, 45), min_age=18, max_age=45, template=template, epoch=3, step=9)
    capsys.readouterr()
    assert main(["--checkpoint", str(tuned), "--device", "cpu", "--wise-ft", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert f"{source}: not the checkpoint the run started from" in capsys.readouterr().err


def test_cli_all_tests_every_sample_of_another_set(tmp_path, capsys):
    """--all: a model of one shard set tested on every sample of another (zero-shot), with ages
    outside the model's head (its expected age still counts against the true one)."""
    from agecl.checkpoint import save_checkpoint
    from agecl.config import TrainConfig, apply_overrides
    from agecl.model import AgeModel
    from agecl.reader import ShardSet

    trained_on, other = tmp_path / "trained", tmp_path / "other"
    _tiny_shards(trained_on)
    _tiny_shards(other)
    cfg = apply_overrides(
        TrainConfig(),
        [f"data.shards={trained_on}", "loader.loader=torch", "loader.workers=0", "loader.image_size=32"],
    )
    torch.manual_seed(0)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(ckpt, config=cfg, model=AgeModel(30, 40), min_age=30, max_age=40,
                    template={"size": 256, "coverage": 1.4}, epoch=1, step=1)
    assert main(["--checkpoint", str(ckpt), "--device", "cpu", "--shards", str(other), "--all"]) == 0
    out = capsys.readouterr()
    assert f"every sample of {other}" in out.out and "mean-age baseline" not in out.out and "WARNING" not in out.err
    r = json.loads((tmp_path / "run" / "eval-other-all" / "results.json").read_text())
    ages = ShardSet(other).ages
    assert r["protocol"] == "all" and r["folds"] == 1 and r["n_test"] == len(ages) and r["n_train"] == 0
    with np.load(tmp_path / "run" / "eval-other-all" / "predictions.npz") as z:
        assert sorted(z["ids"].tolist()) == list(range(len(ages)))
        assert np.all((z["expected"] >= 30) & (z["expected"] <= 40))
        order = np.argsort(z["ids"])
        assert r["test_mae"] == pytest.approx(np.abs(z["expected"][order] - ages).mean(), rel=1e-5)
    # On the set the model trained on: evaluated, with a warning; with a fold: refused (exit 2).
    assert main(["--checkpoint", str(ckpt), "--device", "cpu", "--all", "--out", str(tmp_path / "same")]) == 0
    assert "includes its training images" in capsys.readouterr().err
    assert main(["--checkpoint", str(ckpt), "--device", "cpu", "--all", "--fold", "1"]) == 2
    assert "takes no --protocol or --fold" in capsys.readouterr().err


# --- Training curves (agecl.plots) ---------------------------------------------------------------


def _metrics_file(run: Path, epochs: dict[int, float], extra_lines: str = "") -> None:
    """A metrics.jsonl as the trainer writes it: step and epoch rows; `epochs` maps epoch -> total."""
    run.mkdir(parents=True, exist_ok=True)
    rows = []
    for e, total in epochs.items():
        rows.append({"kind": "step", "epoch": e, "step": 10 * e - 5, "total": 99.0})
        rows.append({"kind": "epoch", "epoch": e, "step": 10 * e, "total": total, "train_mae": total / 2, "ce": 1.0,
                     "mean": 2.0, "variance": 3.0, "cosine": 0.1, "triplet": 0.0, "kl": 0.0, "lr": 1e-3,
                     "images_per_sec": 100.0, "epoch_time_s": 1.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + extra_lines)


def test_epoch_rows_keep_the_last_row_of_an_epoch_and_skip_a_torn_line(tmp_path):
    from agecl.plots import epoch_rows

    _metrics_file(tmp_path, {1: 5.0, 2: 4.0}, extra_lines=json.dumps({"kind": "epoch", "epoch": 2, "total": 3.5}) + "\n"
                  + '{"kind": "epoch", "epoch": 3, "tot')  # a resumed epoch 2, then a line cut by a kill
    rows = epoch_rows(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["total"] for r in rows] == [5.0, 3.5]


def test_curves_of_a_protocol_run_are_per_fold_with_gaps(tmp_path):
    from agecl.plots import read_curves

    _metrics_file(tmp_path / "fold-0", {1: 6.0, 2: 4.0, 3: 2.0})
    _metrics_file(tmp_path / "fold-1", {1: 8.0, 2: 6.0})  # still training: no epoch 3 yet
    c = read_curves(tmp_path)
    assert c.folds == 2 and c.epochs.tolist() == [1, 2, 3] and c.label == tmp_path.name
    total = c.values["total"]
    assert total[0].tolist() == [6.0, 4.0, 2.0]
    assert total[1, :2].tolist() == [8.0, 6.0] and np.isnan(total[1, 2])
    assert np.nanmean(total, axis=0).tolist() == [7.0, 5.0, 2.0]
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        read_curves(tmp_path / "fold-9")


def test_cli_curves_overlays_runs_and_aggregate_draws_the_folds(tmp_path, capsys):
    a, b = tmp_path / "mv", tmp_path / "binary"
    _metrics_file(a / "fold-0", {1: 6.0, 2: 4.0})
    _metrics_file(b, {1: 5.0, 2: 3.0})
    out = tmp_path / "compare.png"
    assert main(["--curves", str(a), str(b), "--labels", "MV,MV + cosine", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "MV: 1 run(s), epoch 2: loss 4.0000" in printed and "MV + cosine: 1 run(s), epoch 2: loss 3.0000" in printed
    _assert_png(out)
    assert main(["--curves", str(b)]) == 0 and (b / "curves.png").is_file()  # one run: into its folder
    assert main(["--curves", str(a), "--labels", "x,y"]) == 2
    assert "2 labels for 1 runs" in capsys.readouterr().err
    assert main(["--curves", str(tmp_path / "nothing")]) == 2
    assert "nothing: no metrics.jsonl" in capsys.readouterr().err

    # A protocol run folder whose folds trained: aggregation draws their mean curves too.
    _fold(a, 0, [20, 30], [21, 29], "kfold", 1)
    summary = ev.aggregate(a)
    assert "curves.png" in summary["plots"] and "curves.png" in (a / "results.md").read_text()
    _assert_png(a / "curves.png")


# --- two runs compared on the same faces ---------------------------------------------------------


def _preds(ids, ages, expected, identities) -> Predictions:
    n = len(ids)
    return Predictions(ids=np.asarray(ids, np.int64), ages=np.asarray(ages, np.int64),
                       expected=np.asarray(expected, np.float32), std=np.ones(n, np.float32),
                       identities=np.asarray(identities, np.int64))


def test_paired_difference_matches_faces_by_id_and_by_hand():
    ages = np.array([10, 20, 30, 40, 50])
    base = _preds([0, 1, 2, 3, 4], ages, ages + np.array([1.0, -2, 3, 0, 4]), [0, 0, 1, 1, 2])
    # The other run scored faces 4, 2, 0, 3 and 9 (another face): in another order, one face fewer.
    order = np.array([4, 2, 0, 3])
    other = _preds(np.r_[order, 9], np.r_[ages[order], 60], np.r_[ages[order] + np.array([1.0, -3, 0, 2]), 60], [2, 1, 0, 1, 5])
    d = ev.paired_difference(base, other, resamples=500)
    # Faces 0, 2, 3, 4: base errors 1, 3, 0, 4; other's 0, 3, 2, 1.
    assert d["n"] == 4 and d["people"] == 3
    assert d["mae_base"] == pytest.approx(2.0) and d["mae_other"] == pytest.approx(1.5)
    assert d["difference"] == pytest.approx(-0.5)
    assert d["share_other_better"] == pytest.approx(0.5) and d["share_other_worse"] == pytest.approx(0.25)
    lo, hi = d["ci95"]
    assert lo <= hi and lo >= -3 and hi <= 2  # within the range of the per-face differences

    # Better by exactly one year on every face: every resample says -1.
    errors = np.array([1.0, -2, 3, -4, 4])
    worse = _preds(base.ids, ages, ages + errors, base.identities)
    better = _preds(base.ids, ages, ages + errors - np.sign(errors), base.identities)
    d = ev.paired_difference(worse, better, resamples=200)
    assert d["difference"] == pytest.approx(-1.0) and d["ci95"] == pytest.approx([-1.0, -1.0])


def test_paired_difference_resamples_people_not_faces():
    """Ten people of 50 photos; the other run is 2 years better on five people and 2 worse on the
    rest, alike on all of a person's photos. The mean difference is 0, and the interval must say
    how little ten people tell (about +-1.2 years), not the +-0.2 that 500 independent faces would."""
    rng = np.random.default_rng(0)
    identities = np.repeat(np.arange(10), 50)
    ages = rng.integers(20, 60, len(identities))
    base = _preds(np.arange(len(ages)), ages, ages + 5.0, identities)
    other = _preds(np.arange(len(ages)), ages, ages + 5.0 + np.where(identities % 2, 2.0, -2.0), identities)
    d = ev.paired_difference(base, other, resamples=2000, seed=1)
    assert d["difference"] == pytest.approx(0.0, abs=1e-9)
    lo, hi = d["ci95"]
    assert lo < -0.8 and hi > 0.8, d["ci95"]
    assert ev.paired_difference(base, other, resamples=2000, seed=1)["ci95"] == d["ci95"], "seeded: reproducible"


def test_paired_difference_refuses_unrelated_runs():
    a = _preds([0, 1], [10, 20], [11, 21], [0, 1])
    with pytest.raises(ValueError, match="share no test face"):
        ev.paired_difference(a, _preds([5, 6], [10, 20], [11, 21], [0, 1]))
    with pytest.raises(ValueError, match="different shard sets"):
        ev.paired_difference(a, _preds([0, 1], [10, 25], [11, 21], [0, 1]))


def _write_lopo_run(folder: Path, ids, ages, expected, identities, machine=None) -> None:
    """A finished LOPO run on disk: one fold folder a person, as agecl-train --all-folds leaves it."""
    people = np.unique(identities)
    for k, person in enumerate(people):
        rows = identities == person
        p = _preds(ids[rows], ages[rows], expected[rows], identities[rows])
        write_fold_results(folder / f"fold-{k}", p, metrics(p.expected, p.ages), "lopo", k,
                           {"machine": machine} if machine else None, n_folds=len(people))


def test_compare_runs_script_on_written_run_folders(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    rng = np.random.default_rng(3)
    identities = np.repeat(np.arange(6), 20)
    ages = rng.integers(0, 70, len(identities))
    ids = np.arange(len(ages))
    for name, noise in (("base", 6.0), ("better", 2.0)):
        _write_lopo_run(tmp_path / name, ids, ages, ages + rng.normal(0, noise, len(ages)), identities)
    single = _preds(ids, ages, ages + 1.0, identities)  # a one-fold run: its own predictions.npz
    write_fold_results(tmp_path / "single", single, metrics(single.expected, single.ages), "authors", 0)

    script = [sys.executable, str(root / "benchmarks" / "compare_runs.py")]
    r = subprocess.run(script + [str(tmp_path / "base"), str(tmp_path / "better"), str(tmp_path / "single")],
                       capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["run"] for row in rows] == [str(tmp_path / "better"), str(tmp_path / "single")]
    base = ev.load_predictions(tmp_path / "base")
    assert len(base) == len(ages) and sorted(base.ids) == list(ids)
    assert rows[0]["difference"] == pytest.approx(ev.paired_difference(base, ev.load_predictions(tmp_path / "better"))["difference"])
    assert rows[0]["difference"] < 0 and rows[0]["people"] == 6 and rows[0]["n"] == len(ages)
    assert rows[1]["mae_other"] == pytest.approx(1.0, abs=1e-5)
    assert "better" in r.stderr and "over 6 people, 120 faces" in r.stderr

    r = subprocess.run(script + [str(tmp_path / "base"), str(tmp_path / "missing")], capture_output=True, text=True, cwd=root)
    assert r.returncode == 2 and f"{tmp_path / 'missing'}: no predictions.npz" in r.stderr


def test_average_predictions_matches_faces_by_id_and_mixes_the_distributions():
    a = _preds([3, 1, 2], [30, 10, 20], [36, 8, 20], [0, 1, 1])
    b = _preds([1, 2, 3], [10, 20, 30], [12, 26, 30], [1, 1, 0])  # the same faces, another order
    b.std[:] = 3.0
    avg = ev.average_predictions([a, b])
    assert list(avg.ids) == [3, 1, 2] and list(avg.ages) == [30, 10, 20] and list(avg.identities) == [0, 1, 1]
    assert avg.expected.tolist() == pytest.approx([33.0, 10.0, 23.0])
    # An equal mixture of N(36, 1) and N(30, 3): variance (1 + 9) / 2 + 3 ** 2 = 14.
    assert avg.std[0] == pytest.approx(14 ** 0.5, rel=1e-6)
    with pytest.raises(ValueError, match="two or more"):
        ev.average_predictions([a])
    with pytest.raises(ValueError, match="not the same ones"):
        ev.average_predictions([a, _preds([1, 2, 4], [10, 20, 30], [10, 20, 30], [1, 1, 0])])
    with pytest.raises(ValueError, match="other true ages"):
        ev.average_predictions([a, _preds([1, 2, 3], [10, 20, 31], [10, 20, 30], [1, 1, 0])])


def test_average_runs_script_writes_a_run_that_compare_runs_reads(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    rng = np.random.default_rng(5)
    identities = np.repeat(np.arange(4), 10)
    ages = rng.integers(0, 70, len(identities))
    ids = np.arange(len(ages))
    noise = {"a": rng.normal(0, 4, len(ages)), "b": rng.normal(0, 4, len(ages))}
    for name, e in noise.items():  # two LOPO runs whose errors are independent
        _write_lopo_run(tmp_path / name, ids, ages, ages + e, identities)

    script = [sys.executable, str(root / "benchmarks" / "average_runs.py")]
    out = tmp_path / "ensemble"
    r = subprocess.run(script + [str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)],
                       capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    by_hand = np.abs((noise["a"] + noise["b"]) / 2).mean()
    assert summary["mae"] == pytest.approx(by_hand, abs=1e-4) and summary["n"] == len(ages)
    assert [x["mae"] for x in summary["runs"]] == pytest.approx([np.abs(noise["a"]).mean(), np.abs(noise["b"]).mean()], abs=1e-4)
    assert summary["error_correlation"][0][1] == pytest.approx(np.corrcoef(noise["a"], noise["b"])[0, 1], abs=1e-3)
    written = json.loads((out / "results.json").read_text())
    assert written["test_mae"] == pytest.approx(by_hand, abs=1e-4)
    assert written["averaged_runs"] == [str(tmp_path / "a"), str(tmp_path / "b")]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "compare_runs.py"), str(tmp_path / "a"), str(out)],
                       capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["mae_other"] == pytest.approx(by_hand, abs=1e-4)

    r = subprocess.run(script + [str(tmp_path / "a"), str(tmp_path / "missing"), "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, cwd=root)
    assert r.returncode == 2 and f"{tmp_path / 'missing'}: no predictions.npz" in r.stderr
    assert not (tmp_path / "x").exists()


def _aaf_to_fgnet(tmp_path: Path, **env):
    """benchmarks/ copied into tmp_path (kept rows and docs left out), and a function that runs
    aaf_to_fgnet.sh there with the 64 px 16-epoch anchor row's settings plus `env`."""
    import os
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "benchmarks", tmp_path / "benchmarks", ignore=shutil.ignore_patterns("kept", "*.md"))
    env = dict(os.environ, PY=sys.executable, PYTHONPATH=str(root), SIZE="64", FT_SUPERVISE="anchor",
               FT_EPOCHS="16", ROWS="paper-fgnet-ternary", **env)

    def run(*stages: str):
        return subprocess.run(["bash", str(tmp_path / "benchmarks" / "aaf_to_fgnet.sh"), *stages],
                              capture_output=True, text=True, env=env)

    return run


def test_aaf_to_fgnet_ensemble_stage_averages_the_aaf_models_of_each_seed(tmp_path):
    # The stage finds each pretraining seed's select halves by the folder names the script gives
    # them (seed 0 unnamed, seed 1 -pseed1) and writes their average as -pseeds0+1.
    script = _aaf_to_fgnet(tmp_path, COVERAGE="1.4")  # 1.4: folders with no -cov suffix
    rng = np.random.default_rng(7)
    identities = np.repeat(np.arange(4), 10)
    ages = rng.integers(0, 70, len(identities))
    ids = np.arange(len(ages))
    made = {}
    for half in "ab":
        for seed in ("", "-pseed1"):
            e = rng.normal(0, 4, len(ages))
            made[half, seed] = e
            run = tmp_path / "runs" / f"fgnet-reflect-select-{half}-paper-fgnet-ternary-e12{seed}-ft16-flip"
            _write_lopo_run(run, ids, ages, ages + e, identities)
            ev.aggregate(run)  # finished: pooled, as agecl-train --all-folds and rescore.py leave it
    r = script("ensemble")
    assert r.returncode == 0, r.stderr
    assert "ensemble: 2 averaged (seeds 0 1)" in r.stdout
    lopo = "runs/fgnet-reflect-lopo-paper-fgnet-ternary-e12-pseeds0+1-ft16-flip: not yet"
    assert lopo in r.stdout  # no LOPO row yet: said, nothing written
    assert not (tmp_path / lopo.split(":")[0]).exists()
    for half in "ab":
        out = tmp_path / "runs" / f"fgnet-reflect-select-{half}-paper-fgnet-ternary-e12-pseeds0+1-ft16-flip"
        written = json.loads((out / "results.json").read_text())
        by_hand = np.abs((made[half, ""] + made[half, "-pseed1"]) / 2).mean()
        assert written["test_mae"] == pytest.approx(by_hand, abs=1e-4) and written["n_test"] == len(ages)
        assert [Path(x).name for x in written["averaged_runs"]] == [
            f"fgnet-reflect-select-{half}-paper-fgnet-ternary-e12{seed}-ft16-flip" for seed in ("", "-pseed1")]

    # Both LOPO rows finished: averaged too, and the table prints the average beside the row.
    lopo_errors = {}
    for name in ("-ft16", "-ft16-flip", "-pseed1-ft16-flip"):
        lopo_errors[name] = rng.normal(0, 3, len(ages))
        run = tmp_path / "runs" / f"fgnet-reflect-lopo-paper-fgnet-ternary-e12{name}"
        _write_lopo_run(run, ids, ages, ages + lopo_errors[name], identities)
        ev.aggregate(run)
    r = script("ensemble", "table", "keep")
    assert r.returncode == 0, r.stderr
    assert "ensemble: 3 averaged (seeds 0 1)" in r.stdout
    by_hand = np.abs((lopo_errors["-ft16-flip"] + lopo_errors["-pseed1-ft16-flip"]) / 2).mean()
    assert f"paper-fgnet-ternary + mirror, pseeds0+1 averaged MAE {by_hand:.2f}" in r.stdout
    # The keep stage: the row pooled for comparisons, and each of its folds for a new machine's lopo stage.
    kept = tmp_path / "benchmarks" / "kept"
    row = "fgnet-reflect-lopo-paper-fgnet-ternary-e12-ft16"
    assert (kept / row / "predictions.npz").is_file() and (kept / f"{row}-flip" / "predictions.npz").is_file()
    assert sorted(d.name for d in (kept / "folds" / row).iterdir()) == [f"fold-{k}" for k in range(4)]


def test_aaf_to_fgnet_names_the_chosen_coverage_in_every_folder(tmp_path):
    # The default coverage, 1.0, reads and writes only folders named for that frame
    # (fgnet-reflect-cov1.0-...): runs of the earlier frame (1.4, no suffix) beside them are neither
    # averaged nor overwritten.
    script = _aaf_to_fgnet(tmp_path)
    rng = np.random.default_rng(11)
    identities = np.repeat(np.arange(4), 10)
    ages = rng.integers(0, 70, len(identities))
    ids = np.arange(len(ages))
    made = {}
    for frame in ("reflect", "reflect-cov1.0"):
        for seed in ("", "-pseed1"):
            made[frame, seed] = rng.normal(0, 4, len(ages))
            run = tmp_path / "runs" / f"fgnet-{frame}-select-a-paper-fgnet-ternary-e12{seed}-ft16-flip"
            _write_lopo_run(run, ids, ages, ages + made[frame, seed], identities)
            ev.aggregate(run)
    r = script("ensemble")
    assert r.returncode == 0, r.stderr
    assert "runs/fgnet-reflect-cov1.0-lopo-paper-fgnet-ternary-e12-pseeds0+1-ft16-flip: not yet" in r.stdout
    out = tmp_path / "runs" / "fgnet-reflect-cov1.0-select-a-paper-fgnet-ternary-e12-pseeds0+1-ft16-flip"
    by_hand = np.abs((made["reflect-cov1.0", ""] + made["reflect-cov1.0", "-pseed1"]) / 2).mean()
    assert json.loads((out / "results.json").read_text())["test_mae"] == pytest.approx(by_hand, abs=1e-4)
    assert not (tmp_path / "runs" / "fgnet-reflect-select-a-paper-fgnet-ternary-e12-pseeds0+1-ft16-flip").exists()


def test_keep_run_script_keeps_the_pooled_predictions(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    rng = np.random.default_rng(5)
    identities = np.repeat(np.arange(4), 10)
    ages = rng.integers(0, 70, len(identities))
    ids = np.arange(len(ages)) + 500
    run = tmp_path / "runs" / "fgnet-lopo-row"
    machine = {"device": "cpu", "processor": "AMD EPYC (family 26, model 2)", "threads": 1, "precision": "bf16",
               "torch": "2.15.0"}
    _write_lopo_run(run, ids, ages, ages + rng.normal(0, 3, len(ages)), identities, machine)
    ev.aggregate(run)
    script = [sys.executable, str(root / "benchmarks" / "keep_run.py")]
    r = subprocess.run(script + [str(run), "--into", str(tmp_path / "kept")], capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr
    kept, was = ev.load_predictions(tmp_path / "kept" / run.name), ev.load_predictions(run)
    for key in ("ids", "ages", "expected", "std", "identities"):
        np.testing.assert_array_equal(getattr(kept, key), getattr(was, key))
    written = json.loads((tmp_path / "kept" / run.name / "results.json").read_text())
    summary = json.loads((run / "results.json").read_text())
    assert written["kept_from"] == str(run) and written["folds_pooled"] == 4 and written["protocol"] == "lopo"
    assert written["test_mae"] == pytest.approx(summary["pooled"]["mae"], abs=1e-6)
    assert written["pooled"] == summary["pooled"]
    assert written["config_differences"] == summary["config_differences"] == {}, "the folds were trained alike"
    assert written["machine"] == machine
    r = subprocess.run(script + [str(tmp_path / "nothing"), "--into", str(tmp_path / "kept")], capture_output=True, text=True, cwd=root)
    assert r.returncode == 2 and f"{tmp_path / 'nothing'}: no predictions.npz" in r.stderr
