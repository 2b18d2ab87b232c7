"""The loss terms of Chae et al. (arXiv 2308.11896), Eq. 2-9, as pure tensor functions, and presets.

Notation: a batch holds B triplets (anchor a, positive p, negative n); `f` is the backbone feature
(B, D), `s = softmax(logits)` (B, A) over the A age classes j = 0..A-1 (age = min_age + j), `y` the
anchor's class index (age - min_age). Every term is averaged over the B triplets.

Eq. 7:  L = L_s + lm*L_m + lv*L_v + lc*L_c + lt*L_t      (and the Eq. 9 ablation lkl*L_kl)

Our readings of the paper's misprints (see MISSION.md):
  - L_m: printed `sum_j j*s_j - y`; we use Pan et al.'s (CVPR 2018) mean loss 1/2 (m - y)^2 that the
    paper cites (an unsquared difference is unbounded below).
  - L_c (Eq. 2): printed as the cosine similarity itself; minimising it would push same-age
    features apart, against the paper's intent, so we minimise 1 - cos(f_a, f_p).
  - L_kl (Eq. 9): printed `log s_p - s_a`; we use the real KL divergence KL(s_p || s_a) =
    sum_j s_p,j (log s_p,j - log s_a,j), "the anchor's distribution should match the positive's"
    (s_p is the reference distribution, as in the printed `log s_p - ...`).

Softmax and log-softmax run in float32 whatever the autocast dtype: the logits are cast first.
Nothing here calls `.item()` or branches on tensor values, so `age_loss` compiles into the step.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from agecl.config import LossConfig, TrainConfig

# alpha of Eq. 6 (not given in the paper). The squared L2 distance between two probability
# vectors lies in [0, 2], and between two disjoint distributions it is |s_a|^2 + |s_n|^2. For an
# output spread like a discretised Gaussian of std sigma years, |s|^2 ~ 1 / (2 sigma sqrt(pi)), so
# the largest separation an anchor can get from a far-away negative is ~ 1 / (sigma sqrt(pi)):
# 0.28 at sigma = 2, 0.19 at sigma = 3. alpha = 0.2 is therefore reachable once predictions are
# about as sharp as the paper's errors (MAE 2-2.5 years); the hinge stays active on near-age
# negatives (whose distributions overlap the anchor's) and goes quiet on far ones. A margin near 2
# would be unreachable for any soft output and turn the hinge into a constant push to one-hot.
# LossConfig.margin is the setting; this is its default.
DEFAULT_MARGIN = 0.2

TERMS = ("ce", "mean", "variance", "cosine", "triplet", "kl")  # = the LossConfig weight fields
SUPERVISE = ("anchor", "triplet")  # LossConfig.supervise: which images the age terms see


def _class_index(probs: torch.Tensor) -> torch.Tensor:
    """(A,) float32 0..A-1 on the probabilities' device."""
    return torch.arange(probs.shape[-1], device=probs.device, dtype=torch.float32)


def _expected_index(probs: torch.Tensor) -> torch.Tensor:
    """(B,) m = sum_j j s_j. A product and a sum, not `@`: autocast would run a matmul in bf16."""
    return (probs * _class_index(probs)).sum(-1)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_s, the softmax cross-entropy on the anchor: mean_i -log s_{i, y_i}.

    logits (B, A) any float dtype (cast to float32), target (B,) int64 class indices.
    """
    return F.cross_entropy(logits.float(), target)


def _mean(per_image: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The mean over images, each weighted by `weight` (B,) when given (see LossConfig.balance)."""
    return per_image.mean() if weight is None else (per_image * weight).mean()


