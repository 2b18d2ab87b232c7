"""Evaluation: predictions, MAE / CS(5) / per-age-group error, identity invariance, fold results,
protocol aggregation with a Markdown report and plots, and the `agecl-eval` command line.

One fold's evaluation is `predict` -> `metrics` -> `write_fold_results`, which the trainer calls at
the end of each fold and `agecl-eval --checkpoint` calls on a saved model. `aggregate` turns a
protocol run folder (`<run>/fold-*/results.json` + `predictions.npz`) into one result:

- FG-NET leave-one-person-out (a protocol whose name has the word "lopo"): each fold is one
  person (about 12 images), so a per-fold MAE is noisy and a mean over folds would weight a person
  with 3 photos like one with 18. The paper's number is the MAE over all 1,002 test predictions
  pooled, so that is the headline.
- Every other protocol (MORPH II RS / SE, five folds): mean +- std over folds is the headline (how
  the literature reports five-fold results); the pooled numbers are reported beside it.

Definitions (the paper's, made exact):
- prediction: the expected age yhat = min_age + sum_j j * s_j, not rounded;
- MAE = mean |yhat - y|; CS(5) = share of test images with |yhat - y| <= 5 (the boundary counts);
- MAE by age group: grouped by the TRUE age in the Table 1 groups of `format.AGE_BINS`;
- identity invariance (Table 5): see `identity_variance`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agecl import format as fmt
from agecl import plots
from agecl.checkpoint import flatten_config
from agecl.atomic import atomic_path, write_json, write_text
from agecl.config import NO_TEST_FOLD
from agecl.model import unwrap

RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "predictions.npz"
REPORT_FILE = "results.md"
SCATTER_PLOT = "pred_vs_true.png"
AGE_GROUP_PLOT = "mae_by_age.png"
CURVES_PLOT = plots.CURVES_PLOT
FOLD_DIR_GLOB = "fold-*"
ALL_PROTOCOL = "all"  # results.json's protocol of `agecl-eval --all`: every sample of a set is tested

CS_THRESHOLD = 5.0  # years: CS(5), the paper's cumulative score
TTA_MODES = ("none", "flip")  # evaluation-time augmentation: none, or the mean with the mirror image

# Arrays stored in predictions.npz (features and probabilities stay out: they are large and only
# the identity-invariance numbers, already in results.json, need them).
_NPZ_KEYS = ("ids", "ages", "expected", "std", "identities")


# --- Prediction ----------------------------------------------------------------------------------


@dataclass
class Predictions:
    """One pass of a model over an evaluation set; host numpy arrays, one row per test image."""

    ids: np.ndarray  # (N,) int64 global sample ids (rows of the shard index)
    ages: np.ndarray  # (N,) int64 true ages, years
    expected: np.ndarray  # (N,) float32 expected age yhat, years, not rounded
    std: np.ndarray  # (N,) float32 standard deviation of the predicted age distribution, years
    identities: np.ndarray  # (N,) int64 identity numbers (positions in identities.json)
    features: np.ndarray | None = None  # (N, D) float32 backbone features f (D = 512 for ResNet-18)
    probs: np.ndarray | None = None  # (N, A) float32 softmax s over the A age classes

    def __len__(self) -> int:
        return len(self.ids)


def predict(
    model: nn.Module,
    eval_loader: Iterable,
    autocast_ctx=None,
    *,
    min_age: int | None = None,
    keep_features: bool = True,
    tta: str = "none",
) -> Predictions:
    """Run `model` over `eval_loader` and return the `Predictions`, under `torch.inference_mode`.

    `model(images)` returns `(features (B, D), logits (B, A))` (an `AgeModel`, possibly compiled or
    DDP-wrapped); class j is the age `min_age + j`, `min_age` taken from the model unless given.
    Each batch has `images` (B, 3, S, S) on the model's device and `ages`, `identities`, `ids` (B,).
    `autocast_ctx` (default: none) is entered around the forward pass only; the softmax, expected
    age and std are computed in float32 whatever the autocast dtype. Outputs accumulate on the device
    and come to the host once, at the end. The model is put in eval mode and its previous mode
    restored. `keep_features=False` drops `features` and `probs` (no identity invariance then).
    `tta="flip"` also runs each image's horizontal mirror and averages the two age distributions
    (and the two feature vectors): the expected age and std are those of the mixture, as
    `agecl-predict --tta flip` reports them. The aligned template is near symmetric and training
    flips horizontally, so the mirror is a face the model knows.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
    plain = unwrap(model)
    if min_age is None:
        if not hasattr(plain, "min_age"):
            raise ValueError(f"{type(plain).__name__} has no min_age attribute: pass predict(..., min_age=...)")
        min_age = int(plain.min_age)
    ctx = nullcontext() if autocast_ctx is None else autocast_ctx
    was_training = model.training
    model.eval()
    # Per-batch outputs stay on their device: no host sync inside the loop.
    chunks: dict[str, list[torch.Tensor]] = {k: [] for k in ("ids", "ages", "identities", "expected", "std", "f", "s")}
    class_index = None
    try:
        with torch.inference_mode():
            for batch in eval_loader:
                with ctx:
                    f, logits = model(batch.images)  # (B, D), (B, A), maybe bf16
                s = F.softmax(logits.float(), dim=-1)  # (B, A) float32
                if tta == "flip":
                    with ctx:
                        f_m, logits_m = model(batch.images.flip(-1))
                    s = 0.5 * (s + F.softmax(logits_m.float(), dim=-1))
                    f = 0.5 * (f.float() + f_m.float())
                if class_index is None:
                    class_index = torch.arange(s.shape[1], dtype=torch.float32, device=s.device)  # (A,)
                m = s @ class_index  # (B,) mean class index
                var = (s * (class_index - m[:, None]) ** 2).sum(-1)  # (B,) years^2
                chunks["expected"].append(m + min_age)
                chunks["std"].append(var.clamp_min(0).sqrt())
                # The loader may hand out views of buffers it reuses for the next batch (DALI), and
                # a model compiled with CUDA graphs reuses its output buffers: keep copies. The
                # (B,) labels and (B, D) features are small; s, m and var are fresh tensors.
                chunks["ids"].append(batch.ids.clone())
                chunks["ages"].append(batch.ages.clone())
                chunks["identities"].append(batch.identities.clone())
                if keep_features:
                    chunks["f"].append(f.to(torch.float32, copy=True))
                    chunks["s"].append(s)
    finally:
        model.train(was_training)
    if not chunks["ids"]:
        raise ValueError("predict: the evaluation loader yielded no batches (empty test fold?)")

    def host(key: str, dtype) -> np.ndarray:
        # The one device-to-host copy of each output (a sync point, once per evaluation).
        return torch.cat(chunks[key]).cpu().numpy().astype(dtype, copy=False)

    return Predictions(
        ids=host("ids", np.int64),
        ages=host("ages", np.int64),
        expected=host("expected", np.float32),
        std=host("std", np.float32),
        identities=host("identities", np.int64),
        features=host("f", np.float32) if keep_features else None,
        probs=host("s", np.float32) if keep_features else None,
    )


