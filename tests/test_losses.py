"""The loss terms against hand-computed values and torch references; age_loss; the presets."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from agecl.config import LossConfig, TrainConfig, apply_overrides
from agecl.losses import (
    DEFAULT_MARGIN,
    PRESET_LOADER,
    PRESETS,
    TERMS,
    age_balance_weights,
    age_loss,
    apply_preset,
    apply_train_preset,
    cosine_loss,
    cross_entropy,
    kl_loss,
    mean_loss,
    preset_loss_config,
    triplet_loss,
    triplet_parts,
    variance_loss,
)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# --- single terms: hand arithmetic ---------------------------------------------------------------


def test_cross_entropy_by_hand():
    # logits (log 1, log 3) -> softmax (0.25, 0.75); target 1: -log 0.75 = 0.287682
    # logits (0, 0) -> (0.5, 0.5); target 0: -log 0.5 = log 2 = 0.693147. Mean = 0.490415
    logits = t([[0.0, math.log(3.0)], [0.0, 0.0]])
    target = torch.tensor([1, 0])
    expected = (-math.log(0.75) + math.log(2.0)) / 2
    assert cross_entropy(logits, target).item() == pytest.approx(expected, abs=1e-6)
    assert cross_entropy(logits, target).item() == pytest.approx(F.cross_entropy(logits, target).item(), abs=1e-7)


def test_cross_entropy_casts_bf16_to_float32():
    logits = torch.randn(4, 7).bfloat16()
    out = cross_entropy(logits, torch.tensor([0, 1, 2, 6]))
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(F.cross_entropy(logits.float(), torch.tensor([0, 1, 2, 6])).item(), abs=1e-6)


def test_mean_loss_by_hand():
    # row 0: s = (0.25, 0.75, 0), m = 0*0.25 + 1*0.75 = 0.75, y = 0: 1/2 * 0.75^2 = 0.28125
    # row 1: s = (0, 0, 1), m = 2, y = 2: 0.                 mean over the batch = 0.140625
    probs = t([[0.25, 0.75, 0.0], [0.0, 0.0, 1.0]])
    assert mean_loss(probs, torch.tensor([0, 2])).item() == pytest.approx(0.140625, abs=1e-7)
    # row: uniform over 3 classes, m = 1, y = 0: 1/2 * 1 = 0.5
    assert mean_loss(t([[1 / 3, 1 / 3, 1 / 3]]), torch.tensor([0])).item() == pytest.approx(0.5, abs=1e-6)


def test_variance_loss_by_hand():
    # s = (0.25, 0.75, 0): m = 0.75; 0.25*(0-0.75)^2 + 0.75*(1-0.75)^2 = 0.140625 + 0.046875 = 0.1875
    # s = (0, 0, 1): 0.           mean = 0.09375
    assert variance_loss(t([[0.25, 0.75, 0.0], [0.0, 0.0, 1.0]])).item() == pytest.approx(0.09375, abs=1e-7)
    # uniform over 3: m = 1; (1 + 0 + 1) / 3 = 2/3
    assert variance_loss(t([[1 / 3, 1 / 3, 1 / 3]])).item() == pytest.approx(2 / 3, abs=1e-6)


def _mv_reference(probs, target):
    """Pan et al.'s mean and variance losses written as plain Python loops."""
    ml, vl = 0.0, 0.0
    for row, y in zip(probs.tolist(), target.tolist()):
        m = sum(j * p for j, p in enumerate(row))
        ml += 0.5 * (m - y) ** 2
        vl += sum(p * (j - m) ** 2 for j, p in enumerate(row))
    return ml / len(probs), vl / len(probs)


def test_mean_variance_against_loops():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(5, 11, generator=g) * 2, dim=-1)
    target = torch.randint(0, 11, (5,), generator=g)
    ml, vl = _mv_reference(probs, target)
    assert mean_loss(probs, target).item() == pytest.approx(ml, rel=1e-5)
    assert variance_loss(probs).item() == pytest.approx(vl, rel=1e-5)