def mean_loss(probs: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """L_m (Eq. 7, Pan et al.'s mean loss): mean_i 1/2 (m_i - y_i)^2 with m_i = sum_j j s_ij.

    The paper prints `sum_j j s_j - y` unsquared; Pan et al. square it (and halve it). probs (B, A)
    float32, target (B,) class indices; the loss is in squared years (class steps are years).
    weight: (B,) per-image weights, or None.
    """
    m = _expected_index(probs)  # (B,)
    return _mean(0.5 * (m - target.to(m.dtype)).square(), weight)


def variance_loss(probs: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """L_v (Eq. 7, Pan et al.'s variance loss): mean_i sum_j s_ij (j - m_i)^2, m_i = sum_j j s_ij.

    The gradient flows through m as in Pan et al. probs (B, A) float32; weight (B,) or None.
    """
    j = _class_index(probs)
    m = _expected_index(probs)  # (B,)
    return _mean((probs * (j[None, :] - m[:, None]).square()).sum(-1), weight)


def cosine_loss(f_a: torch.Tensor, f_p: torch.Tensor) -> torch.Tensor:
    """L_c (Eq. 2): mean_i 1 - cos(f_a,i, f_p,i), pulling same-age features of different people together.

    The paper prints the similarity cos(f_a, f_p) itself as the loss; minimising that would push
    the pair apart, so we minimise 1 - cos. f_a, f_p (B, D), cast to float32 (bf16 norms are coarse).
    """
    return (1.0 - F.cosine_similarity(f_a.float(), f_p.float(), dim=-1, eps=1e-8)).mean()


def triplet_loss(
    s_a: torch.Tensor, s_p: torch.Tensor, s_n: torch.Tensor, margin: float = DEFAULT_MARGIN
) -> torch.Tensor:
    """L_t (Eq. 6): mean_i max(|s_a - s_p|^2 - |s_a - s_n|^2 + alpha, 0) on softmax outputs.

    Squared Euclidean distances between (B, A) probability vectors, each in [0, 2]; alpha = `margin`
    (see DEFAULT_MARGIN for the choice). Equal to F.triplet_margin_with_distance_loss with a
    squared-L2 distance.
    """
    d_ap = (s_a - s_p).square().sum(-1)  # (B,)
    d_an = (s_a - s_n).square().sum(-1)  # (B,)
    return F.relu(d_ap - d_an + margin).mean()


def kl_loss(log_s_a: torch.Tensor, log_s_p: torch.Tensor) -> torch.Tensor:
    """L_kl (Eq. 9 ablation): mean_i KL(s_p,i || s_a,i) = mean_i sum_j s_p,ij (log s_p,ij - log s_a,ij).

    The paper prints `log s_p - s_a` (a log missing); the direction KL(s_p || s_a) takes the
    positive's distribution as the reference the anchor should match, and equals
    F.kl_div(log_s_a, log_s_p, log_target=True, reduction="batchmean"). Takes log-probabilities
    (B, A) float32 so that no log of an underflowed probability is taken. Gradients flow into both
    branches, as for the cosine term (the paper does not stop either).
    """
    return (log_s_p.exp() * (log_s_p - log_s_a)).sum(-1).mean()


def age_balance_weights(class_counts: np.ndarray, balance: float) -> np.ndarray:
    """(A,) float32 weight of an image of each age class: (n_a / n)^-balance, where n_a is the
    training images of class a and n their mean over the classes present, rescaled so that the
    weights average 1 over the training images. Absent classes get 0 (no image has them).
    balance 0: all 1; 1: each class present weighs alike in total."""
    counts = np.asarray(class_counts, np.float64)
    present = counts > 0
    if not present.any():
        raise ValueError("age_balance_weights: no training image")
    w = np.zeros_like(counts)
    w[present] = (counts[present] / counts[present].mean()) ** -float(balance)
    w *= counts.sum() / (w * counts).sum()
    return w.astype(np.float32)


def triplet_parts(weights: LossConfig) -> int:
    """How many images of each triplet the loss reads: 1 (the anchors: MV alone), 2 (and their
    positives: the cosine or KL term), 3 (and the negatives: the triplet term, or the age terms on
    every image). The loader delivers only those, so an MV run computes a third of a triplet run's
    images a step, as the paper's MV baseline trains on single images."""
    if weights.triplet or weights.supervise == "triplet":
        return 3
    return 2 if weights.cosine or weights.kl else 1


def age_loss(
    features: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: LossConfig,
    batch: int,
    class_weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Every term of Eq. 7 (and Eq. 9) on a concatenated triplet batch, plus their weighted "total".

    features (3B, D), logits (3B, A): rows [0, B) are anchors, [B, 2B) positives, [2B, 3B)
    negatives, in that order; or only the first `triplet_parts(weights)` of those parts (B or 2B
    rows), all the terms on. targets: (3B,) or (B,) int64 class indices (age - min_age). The age
    terms (ce, mean, variance) supervise the anchors alone, as the paper does, or with
    `weights.supervise == "triplet"` all 3B images (then targets must be (3B,)). `weights` is a
    LossConfig (ce, mean, variance, cosine, triplet, kl, margin, supervise). class_weights: (A,)
    float32 on the logits' device, the weight of a supervised image of each class in the age
    terms (`age_balance_weights`; LossConfig.balance), or None: every image alike.

    Returns 0-d float32 tensors: the unweighted terms "ce", "mean", "variance", "cosine", "triplet",
    "kl"; "total" = sum of weight * term; and "mae", the anchors' mean |expected - true| age in
    years (detached, for logging). A term whose weight is 0 is not computed (a branch on the
    config, not on a tensor) and reads 0, so it contributes exactly nothing, not even a NaN.
    """
    if weights.supervise not in SUPERVISE:
        raise ValueError(f"loss.supervise must be one of {SUPERVISE}, got {weights.supervise!r}")
    need = triplet_parts(weights)
    rows = {need * batch, 3 * batch}
    if features.shape[0] not in rows or logits.shape[0] != features.shape[0]:
        raise ValueError(
            f"age_loss: expected {' or '.join(str(r) for r in sorted(rows))} rows (anchors, positives, negatives: "
            f"batch = {batch}, the loss reads {need} parts), got features {tuple(features.shape)}, logits {tuple(logits.shape)}"
        )
    sup = 3 * batch if weights.supervise == "triplet" else batch  # rows the age terms supervise
    if targets.shape[0] < sup:
        raise ValueError(f"age_loss: supervise={weights.supervise!r} needs {sup} targets, got {targets.shape[0]}")
    log_s = F.log_softmax(logits.float(), dim=-1)  # (3B, A) float32 even under bf16 autocast
    s = log_s.exp()
    s_a, s_p, s_n = s[:batch], s[batch : 2 * batch], s[2 * batch :]  # (B, A) each
    y = targets[:batch]  # (B,)
    y_sup = targets[:sup]  # (B,) or (3B,): the supervised rows' classes
    zero = torch.zeros((), dtype=torch.float32, device=logits.device)
    w_sup = None if class_weights is None else class_weights[y_sup]  # (sup,) a gather on the device

    terms: dict[str, torch.Tensor] = {}
    if not weights.ce:
        terms["ce"] = zero
    elif w_sup is None:
        terms["ce"] = F.nll_loss(log_s[:sup], y_sup)  # = cross_entropy(logits[:sup], y_sup)
    else:
        terms["ce"] = _mean(F.nll_loss(log_s[:sup], y_sup, reduction="none"), w_sup)
    terms["mean"] = mean_loss(s[:sup], y_sup, w_sup) if weights.mean else zero
    terms["variance"] = variance_loss(s[:sup], w_sup) if weights.variance else zero
    terms["cosine"] = cosine_loss(features[:batch], features[batch : 2 * batch]) if weights.cosine else zero
    terms["triplet"] = triplet_loss(s_a, s_p, s_n, weights.margin) if weights.triplet else zero
    terms["kl"] = kl_loss(log_s[:batch], log_s[batch : 2 * batch]) if weights.kl else zero

    total = zero
    for name in TERMS:
        w = float(getattr(weights, name))
        if w:
            total = total + w * terms[name]
    terms["total"] = total
    with torch.no_grad():
        m = _expected_index(s_a)  # (B,) expected class index
        terms["mae"] = (m - y.to(m.dtype)).abs().mean()
    return terms


# --- Presets -------------------------------------------------------------------------------------
#
# Each preset sets every LossConfig field, so a preset alone determines the loss whatever the
# defaults. The paper's "ternary contrast" is Eq. 7 in full: MV (lm = 0.2, lv = 0.05) + cosine
# (lc) + triplet (lt = 1); "binary contrast" drops the triplet (lt = 0). lc = 10 on MORPH II and
# 1 on FG-NET (Sec. 4). The mv-* rows are the Table 6 ablation; the KL rows replace the cosine
# term by KL(s_p || s_a) with the cosine's weight (the paper gives no separate weight for it).

_MV = {"ce": 1.0, "mean": 0.2, "variance": 0.05, "cosine": 0.0, "triplet": 0.0, "kl": 0.0, "margin": DEFAULT_MARGIN,
       "supervise": "anchor", "balance": 0.0}  # the paper supervises the anchor alone, every image alike
_LC = {"fgnet": 1.0, "morph": 10.0}  # lambda_c per dataset

PRESETS: dict[str, dict] = {"mv": dict(_MV), "mv-triplet": {**_MV, "triplet": 1.0}}
for _ds, _lc in _LC.items():
    PRESETS[f"paper-{_ds}-binary"] = {**_MV, "cosine": _lc}
    PRESETS[f"paper-{_ds}-ternary"] = {**_MV, "cosine": _lc, "triplet": 1.0}
    PRESETS[f"mv-cos-{_ds}"] = {**_MV, "cosine": _lc}
    PRESETS[f"mv-cos-triplet-{_ds}"] = {**_MV, "cosine": _lc, "triplet": 1.0}
    PRESETS[f"mv-kl-{_ds}"] = {**_MV, "kl": _lc}
    PRESETS[f"mv-kl-triplet-{_ds}"] = {**_MV, "kl": _lc, "triplet": 1.0}
del _ds, _lc

# Non-loss settings a preset implies, applied to TrainConfig.loader by `apply_train_preset`. The
# paper-* presets reproduce the paper literally, including its *vertical* flips (Sec. 4 as
# printed; horizontal flips are the usual choice for faces and the LoaderConfig default). The mv-*
# ablation presets leave the loader alone: add loader.flip=vertical to match Table 6 literally.
PRESET_LOADER: dict[str, dict] = {name: {"flip": "vertical"} for name in PRESETS if name.startswith("paper-")}


def _check_preset(name: str) -> None:
    if name not in PRESETS:
        raise ValueError(f"unknown loss preset {name!r} (known: {', '.join(sorted(PRESETS))})")


def preset_loss_config(name: str) -> LossConfig:
    """A fresh LossConfig with the preset's weights. Unknown names raise ValueError listing the known."""
    _check_preset(name)
    return LossConfig(**PRESETS[name])


def apply_preset(name: str, loss_cfg: LossConfig) -> LossConfig:
    """Set every field of `loss_cfg` from preset `name`, in place; returns it."""
    _check_preset(name)
    for key, value in PRESETS[name].items():
        setattr(loss_cfg, key, value)
    return loss_cfg


def apply_train_preset(cfg: TrainConfig, name: str | None = None) -> TrainConfig:
    """Apply preset `name` (default: cfg.preset) to cfg.loss and cfg.loader, in place.

    Call it before command-line overrides so that they win. An empty name does nothing.
    """
    name = cfg.preset if name is None else name
    if not name:
        return cfg
    apply_preset(name, cfg.loss)
    loader_fields = {f.name for f in dataclasses.fields(cfg.loader)}
    for key, value in PRESET_LOADER.get(name, {}).items():
        assert key in loader_fields, key  # a preset naming a missing loader field is our bug
        setattr(cfg.loader, key, value)
    cfg.preset = name
    return cfg