# --- Metrics -------------------------------------------------------------------------------------


def age_group_labels() -> list[str]:
    """Labels of the paper's Table 1 age groups, in order: '0-9', '10-19', ..., '70+'."""
    return [fmt.age_bin_label(lo, hi) for lo, hi in fmt.AGE_BINS]


def _age_group(ages: np.ndarray) -> np.ndarray:
    """(N,) index into `format.AGE_BINS` of each age; -1 for an age in no group."""
    lo = np.array([b[0] for b in fmt.AGE_BINS])
    hi = np.array([b[1] for b in fmt.AGE_BINS])
    idx = np.searchsorted(lo, ages, side="right") - 1  # last group starting at or below the age
    ok = (idx >= 0) & (ages <= hi[np.clip(idx, 0, None)])
    return np.where(ok, idx, -1)


def mae_by_age(expected: np.ndarray, ages: np.ndarray) -> dict[str, dict]:
    """{'0-9': {'mae': float | None, 'n': int}, ...}: the error grouped by TRUE age, every group of
    `format.AGE_BINS` present (an empty group has n = 0 and mae None)."""
    err = np.abs(np.asarray(expected, np.float64) - np.asarray(ages, np.float64))
    g = _age_group(np.asarray(ages))
    keep = g >= 0
    nb = len(fmt.AGE_BINS)
    n = np.bincount(g[keep], minlength=nb)
    total = np.bincount(g[keep], weights=err[keep], minlength=nb)
    return {
        label: {"mae": float(total[i] / n[i]) if n[i] else None, "n": int(n[i])}
        for i, label in enumerate(age_group_labels())
    }


def identity_variance(values: np.ndarray, identities: np.ndarray) -> tuple[float | None, int]:
    """Identity invariance of Table 5: (mean over identities of the within-identity variance, count).

    For each identity i with n_i >= 2 images and vectors v_1..v_{n_i} (rows of `values`, (N, D)):

        var_i = 1/D * sum_d  1/(n_i - 1) * sum_k (v_kd - mean_k v_kd)^2

    i.e. the unbiased (ddof = 1) variance across that identity's images of each of the D
    dimensions, averaged over the dimensions (= the mean squared distance to the identity's centroid
    / D, times n_i / (n_i - 1)). ddof = 1 keeps the value independent, in expectation, of how many
    images a person has (MORPH: about 4, FG-NET: about 12). The result is the plain mean of var_i
    over those identities (each person counts once); identities with one image are skipped. Higher
    means the representation is less tied to who the person is. Raw features, not L2-normalised:
    the value is in the units of f (or of s for the softmax). Returns (None, 0) when no identity
    has two images.
    """
    x = np.asarray(values, dtype=np.float64)  # (N, D)
    if x.ndim != 2 or len(x) != len(identities):
        raise ValueError(f"identity_variance: values {x.shape} must be (N, D) with N = {len(identities)} identities")
    _, inv = np.unique(np.asarray(identities), return_inverse=True)  # (N,) group of each row
    inv = inv.reshape(-1)
    n = np.bincount(inv)  # (G,) images per identity
    sums = np.zeros((len(n), x.shape[1]))
    np.add.at(sums, inv, x)  # (G, D)
    centroid = sums / n[:, None]
    sq = ((x - centroid[inv]) ** 2).sum(1)  # (N,) squared distance of each image to its centroid
    ss = np.bincount(inv, weights=sq, minlength=len(n))  # (G,)
    multi = n >= 2
    if not multi.any():
        return None, 0
    var = ss[multi] / ((n[multi] - 1) * x.shape[1])  # (G',) per-identity variance, mean over dims
    return float(var.mean()), int(multi.sum())