def test_cosine_loss_by_hand_and_reference():
    # (1,0) vs (0,1): cos 0 -> 1; (1,1) vs (2,2): cos 1 -> 0; (1,0) vs (-1,0): cos -1 -> 2. mean = 1
    f_a = t([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    f_p = t([[0.0, 1.0], [2.0, 2.0], [-1.0, 0.0]])
    assert cosine_loss(f_a, f_p).item() == pytest.approx(1.0, abs=1e-6)
    g = torch.Generator().manual_seed(1)
    a, p = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    ref = (1 - F.cosine_similarity(a, p, dim=1)).mean()
    assert cosine_loss(a, p).item() == pytest.approx(ref.item(), abs=1e-6)


def test_triplet_loss_by_hand():
    # row 0: s_a = (1,0,0), s_p = (0,1,0), s_n = (0.5,0.5,0)
    #        d_ap = 1 + 1 = 2; d_an = 0.25 + 0.25 = 0.5; max(2 - 0.5 + 0.2, 0) = 1.7
    # row 1: s_a = (1,0,0), s_p = (0.5,0.5,0), s_n = (0,0,1)
    #        d_ap = 0.5; d_an = 2; max(0.5 - 2 + 0.2, 0) = 0                         mean = 0.85
    s_a = t([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    s_p = t([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    s_n = t([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert triplet_loss(s_a, s_p, s_n, margin=0.2).item() == pytest.approx(0.85, abs=1e-6)
    # the margin is the setting: with alpha = 1.6 row 1 becomes 0.5 - 2 + 1.6 = 0.1; row 0 = 3.1
    assert triplet_loss(s_a, s_p, s_n, margin=1.6).item() == pytest.approx((3.1 + 0.1) / 2, abs=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), margin=st.floats(0.01, 2.0))  # torch refuses a margin of 0
def test_triplet_loss_matches_torch(seed, margin):
    g = torch.Generator().manual_seed(seed)
    s_a, s_p, s_n = (torch.softmax(torch.randn(6, 9, generator=g) * 3, dim=-1) for _ in range(3))
    ref = F.triplet_margin_with_distance_loss(
        s_a, s_p, s_n, distance_function=lambda x, y: (x - y).square().sum(-1), margin=margin
    )
    assert triplet_loss(s_a, s_p, s_n, margin).item() == pytest.approx(ref.item(), abs=1e-6)


def test_kl_loss_by_hand_direction_and_reference():
    # s_p = (0.5, 0.5), s_a = (0.25, 0.75):
    # KL(s_p || s_a) = 0.5 log(0.5/0.25) + 0.5 log(0.5/0.75) = 0.5 log(4/3) = 0.143841
    # (the other direction, KL(s_a || s_p) = 0.25 log 0.5 + 0.75 log 1.5 = 0.130812, is not ours)
    log_s_a = t([[0.25, 0.75]]).log()
    log_s_p = t([[0.5, 0.5]]).log()
    assert kl_loss(log_s_a, log_s_p).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    g = torch.Generator().manual_seed(2)
    la = F.log_softmax(torch.randn(5, 8, generator=g), -1)
    lp = F.log_softmax(torch.randn(5, 8, generator=g), -1)
    ref = F.kl_div(la, lp, log_target=True, reduction="batchmean")
    assert kl_loss(la, lp).item() == pytest.approx(ref.item(), abs=1e-6)
    assert kl_loss(la, la).item() == pytest.approx(0.0, abs=1e-7)


# --- age_loss --------------------------------------------------------------------------------------


B, D, A = 3, 8, 6


def _batch(seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(3 * B, D, generator=g).requires_grad_(requires_grad)
    logits = torch.randn(3 * B, A, generator=g).requires_grad_(requires_grad)
    y = torch.randint(0, A, (B,), generator=g)
    targets = torch.cat([y, y, torch.randint(0, A, (B,), generator=g)])  # positives share the anchor's age
    return features, logits, targets


ALL_ON = LossConfig(ce=1.0, mean=0.2, variance=0.05, cosine=10.0, triplet=1.0, kl=0.5, margin=0.3)


def test_age_loss_is_the_weighted_sum_of_the_terms():
    features, logits, targets = _batch()
    out = age_loss(features, logits, targets, ALL_ON, B)
    s = torch.softmax(logits, -1)
    ls = torch.log_softmax(logits, -1)
    y = targets[:B]
    expected = {
        "ce": F.cross_entropy(logits[:B], y),
        "mean": mean_loss(s[:B], y),
        "variance": variance_loss(s[:B]),
        "cosine": cosine_loss(features[:B], features[B : 2 * B]),
        "triplet": triplet_loss(s[:B], s[B : 2 * B], s[2 * B :], 0.3),
        "kl": kl_loss(ls[:B], ls[B : 2 * B]),
    }
    for name, value in expected.items():
        assert out[name].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), name
    total = sum(getattr(ALL_ON, n) * v for n, v in expected.items())
    assert out["total"].item() == pytest.approx(total.item(), rel=1e-5)
    mae = (s[:B] @ torch.arange(A, dtype=torch.float32) - y).abs().mean()
    assert out["mae"].item() == pytest.approx(mae.item(), rel=1e-5)
    assert not out["mae"].requires_grad


def test_age_loss_outputs_are_float32_scalars_even_from_bf16():
    features, logits, targets = _batch()
    out = age_loss(features.bfloat16(), logits.bfloat16(), targets, ALL_ON, B)
    assert set(out) == set(TERMS) | {"total", "mae"}
    for name, value in out.items():
        assert value.shape == () and value.dtype == torch.float32, name
        assert torch.isfinite(value), name


def test_age_loss_under_bf16_autocast_computes_in_float32():
    # The trainer calls age_loss inside the autocast region: no term may drop to bf16 there
    # (a matmul would; bf16 keeps ~3 significant digits).
    features, logits, targets = _batch()
    plain = age_loss(features, logits, targets, ALL_ON, B)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = age_loss(features, logits, targets, ALL_ON, B)
    for name in plain:
        assert auto[name].dtype == torch.float32, name
        assert auto[name].item() == pytest.approx(plain[name].item(), rel=1e-5, abs=1e-6), name


def test_age_loss_gradients_are_finite_with_every_term_on():
    features, logits, targets = _batch(requires_grad=True)
    out = age_loss(features, logits, targets, ALL_ON, B)
    for name in TERMS:
        assert out[name].item() > 0, name  # every term is actually on
    out["total"].backward()
    for grad in (features.grad, logits.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # positives and negatives receive gradients too (cosine, triplet, kl)
    assert logits.grad[B:].abs().sum() > 0 and features.grad[B : 2 * B].abs().sum() > 0


def test_anchor_targets_alone_give_the_same_result():
    features, logits, targets = _batch()
    full = age_loss(features, logits, targets, ALL_ON, B)
    anchors = age_loss(features, logits, targets[:B], ALL_ON, B)
    for name in full:
        assert full[name].item() == anchors[name].item(), name


def test_supervising_the_triplet_applies_the_age_terms_to_every_image():
    features, logits, targets = _batch()
    weights = dataclasses.replace(ALL_ON, supervise="triplet")
    out = age_loss(features, logits, targets, weights, B)
    s = torch.softmax(logits, -1)
    assert out["ce"].item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    assert out["mean"].item() == pytest.approx(mean_loss(s, targets).item(), rel=1e-6)
    assert out["variance"].item() == pytest.approx(variance_loss(s).item(), rel=1e-6)
    # The contrastive terms and the logged train MAE (anchors) are the same as the paper's.
    anchor = age_loss(features, logits, targets, ALL_ON, B)
    for name in ("cosine", "triplet", "kl", "mae"):
        assert out[name].item() == anchor[name].item(), name
    assert out["ce"].item() != anchor["ce"].item()


def test_supervising_the_triplet_needs_every_target_and_a_known_mode():
    features, logits, targets = _batch()
    with pytest.raises(ValueError, match="needs 9 targets"):
        age_loss(features, logits, targets[:B], dataclasses.replace(ALL_ON, supervise="triplet"), B)
    with pytest.raises(ValueError, match="supervise"):
        age_loss(features, logits, targets, dataclasses.replace(ALL_ON, supervise="all"), B)


def test_age_balance_weights_follow_the_counts_and_average_one():
    counts = np.array([8, 2, 0, 4, 2])  # images of each age class in a training set
    np.testing.assert_allclose(age_balance_weights(counts, 0.0), [1, 1, 0, 1, 1])
    w = age_balance_weights(counts, 1.0)  # every class present weighs alike in total
    np.testing.assert_allclose(w * counts, [4, 4, 0, 4, 4], rtol=1e-6)
    half = age_balance_weights(counts, 0.5)  # (n_a / mean)^-0.5, rescaled
    raw = np.array([8, 2, 1, 4, 2]) ** -0.5 * np.array([1, 1, 0, 1, 1])
    np.testing.assert_allclose(half, raw * 16 / (raw * counts).sum(), rtol=1e-6)
    assert (w * counts).sum() == pytest.approx(counts.sum()) and (half * counts).sum() == pytest.approx(counts.sum())
    with pytest.raises(ValueError, match="no training image"):
        age_balance_weights(np.zeros(3), 0.5)


def test_class_weights_weigh_each_supervised_image_of_the_age_terms_alone():
    features, logits, targets = _batch()
    weights = dataclasses.replace(ALL_ON, supervise="triplet")
    plain = age_loss(features, logits, targets, weights, B)
    ones = age_loss(features, logits, targets, weights, B, class_weights=torch.ones(A))
    for name in plain:
        assert ones[name].item() == pytest.approx(plain[name].item(), rel=1e-6), name
    cw = torch.rand(A, generator=torch.Generator().manual_seed(5)) * 2
    out = age_loss(features, logits, targets, weights, B, class_weights=cw)
    w = cw[targets]  # (3B,): each image's weight, by its class
    log_s = torch.log_softmax(logits, -1)
    s = log_s.exp()
    m = (s * torch.arange(A)).sum(-1)
    ce = -(log_s.gather(1, targets[:, None])[:, 0] * w).mean()
    mean = (0.5 * (m - targets) ** 2 * w).mean()
    var = ((s * (torch.arange(A)[None] - m[:, None]) ** 2).sum(-1) * w).mean()
    for name, want in (("ce", ce), ("mean", mean), ("variance", var)):
        assert out[name].item() == pytest.approx(want.item(), rel=1e-5), name
    for name in ("cosine", "triplet", "kl", "mae"):  # the contrastive terms and the logged MAE: untouched
        assert out[name].item() == plain[name].item(), name


def test_papers_presets_supervise_the_anchor():
    assert all(values["supervise"] == "anchor" for values in PRESETS.values())


@pytest.mark.parametrize("term", TERMS)
def test_zero_weight_term_contributes_exactly_nothing(term):
    features, logits, targets = _batch(requires_grad=True)
    weights = dataclasses.replace(ALL_ON, **{term: 0.0})
    out = age_loss(features, logits, targets, weights, B)
    assert out[term].item() == 0.0
    others = sum(getattr(weights, n) * out[n] for n in TERMS if n != term)
    assert out["total"].item() == pytest.approx(others.item(), rel=1e-6)


def test_zero_weight_cosine_ignores_even_nan_features():
    # With lc = 0 the features enter no term: a NaN there must not reach the total or a gradient.
    features, logits, targets = _batch()
    features[0, 0] = float("nan")
    features.requires_grad_(True)
    out = age_loss(features, logits, targets, dataclasses.replace(ALL_ON, cosine=0.0), B)
    assert torch.isfinite(out["total"])
    ref = age_loss(features.detach().nan_to_num(), logits, targets, dataclasses.replace(ALL_ON, cosine=0.0), B)
    assert out["total"].item() == ref["total"].item()


def test_age_loss_rejects_a_batch_that_is_not_three_groups():
    features, logits, targets = _batch()
    with pytest.raises(ValueError, match=f"expected {3 * B} rows"):
        age_loss(features[:-1], logits[:-1], targets, ALL_ON, B)


@pytest.mark.parametrize("preset, parts", [("mv", 1), ("paper-fgnet-binary", 2), ("mv-kl-fgnet", 2),
                                           ("paper-fgnet-ternary", 3), ("mv-triplet", 3)])
def test_a_loss_reads_only_the_parts_of_a_triplet_it_needs(preset, parts):
    # The anchors (and positives) alone give every term what the whole triplet gives: the loader can
    # leave the rest out. Fewer parts than the loss reads is refused, naming the parts.
    weights = preset_loss_config(preset)
    assert triplet_parts(weights) == parts
    assert triplet_parts(dataclasses.replace(weights, supervise="triplet")) == 3
    features, logits, targets = _batch()
    whole = age_loss(features, logits, targets, weights, B)
    part = age_loss(features[: parts * B], logits[: parts * B], targets[: parts * B], weights, B)
    for k in whole:
        torch.testing.assert_close(part[k], whole[k], rtol=0, atol=0, msg=k)
    if parts > 1:
        with pytest.raises(ValueError, match=f"the loss reads {parts} parts"):
            age_loss(features[:B], logits[:B], targets[:B], weights, B)


def test_default_margin_is_the_config_default():
    assert LossConfig().margin == DEFAULT_MARGIN
    assert 0 < DEFAULT_MARGIN < 2  # squared L2 between probability vectors lies in [0, 2]


# --- presets ---------------------------------------------------------------------------------------

LOSS_FIELDS = {f.name for f in dataclasses.fields(LossConfig)}


def test_every_preset_sets_every_loss_field():
    for name, values in PRESETS.items():
        assert set(values) == LOSS_FIELDS, name
        assert values["ce"] == 1.0 and values["mean"] == 0.2 and values["variance"] == 0.05, name
        assert values["margin"] == DEFAULT_MARGIN, name


@pytest.mark.parametrize(
    "name, lc, lt, lkl",
    [
        ("mv", 0, 0, 0),
        ("paper-fgnet-binary", 1, 0, 0),
        ("paper-fgnet-ternary", 1, 1, 0),
        ("paper-morph-binary", 10, 0, 0),
        ("paper-morph-ternary", 10, 1, 0),
        ("mv-cos-fgnet", 1, 0, 0),
        ("mv-cos-morph", 10, 0, 0),
        ("mv-triplet", 0, 1, 0),
        ("mv-cos-triplet-fgnet", 1, 1, 0),
        ("mv-cos-triplet-morph", 10, 1, 0),
        ("mv-kl-fgnet", 0, 0, 1),
        ("mv-kl-morph", 0, 0, 10),
        ("mv-kl-triplet-fgnet", 0, 1, 1),
        ("mv-kl-triplet-morph", 0, 1, 10),
    ],
)
def test_presets_carry_the_papers_lambdas(name, lc, lt, lkl):
    cfg = preset_loss_config(name)
    assert (cfg.ce, cfg.mean, cfg.variance) == (1.0, 0.2, 0.05)  # lambda_m = 0.2, lambda_v = 0.05
    assert (cfg.cosine, cfg.triplet, cfg.kl) == (lc, lt, lkl)


def test_ternary_is_mv_cosine_triplet():
    for ds in ("fgnet", "morph"):
        assert PRESETS[f"paper-{ds}-ternary"] == PRESETS[f"mv-cos-triplet-{ds}"]
        assert PRESETS[f"paper-{ds}-binary"] == PRESETS[f"mv-cos-{ds}"]


def test_unknown_preset_lists_the_known_names():
    with pytest.raises(ValueError, match="paper-morph-ternary") as e:
        preset_loss_config("paper-morph-quaternary")
    assert "mv-kl-fgnet" in str(e.value)
    with pytest.raises(ValueError):
        apply_preset("nope", LossConfig())


def test_apply_preset_in_place():
    cfg = LossConfig(cosine=123.0, margin=1.5)
    assert apply_preset("paper-morph-binary", cfg) is cfg
    assert dataclasses.asdict(cfg) == PRESETS["paper-morph-binary"]


def test_train_preset_sets_the_papers_vertical_flip_and_overrides_win():
    cfg = apply_train_preset(TrainConfig(preset="paper-fgnet-ternary"))
    assert cfg.loader.flip == "vertical" and cfg.loss.triplet == 1.0 and cfg.loss.cosine == 1.0
    apply_overrides(cfg, ["loader.flip=horizontal", "loss.margin=0.5"])
    assert cfg.loader.flip == "horizontal" and cfg.loss.margin == 0.5
    # ablation presets leave the loader as it is; no preset changes nothing
    assert apply_train_preset(TrainConfig(), "mv-triplet").loader.flip == "horizontal"
    assert dataclasses.asdict(apply_train_preset(TrainConfig())) == dataclasses.asdict(TrainConfig())
    assert set(PRESET_LOADER) == {n for n in PRESETS if n.startswith("paper-")}