def metrics(
    expected: np.ndarray,
    ages: np.ndarray,
    identities: np.ndarray | None = None,
    features: np.ndarray | None = None,
    probs: np.ndarray | None = None,
) -> dict:
    """MAE, CS(5), bias and MAE by age group of predictions `expected` (N,) against true `ages` (N,);
    with `identities` (N,) and `features` (N, D) / `probs` (N, A), identity invariance too.

    Keys: "mae", "cs5" (share in 0..1 with |yhat - y| <= 5), "bias" (mean yhat - y: > 0 means the
    model guesses too old), "n", "mae_by_age" (see `mae_by_age`), and, when computable,
    "identity_feature_variance", "identity_softmax_variance", "identity_groups" (identities with
    >= 2 images that they average over; see `identity_variance`) and
    "identity_direction_variance": the same measure on the L2-normalised features. The raw
    feature variance moves with the scale of f, which the losses change too (the cosine term
    constrains directions only); on unit vectors it compares models on what the cosine term acts
    on, whatever the scale (not in the paper: ours, reported beside Table 5's measure).
    """
    e = np.asarray(expected, np.float64).reshape(-1)
    y = np.asarray(ages, np.float64).reshape(-1)
    if e.shape != y.shape:
        raise ValueError(f"metrics: {e.shape[0]} predictions for {y.shape[0]} ages")
    if len(e) == 0:
        raise ValueError("metrics: no predictions")
    err = np.abs(e - y)
    out: dict[str, Any] = {
        "mae": float(err.mean()),
        "cs5": float((err <= CS_THRESHOLD).mean()),
        "bias": float((e - y).mean()),
        "n": int(len(e)),
        "mae_by_age": mae_by_age(e, y),
    }
    if identities is not None:
        directions = None
        if features is not None:
            f = np.asarray(features, np.float64)
            directions = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        for key, values in (("identity_feature_variance", features), ("identity_softmax_variance", probs),
                            ("identity_direction_variance", directions)):
            if values is not None:
                out[key], out["identity_groups"] = identity_variance(values, identities)
    return out


def mean_age_baseline(train_ages: np.ndarray, test_ages: np.ndarray) -> float:
    """MAE of always predicting the mean training age: the floor any model must beat."""
    train = np.asarray(train_ages, np.float64)
    test = np.asarray(test_ages, np.float64)
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"mean_age_baseline: {len(train)} training ages, {len(test)} test ages")
    return float(np.abs(test - train.mean()).mean())


# --- One fold's results --------------------------------------------------------------------------


def write_fold_results(
    run_dir: Path | str,
    predictions: Predictions,
    metrics: Mapping,
    protocol: str,
    fold: int,
    extra: Mapping | None = None,
    *,
    n_folds: int | None = None,
) -> dict:
    """Write `run_dir/results.json` and `run_dir/predictions.npz` atomically; return the results dict.

    results.json: "protocol", "fold", "folds" (how many the protocol has, when `n_folds` is given:
    it lets `aggregate` name the missing ones), "n_test", "test_mae", "test_cs5", "test_bias",
    "mae_by_age", the identity-invariance keys when `metrics` has them, then `extra` (for example
    "mean_age_baseline", "epochs", "config", "checkpoint"), which must be JSON-serialisable.
    predictions.npz: ids, ages, expected, std, identities (no features or probabilities).
    """
    run_dir = Path(run_dir)
    results: dict[str, Any] = {"protocol": protocol, "fold": int(fold)}
    if n_folds is not None:
        results["folds"] = int(n_folds)
    results.update(
        {
            "n_test": int(metrics["n"]),
            "test_mae": metrics["mae"],
            "test_cs5": metrics["cs5"],
            "test_bias": metrics.get("bias"),
            "mae_by_age": metrics["mae_by_age"],
        }
    )
    for key in ("identity_feature_variance", "identity_softmax_variance", "identity_direction_variance",
                "identity_groups"):
        if key in metrics:
            results[key] = metrics[key]
    results.update(extra or {})
    # Predictions first: a results.json on disk means the fold is finished and both files exist.
    with atomic_path(run_dir / PREDICTIONS_FILE) as tmp:
        # A file object, not a name: np.savez would append ".npz" to the temporary name.
        with open(tmp, "wb") as f:
            np.savez(f, **{k: getattr(predictions, k) for k in _NPZ_KEYS})
    write_json(run_dir / RESULTS_FILE, results)
    return results


# --- Aggregation over folds ----------------------------------------------------------------------


def is_pooled_protocol(protocol: str | None) -> bool:
    """True for leave-one-person-out protocols ("lopo", "fgnet-lopo", ...): their results pool all
    test predictions; any other protocol averages over folds."""
    return bool(protocol) and "lopo" in re.split(r"[^a-z0-9]+", protocol.lower())


def _ranges(values: Sequence[int]) -> str:
    """'0, 2-5, 9' from sorted ints (82 LOPO folds stay readable)."""
    parts, vals = [], sorted(values)
    i = 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        parts.append(str(vals[i]) if j == i else f"{vals[i]}-{vals[j]}" if j > i + 1 else f"{vals[i]}, {vals[j]}")
        i = j + 1
    return ", ".join(parts)


# Configuration keys that differ from fold to fold by design: which fold, where it is written, and
# where the source model lay on the machine that fine-tuned it (its sha256 says which model it was).
_PER_FOLD_KEYS = frozenset({"data.fold", "out", "name", "model.init_source.path"})


def config_differences(folds: Iterable[Mapping]) -> dict[str, dict[str, list[int]]]:
    """The configuration keys on which a run's finished folds disagree: {key: {value as JSON: folds}}.

    A row resumed in another session may have been fine-tuned from a rebuilt source model (a new
    sha256) or with a changed flag; its pooled MAE then mixes recipes, and the summary should say so
    rather than leave it to memory. A source rebuilt bit for bit (every fold recorded the same
    weights_sha256) is one model, whatever its files' sha256. The machine each fold ran on
    (`agecl.train.machine_facts`: processor, threads, precision, torch) counts too, as `machine.*`
    keys: the same recipe scores otherwise with another number of CPU threads. Folds that recorded
    no configuration are left out.
    """
    flat = {
        int(r["fold"]): flatten_config({**r["config"], "machine": r.get("machine") or {}})  # {}: no machine.* keys
        for r in folds
        if isinstance(r.get("config"), Mapping)
    }
    keys = sorted(set().union(*flat.values()) - _PER_FOLD_KEYS) if flat else []
    weights = {f.get("model.init_source.weights_sha256") for f in flat.values()}
    if len(weights) == 1 and None not in weights:  # one source model, its file written more than once
        keys = [k for k in keys if k != "model.init_source.sha256"]
    differences = {}
    for key in keys:
        by_value: dict[str, list[int]] = {}
        for fold in sorted(flat):
            by_value.setdefault(json.dumps(flat[fold].get(key), sort_keys=True), []).append(fold)
        if len(by_value) > 1:
            differences[key] = by_value
    return differences


def _differences_text(differences: Mapping[str, Mapping[str, list[int]]], width: int = 24) -> str:
    """One line: each differing key with its values (cut to `width` characters) and their folds."""
    def cut(v: str) -> str:
        return v if len(v) <= width else v[: width - 1] + "…"

    return "; ".join(
        f"{key} = " + ", ".join(f"{cut(v)} (folds {_ranges(f)})" for v, f in by_value.items())
        for key, by_value in differences.items()
    )


def _fold_of_dir(path: Path) -> int | None:
    m = re.fullmatch(r"fold-0*(\d+)", path.name)
    return int(m.group(1)) if m else None


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof = 1) of the non-None values; std None below two values."""
    v = np.array([x for x in values if x is not None], np.float64)
    if len(v) == 0:
        return None, None
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def aggregate(parent_dir: Path | str, protocol: str | None = None, *, n_folds: int | None = None) -> dict:
    """Aggregate a protocol run folder: read every `fold-*/results.json` + `predictions.npz`, write
    `results.json`, `results.md` and the PNG plots into `parent_dir`, and return the summary dict.

    `protocol` defaults to the one the folds recorded; the rule follows it (`is_pooled_protocol`).
    The expected number of folds is `n_folds`, else the "folds" the fold results recorded, else
    the number of fold-* folders (and at least the highest finished fold + 1). A fold folder
    without results.json (still running, or killed) counts as missing; the summary says which.
    Raises FileNotFoundError when no fold has finished.
    """
    parent = Path(parent_dir)
    if not parent.is_dir():
        raise FileNotFoundError(f"{parent}: no such run folder")
    dirs = [d for d in parent.glob(FOLD_DIR_GLOB) if d.is_dir() and _fold_of_dir(d) is not None]
    dirs.sort(key=_fold_of_dir)
    folds: list[dict] = []
    preds: list[dict[str, np.ndarray]] = []
    problems: list[str] = []
    for d in dirs:
        rpath, ppath = d / RESULTS_FILE, d / PREDICTIONS_FILE
        if not rpath.is_file():
            continue
        try:
            res = json.loads(rpath.read_text())
            with np.load(ppath) as z:
                arrays = {k: z[k] for k in _NPZ_KEYS}
        except (OSError, ValueError, KeyError) as e:
            problems.append(f"{d.name}: unreadable results ({type(e).__name__}: {e}); counted as missing")
            continue
        res.setdefault("fold", _fold_of_dir(d))
        folds.append(res)
        preds.append(arrays)
    if not folds:
        raise FileNotFoundError(
            f"{parent}: no finished fold (no {FOLD_DIR_GLOB}/{RESULTS_FILE}"
            + (f"; {len(dirs)} fold folders without results" if dirs else "")
            + ")"
        )
    protocols = sorted({str(r.get("protocol")) for r in folds})
    if protocol is None:
        if len(protocols) > 1:
            raise ValueError(f"{parent}: folds of several protocols ({', '.join(protocols)}); pass protocol=")
        protocol = protocols[0]
    elif protocols != [protocol]:
        problems.append(f"folds recorded protocol(s) {', '.join(protocols)}, aggregating as {protocol!r}")

    finished = sorted(int(r["fold"]) for r in folds)
    if n_folds is None:
        recorded = [int(r["folds"]) for r in folds if r.get("folds") is not None]
        n_folds = max(recorded) if recorded else len(dirs)
    n_folds = max(int(n_folds), finished[-1] + 1)
    missing = sorted(set(range(n_folds)) - set(finished))
    status = (
        f"all {n_folds} folds finished"
        if not missing
        else f"{len(finished)} of {n_folds} folds finished: {_ranges(finished)} (missing: {_ranges(missing)})"
    )

    # Pooled: every finished fold's test predictions as one set.
    pooled_arrays = {k: np.concatenate([p[k] for p in preds]) for k in _NPZ_KEYS}
    pooled = metrics(pooled_arrays["expected"], pooled_arrays["ages"])
    n_unique = int(len(np.unique(pooled_arrays["ids"])))
    if n_unique != pooled["n"]:
        problems.append(f"{pooled['n'] - n_unique} test images appear in more than one fold (overlapping test folds?)")

    differences = config_differences(folds)
    if differences:
        problems.append(f"the folds were not trained alike: {_differences_text(differences)}")

    per_fold = [
        {
            "fold": int(r["fold"]),
            "n": int(r["n_test"]),
            "mae": r["test_mae"],
            "cs5": r["test_cs5"],
            "mean_age_baseline": r.get("mean_age_baseline"),
            "identity_feature_variance": r.get("identity_feature_variance"),
            "identity_softmax_variance": r.get("identity_softmax_variance"),
            "identity_direction_variance": r.get("identity_direction_variance"),
            "identity_groups": r.get("identity_groups"),
        }
        for r in sorted(folds, key=lambda r: int(r["fold"]))
    ]
    mae_mean, mae_std = _mean_std([f["mae"] for f in per_fold])
    cs5_mean, cs5_std = _mean_std([f["cs5"] for f in per_fold])
    over_folds = {"mae_mean": mae_mean, "mae_std": mae_std, "cs5_mean": cs5_mean, "cs5_std": cs5_std}

    pooled_rule = is_pooled_protocol(protocol)
    if pooled_rule:
        rule = "pooled"
        rule_text = (
            f"leave-one-person-out: MAE and CS(5) pooled over all {pooled['n']} test predictions "
            "(each fold is one person; mean over folds also given)"
        )
        test_mae, test_cs5, test_mae_std = pooled["mae"], pooled["cs5"], None
    else:
        rule = "mean_over_folds"
        rule_text = (
            f"mean +- sample std (ddof=1) over the {len(per_fold)} finished folds "
            "(pooled over all test predictions also given)"
        )
        test_mae, test_cs5, test_mae_std = mae_mean, cs5_mean, mae_std

    def combine(key: str, weight_key: str | None) -> float | None:
        """Mean over folds of a per-fold value; weighted by `weight_key` when given."""
        rows = [f for f in per_fold if f[key] is not None]
        if not rows:
            return None
        v = np.array([f[key] for f in rows], np.float64)
        w = np.array([f[weight_key] or 0 for f in rows], np.float64) if weight_key else np.ones(len(rows))
        return float((v * w).sum() / w.sum()) if w.sum() > 0 else None

    summary = {
        "protocol": protocol,
        "rule": rule,
        "rule_text": rule_text,
        "status": status,
        "complete": not missing,
        "folds_expected": n_folds,
        "folds_finished": finished,
        "folds_missing": missing,
        "test_mae": test_mae,
        "test_mae_std": test_mae_std,
        "test_cs5": test_cs5,
        "n_test": pooled["n"],
        # The baseline follows the rule: weighted by test images it is the pooled baseline MAE.
        "mean_age_baseline": combine("mean_age_baseline", "n" if pooled_rule else None),
        # Each fold's value is a mean over its identities; weighting by their count gives the mean
        # over every (fold, identity) group: the paper's mean over identities, under any rule
        # (LOPO: one person a fold, so the plain mean over people).
        "identity_feature_variance": combine("identity_feature_variance", "identity_groups"),
        "identity_softmax_variance": combine("identity_softmax_variance", "identity_groups"),
        "identity_direction_variance": combine("identity_direction_variance", "identity_groups"),
        "identity_groups": int(sum(f["identity_groups"] or 0 for f in per_fold)),
        "pooled": pooled,
        "over_folds": over_folds,
        "per_fold": per_fold,
        "config_differences": differences,
        "problems": problems,
        "plots": [SCATTER_PLOT, AGE_GROUP_PLOT],
    }
    plots.plot_pred_vs_true(parent / SCATTER_PLOT, pooled_arrays["ages"], pooled_arrays["expected"], protocol,
                            pooled["mae"])
    plots.plot_mae_by_age(parent / AGE_GROUP_PLOT, pooled["mae_by_age"], protocol)
    try:  # the folds' training curves, averaged; fold folders written by agecl-eval alone have none
        plots.plot_training_curves([parent], parent / CURVES_PLOT, title=f"{parent.name}: training, per epoch")
        summary["plots"].append(CURVES_PLOT)
    except FileNotFoundError:
        pass
    write_json(parent / RESULTS_FILE, summary)
    write_text(parent / REPORT_FILE, report_markdown(summary, title=parent.name))
    return summary


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def report_markdown(summary: Mapping, title: str = "") -> str:
    """The Markdown report of an `aggregate` summary: status, rule, per-fold table, summary rows,
    MAE by age group, identity invariance and the plots."""
    s = summary
    lines = [f"# {title or 'Evaluation'}: protocol {s['protocol']}", ""]
    lines.append(f"**{s['status'][0].upper() + s['status'][1:]}.**" + ("" if s["complete"] else " Partial result."))
    lines.append("")
    lines.append(f"Rule: {s['rule_text']}.")
    lines.append("")
    headline = f"**MAE {_f(s['test_mae'])}"
    if s.get("test_mae_std") is not None:
        headline += f" ± {_f(s['test_mae_std'])}"
    headline += f", CS(5) {_pct(s['test_cs5'])}** on {s['n_test']} test images"
    if s.get("mean_age_baseline") is not None:
        headline += f" (mean-age baseline MAE {_f(s['mean_age_baseline'])})"
    lines += [headline + ".", ""]
    for p in s["problems"]:
        lines.append(f"- Warning: {p}")
    if s["problems"]:
        lines.append("")
    lines += ["| fold | n | MAE | CS(5) | baseline MAE |", "|---:|---:|---:|---:|---:|"]
    for f in s["per_fold"]:
        lines.append(f"| {f['fold']} | {f['n']} | {_f(f['mae'])} | {_pct(f['cs5'])} | {_f(f['mean_age_baseline'])} |")
    o, p = s["over_folds"], s["pooled"]
    mae_std = "" if o["mae_std"] is None else f" ± {_f(o['mae_std'])}"
    cs5_std = "" if o["cs5_std"] is None else f" ± {_pct(o['cs5_std'])}"
    lines.append(f"| **mean ± std over folds** | {len(s['per_fold'])} folds | {_f(o['mae_mean'])}{mae_std} "
                 f"| {_pct(o['cs5_mean'])}{cs5_std} | |")
    lines.append(f"| **pooled** | {p['n']} | {_f(p['mae'])} | {_pct(p['cs5'])} | |")
    lines += ["", "MAE by true age group (pooled test predictions):", "", "| age | n | MAE |", "|---|---:|---:|"]
    for label, g in p["mae_by_age"].items():
        lines.append(f"| {label} | {g['n']} | {_f(g['mae'])} |")
    if s.get("identity_feature_variance") is not None or s.get("identity_softmax_variance") is not None:
        lines += [
            "",
            f"Identity invariance (Table 5) over {s.get('identity_groups', 0)} identities with >= 2 test images "
            "(mean over identities of the per-dimension variance, ddof=1, across one identity's images, "
            "averaged over the dimensions; higher = less identity-bound): "
            f"features {_f(s.get('identity_feature_variance'), 4)}, "
            f"softmax {_f(s.get('identity_softmax_variance'), 6)}; "
            f"on L2-normalised features (scale-free) {_f(s.get('identity_direction_variance'), 6)}.",
        ]
    lines += ["", f"![predicted against true age]({SCATTER_PLOT})", "", f"![MAE by age group]({AGE_GROUP_PLOT})", ""]
    if CURVES_PLOT in s.get("plots", []):
        lines += [f"![training curves, mean over folds]({CURVES_PLOT})", ""]
    return "\n".join(lines)


# --- Two runs compared on the same faces ---------------------------------------------------------


def load_predictions(run_dir: Path | str) -> Predictions:
    """Every test prediction of a run folder, pooled: each `fold-*/predictions.npz` of a protocol
    run, or the run's own `predictions.npz`. Raises FileNotFoundError naming the folder when it has
    none (the run has not finished a fold)."""
    run = Path(run_dir)
    files = sorted(run.glob(f"{FOLD_DIR_GLOB}/{PREDICTIONS_FILE}")) or sorted(run.glob(PREDICTIONS_FILE))
    if not files:
        raise FileNotFoundError(f"{run}: no {PREDICTIONS_FILE} (neither the run's own nor a fold's): a finished run is needed")
    arrays: dict[str, list[np.ndarray]] = {k: [] for k in _NPZ_KEYS}
    for f in files:
        with np.load(f) as z:
            for k, v in arrays.items():
                v.append(z[k])
    return Predictions(**{k: np.concatenate(v) for k, v in arrays.items()})


def align_predictions(runs: Sequence[Predictions]) -> list[Predictions]:
    """Runs that scored the same faces, each reordered to the first run's rows (matched by sample id;
    `features` and `probs` are dropped). Raises ValueError when fewer than two runs are given, when
    the runs scored different faces, or when one face carries different true ages (different shard
    sets)."""
    if len(runs) < 2:
        raise ValueError(f"align_predictions: {len(runs)} run given, two or more are needed")
    first = runs[0]
    order = np.argsort(first.ids)
    aligned = []
    for k, run in enumerate(runs):
        if len(run) != len(first) or not np.array_equal(np.sort(run.ids), first.ids[order]):
            raise ValueError(f"align_predictions: run {k} scored {len(run)} faces, run 0 {len(first)}, and not the same ones")
        at = np.empty(len(first), np.int64)
        at[order] = np.argsort(run.ids)  # row of `run` for each row of the first run
        if not np.array_equal(run.ages[at], first.ages):
            raise ValueError(f"align_predictions: run {k} gives the same sample ids other true ages: the runs scored different shard sets")
        aligned.append(Predictions(**{key: getattr(run, key)[at] for key in _NPZ_KEYS}))
    return aligned


def average_predictions(runs: Sequence[Predictions]) -> Predictions:
    """The ensemble of runs that scored the same faces: each face's expected age averaged over the
    runs (an equal-weight mixture of their age distributions; `std` is the mixture's). Rows follow the
    first run's order; the errors are `align_predictions`'."""
    aligned = align_predictions(runs)
    e = np.stack([r.expected for r in aligned]).astype(np.float64)  # (runs, N)
    sd = np.stack([r.std for r in aligned]).astype(np.float64)
    mean = e.mean(0)
    std = np.sqrt(np.maximum((sd ** 2 + e ** 2).mean(0) - mean ** 2, 0.0))
    first = aligned[0]
    return Predictions(ids=first.ids, ages=first.ages, expected=mean.astype(np.float32), std=std.astype(np.float32),
                       identities=first.identities)


def paired_difference(base: Predictions, other: Predictions, *, resamples: int = 2000, seed: int = 0) -> dict:
    """How far `other`'s MAE is from `base`'s on the faces both scored (matched by sample id).

    Returns "n" (faces), "people", "mae_base", "mae_other", "difference" (other - base: < 0 means
    `other` is better), "ci95" (its 95 % bootstrap interval), "share_other_worse" / "share_other_better"
    (of faces, by more than 0.01 years). The bootstrap resamples *people*, not faces: one person's
    photos err together (FG-NET's 82 people hold 1,002 photos), so resampling faces would claim a
    precision the data lacks; where every photo is its own person (AAF) the two are the same.
    Raises ValueError when the runs share no face, or give one face different true ages (they
    scored different shard sets).
    """
    common, ib, io = np.intersect1d(base.ids, other.ids, return_indices=True)
    if len(common) == 0:
        raise ValueError("paired_difference: the two runs share no test face")
    if not np.array_equal(base.ages[ib], other.ages[io]):
        raise ValueError("paired_difference: the same sample ids carry different true ages: the runs scored different shard sets")
    err_base = np.abs(base.expected[ib].astype(np.float64) - base.ages[ib])
    err_other = np.abs(other.expected[io].astype(np.float64) - other.ages[io])
    delta = err_other - err_base
    people, person = np.unique(base.identities[ib], return_inverse=True)
    delta_sum = np.bincount(person, delta, len(people))  # per person: the summed difference and faces
    faces = np.bincount(person, minlength=len(people)).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for i in range(0, resamples, 256):  # a block of resamples at once: (block, people) counts
        counts = rng.multinomial(len(people), np.full(len(people), 1 / len(people)), size=min(256, resamples - i))
        draws[i:i + len(counts)] = (counts @ delta_sum) / (counts @ faces)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return {
        "n": int(len(common)),
        "people": int(len(people)),
        "mae_base": float(err_base.mean()),
        "mae_other": float(err_other.mean()),
        "difference": float(delta.mean()),
        "ci95": [float(lo), float(hi)],
        "share_other_worse": float((delta > 0.01).mean()),
        "share_other_better": float((delta < -0.01).mean()),
        "resamples": int(resamples),
    }


# --- Command line --------------------------------------------------------------------------------


def format_metrics(m: Mapping, baseline: float | None = None) -> str:
    """Human-readable lines for one evaluation's metrics."""
    lines = [f"MAE {m['mae']:.3f}  CS(5) {100 * m['cs5']:.1f}%  bias {m['bias']:+.2f}  n {m['n']}"]
    if baseline is not None:
        lines.append(f"mean-age baseline MAE {baseline:.3f}")
    groups = "  ".join(f"{k} {_f(g['mae'])} (n={g['n']})" for k, g in m["mae_by_age"].items())
    lines.append(f"MAE by true age group: {groups}")
    if "identity_feature_variance" in m or "identity_softmax_variance" in m:
        lines.append(
            f"identity invariance over {m.get('identity_groups', 0)} identities with >= 2 images: "
            f"features {_f(m.get('identity_feature_variance'), 4)}, softmax {_f(m.get('identity_softmax_variance'), 6)}, "
            f"feature directions {_f(m.get('identity_direction_variance'), 6)}"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agecl-eval",
        description="Evaluate a checkpoint on a protocol's test fold, or aggregate a protocol run's folds.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="checkpoint.pt to evaluate")
    what.add_argument("--aggregate", metavar="RUN_DIR", help="protocol run folder holding fold-*/results.json")
    what.add_argument("--curves", metavar="RUN_DIR", nargs="+",
                      help="draw the training curves of these runs overlaid (a protocol run: the mean over its "
                      "folds); works on runs still training")
    p.add_argument("--labels", help="--curves: comma-separated legend names (default: the folder names)")
    p.add_argument("--shards", help="shard folder (default: the checkpoint's data.shards)")
    p.add_argument("--protocol", help="split name (default: the checkpoint's, else the manifest's default)")
    p.add_argument("--fold", type=int, help="test fold (default: the checkpoint's)")
    p.add_argument("--all", action="store_true",
                   help="--checkpoint: test on every sample of --shards, no protocol or fold (a model trained on "
                   "another dataset, zero-shot)")
    p.add_argument("--folds", type=int, help="--aggregate: how many folds the protocol has (default: recorded)")
    p.add_argument("--loader", choices=("torch", "dali"), help="default: the checkpoint's loader.loader")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, help="images a batch (default: 3 x the training batch size)")
    p.add_argument("--workers", type=int, help="loader threads / processes (default: the checkpoint's)")
    p.add_argument("--tta", choices=TTA_MODES,
                   help="evaluation-time augmentation: flip averages the age distributions of each face and its "
                   "mirror (default: the checkpoint's test_tta)")
    p.add_argument("--wise-ft", type=float, metavar="W",
                   help="a fine-tuned model: test W x its weights + (1 - W) x those of the checkpoint it started "
                        "from (WiSE-FT; 1: as fine-tuned, the default)")
    p.add_argument("--wise-ft-source", metavar="CHECKPOINT",
                   help="--wise-ft: where the source checkpoint is now (default: the path the run recorded; "
                        "either way it must be the recorded file, by sha256)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on CUDA and on CPUs with AMX or AVX512-BF16, fp32 elsewhere")
    p.add_argument("--out", help="results folder (default: <checkpoint folder>/eval-<protocol>-fold-<K>); "
                   "--curves: the PNG (default: <RUN_DIR>/curves.png for one run, curves.png for several)")
    return p


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _evaluate_checkpoint(args) -> dict:
    from agecl.checkpoint import load_model
    from agecl.config import LoaderConfig, from_dict
    from agecl.loader import build_eval_loader
    from agecl.reader import ShardSet

    device = _resolve_device(args.device)
    model, info = load_model(args.checkpoint, device)
    cfg = info["config"]
    wise_ft = 1.0 if args.wise_ft is None else args.wise_ft
    if wise_ft != 1.0 or args.wise_ft_source:
        from agecl import finetune

        source = finetune.recorded_source(cfg, model.arch, args.wise_ft_source)
        print(finetune.blend_with_source(model, source, wise_ft))
    data = cfg.get("data", {})
    shards = args.shards or data.get("shards")
    if not shards:
        raise SystemExit("agecl-eval: the checkpoint names no shard folder; pass --shards")
    shard_set = ShardSet(shards)
    if args.all:
        if args.protocol or args.fold is not None:
            raise ValueError("--all tests on every sample: it takes no --protocol or --fold")
        if data.get("shards") and Path(data["shards"]).resolve() == shard_set.root.resolve():
            print(f"agecl-eval: WARNING: the checkpoint was trained on {shards}: --all includes its training images",
                  file=sys.stderr)
        # Zero-shot: the whole set is the test set, and there is no training part to take a
        # mean-age baseline from (the model's own training ages are in another shard set).
        protocol, fold = ALL_PROTOCOL, 0
        test_ids = np.arange(len(shard_set), dtype=np.int64)
        train_ids = np.zeros(0, dtype=np.int64)
        baseline = None
    else:
        default_protocol = shard_set.manifest.get("default_protocol")
        trained_on = (data.get("protocol") or default_protocol, int(data.get("fold", 0)))
        protocol = args.protocol or trained_on[0]
        if not protocol:
            raise SystemExit("agecl-eval: no protocol in the checkpoint or the manifest; pass --protocol")
        fold = trained_on[1] if args.fold is None else args.fold
        if fold == NO_TEST_FOLD:
            raise ValueError(
                f"{args.checkpoint}: trained on every fold of {trained_on[0]} (no test fold): test it on another "
                "shard set with --shards DIR --all, or name a --fold (whose images it trained on)"
            )
        if (protocol, fold) != trained_on:
            # Never report a number measured on images the model trained on without saying so.
            print(
                f"agecl-eval: WARNING: the checkpoint was trained for {trained_on[0]} fold {trained_on[1]}; "
                f"{protocol} fold {fold}'s test images may have been in its training set",
                file=sys.stderr,
            )
        test_ids = shard_set.split_ids(protocol, fold, "test")
        train_ids = shard_set.split_ids(protocol, fold, "train")
        baseline = mean_age_baseline(shard_set.ages[train_ids], shard_set.ages[test_ids])

    from agecl.train import choose_precision  # here: agecl.train imports this module

    precision, _ = choose_precision(args.precision, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    # The checkpoint's loader settings (crop size, interpolation) so that the test images are
    # prepared as they were during training; only the backend and its threads may change.
    lcfg = from_dict(LoaderConfig, dict(cfg.get("loader", {})))
    if args.loader:
        lcfg.loader = args.loader
    if args.workers is not None:
        lcfg.workers = args.workers
    loader = build_eval_loader(shard_set, test_ids, lcfg, device=device, batch_size=args.batch_size)
    tta = args.tta or cfg.get("test_tta", "none")
    preds = predict(model, loader, autocast, tta=tta)
    m = metrics(preds.expected, preds.ages, preds.identities, preds.features, preds.probs)
    if args.out:
        out = Path(args.out)
    elif args.all:
        out = Path(args.checkpoint).parent / f"eval-{shard_set.root.resolve().name}-all"
    else:
        out = Path(args.checkpoint).parent / f"eval-{protocol}-fold-{fold}"
    results = write_fold_results(
        out,
        preds,
        m,
        protocol,
        fold,
        n_folds=1 if args.all else int(shard_set.split(protocol).max()) + 1,
        extra={
            "mean_age_baseline": baseline,
            "checkpoint": str(args.checkpoint),
            "epochs": info.get("epoch"),
            "name": cfg.get("name", ""),
            "config": cfg,  # the checkpoint's full configuration, as the trainer records it
            "shards": str(shards),
            "n_train": int(len(train_ids)),
            "tta": tta,
            "wise_ft": wise_ft,
        },
    )
    where = f"every sample of {shards}" if args.all else f"{protocol} fold {fold}"
    print(f"{args.checkpoint}: {where}, {len(preds)} test images" + (", each with its mirror" if tta == "flip" else ""))
    print(format_metrics(m, baseline))
    print(f"wrote {out / RESULTS_FILE} and {out / PREDICTIONS_FILE}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """`agecl-eval`: evaluate a checkpoint (--checkpoint) or aggregate a protocol run (--aggregate)."""
    args = _parser().parse_args(argv)
    if args.aggregate:
        try:
            summary = aggregate(args.aggregate, args.protocol, n_folds=args.folds)
        except (FileNotFoundError, ValueError) as e:
            print(f"agecl-eval: {e}", file=sys.stderr)
            return 2
        print(report_markdown(summary, title=Path(args.aggregate).name))
        print(f"wrote {Path(args.aggregate) / RESULTS_FILE}, {REPORT_FILE}, {SCATTER_PLOT}, {AGE_GROUP_PLOT}")
        return 0
    if args.curves:
        out = Path(args.out) if args.out else (Path(args.curves[0]) if len(args.curves) == 1 else Path()) / CURVES_PLOT
        labels = args.labels.split(",") if args.labels else None
        try:
            curves = plots.plot_training_curves(args.curves, out, labels=labels)
        except (FileNotFoundError, ValueError) as e:
            print(f"agecl-eval: {e}", file=sys.stderr)
            return 2
        for c in curves:
            last = {k: plots.fold_mean(v)[-1] for k, v in c.values.items()}
            print(f"{c.label}: {c.folds} run(s), epoch {c.epochs[-1]}: loss {last['total']:.4f}  "
                  f"train MAE {last['train_mae']:.2f}")
        print(f"wrote {out}")
        return 0
    from agecl.checkpoint import CheckpointError

    try:
        _evaluate_checkpoint(args)
    except (CheckpointError, fmt.FormatError, FileNotFoundError, ValueError) as e:
        # Bad input (a missing or foreign checkpoint, a bad shard set, an unknown fold): the
        # message names the file and the reason; no traceback.
        print(f"agecl-eval: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
