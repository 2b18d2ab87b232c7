"""The charts agecl draws, as PNG files (matplotlib's object API on the Agg canvas: no pyplot state,
no display; each file written atomically).

- `plot_pred_vs_true`, `plot_mae_by_age`: a protocol's pooled test predictions
  (`agecl.evaluate.aggregate`).
- `plot_time_to_mae`: test MAE against training time, a line a configuration
  (`benchmarks/time_to_mae.py`).
- `plot_training_curves`: the per-epoch rows of runs' `metrics.jsonl` (each loss term, train MAE,
  learning rate, images/sec). A protocol run folder (`fold-*/`) is one curve, the mean over its
  folds with a band from the lowest to the highest fold; several runs overlaid compare settings
  (the trainer draws one run's curves when it finishes; `agecl-eval --curves` draws any runs,
  finished or still running).
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from agecl.atomic import write_bytes

METRICS_FILE = "metrics.jsonl"
CURVES_PLOT = "curves.png"

# (metrics key, panel title); loss terms that are zero in every run (switched off) get no panel.
CURVE_PANELS = (
    ("total", "total loss (Eq. 7)"),
    ("train_mae", "train MAE (years, anchors)"),
    ("ce", "cross-entropy"),
    ("mean", "mean loss"),
    ("variance", "variance loss"),
    ("cosine", "cosine: 1 - cos(f_a, f_p)"),
    ("triplet", "triplet margin loss"),
    ("kl", "KL(s_p || s_a)"),
    ("lr", "learning rate"),
    ("images_per_sec", "images/sec"),
)
_OPTIONAL = ("ce", "mean", "variance", "cosine", "triplet", "kl")


def _save_figure(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    write_bytes(path, buf.getvalue())


# --- Test predictions ----------------------------------------------------------------------------


def plot_pred_vs_true(path: Path, ages: np.ndarray, expected: np.ndarray, protocol: str, mae: float) -> None:
    """Scatter of predicted (expected value) against true age, with the diagonal."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    hi = float(max(ages.max(), expected.max(), 1)) + 2
    ax.plot([0, hi], [0, hi], color="black", linewidth=1, label="predicted = true")
    ax.scatter(ages, expected, s=6, alpha=0.35 if len(ages) > 2000 else 0.6, linewidths=0)
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_aspect("equal")
    ax.set_xlabel("true age (years)")
    ax.set_ylabel("predicted age (years, expected value)")
    ax.set_title(f"{protocol}: MAE {mae:.2f} on {len(ages)} test images")
    ax.legend(loc="upper left")
    fig.tight_layout()
    _save_figure(fig, path)


def plot_mae_by_age(path: Path, by_age: Mapping[str, Mapping], protocol: str) -> None:
    """Bars of the MAE in each true-age group, each labelled with its image count."""
    from matplotlib.figure import Figure

    labels = list(by_age)
    mae = [by_age[k]["mae"] or 0.0 for k in labels]
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    bars = ax.bar(labels, mae, color="tab:blue")
    for bar, k in zip(bars, labels):
        ax.annotate(
            f"n={by_age[k]['n']}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xlabel("true age group (years)")
    ax.set_ylabel("MAE (years)")
    ax.set_title(f"{protocol}: MAE by age group")
    ax.margins(y=0.15)
    fig.tight_layout()
    _save_figure(fig, path)


# --- Training curves -----------------------------------------------------------------------------


@dataclass
class Curves:
    """Per-epoch training metrics of one run, or of every fold of a protocol run."""

    label: str
    epochs: np.ndarray  # (E,) 1-based epoch numbers
    values: dict[str, np.ndarray]  # key -> (F, E) per fold (F = 1 for a single run), NaN where a fold has no row
    folds: int


def epoch_rows(metrics_path: Path | str) -> list[dict]:
    """The "epoch" rows of a metrics.jsonl, one per epoch in order. A run resumed after a kill
    rewrites an epoch: the last row of each epoch wins. A torn last line (a run killed while
    appending) is skipped."""
    by_epoch: dict[int, dict] = {}
    for line in Path(metrics_path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("kind") == "epoch" and "epoch" in row:
            by_epoch[int(row["epoch"])] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def read_curves(run: Path | str, label: str | None = None) -> Curves:
    """A run folder's curves: its own metrics.jsonl, else those of its fold-*/ folders (a protocol
    run). Raises FileNotFoundError naming the folder when there is none or no epoch has finished."""
    run = Path(run)
    files = [run / METRICS_FILE] if (run / METRICS_FILE).is_file() else sorted(run.glob(f"fold-*/{METRICS_FILE}"))
    runs = [rows for rows in (epoch_rows(f) for f in files) if rows]
    if not runs:
        what = "no metrics.jsonl" if not files else "no finished epoch in its metrics.jsonl"
        raise FileNotFoundError(f"{run}: {what} (nor in fold-*/)")
    epochs = np.array(sorted({int(r["epoch"]) for rows in runs for r in rows}))
    column = {int(e): i for i, e in enumerate(epochs)}
    keys = [k for k, _ in CURVE_PANELS]
    values = {k: np.full((len(runs), len(epochs)), np.nan) for k in keys}
    for f, rows in enumerate(runs):
        for r in rows:
            for k in keys:
                if isinstance(r.get(k), (int, float)):
                    values[k][f, column[int(r["epoch"])]] = float(r[k])
    return Curves(label or run.name, epochs, values, len(runs))


def fold_mean(values: np.ndarray) -> np.ndarray:
    """(F, E) -> (E,): the mean over the folds that logged each epoch (NaN where none did)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice": that NaN is the answer
        return np.nanmean(values, axis=0)


def _uses(curves: Curves, key: str) -> bool:
    """Whether a run logged `key` as non-zero in some epoch (a loss term it has switched on)."""
    return bool(np.nan_to_num(curves.values[key]).any())


def _shown(curves: Sequence[Curves]) -> list[tuple[str, str]]:
    """The panels worth drawing: a loss term only where some run uses it."""
    return [(k, t) for k, t in CURVE_PANELS if k not in _OPTIONAL or any(_uses(c, k) for c in curves)]


def plot_training_curves(runs: Sequence[Path | str | Curves], path: Path | str, labels: Sequence[str] | None = None,
                         title: str = "") -> list[Curves]:
    """Draw the per-epoch curves of `runs` (run folders or `Curves`) overlaid, one panel a metric,
    into `path`. Returns the curves drawn."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    curves = [r if isinstance(r, Curves) else read_curves(r, labels[i] if labels else None) for i, r in enumerate(runs)]
    panels = _shown(curves)
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(3.6 * ncols, 2.8 * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (key, panel_title) in zip(axes, panels):
        for i, c in enumerate(curves):
            v = c.values[key]
            if key in _OPTIONAL and not _uses(c, key):
                continue  # a term this run does not use: no flat line at zero to misread
            color = f"C{i % 10}"
            marker = "o" if len(c.epochs) < 3 else None
            name = c.label + (f" (mean of {c.folds} folds)" if c.folds > 1 else "")
            ax.plot(c.epochs, fold_mean(v), color=color, marker=marker, linewidth=1.5, label=name)
            if c.folds > 1:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # a metric no fold logged: a gap
                    ax.fill_between(c.epochs, np.nanmin(v, axis=0), np.nanmax(v, axis=0), color=color, alpha=0.15,
                                    linewidth=0)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    # Title, then the legend (from the total-loss panel, where every run is drawn), above the grid.
    height = fig.get_figheight()
    top = 1 - 0.1 / height
    if title:
        fig.suptitle(title, y=top, va="top", fontsize=11)
        top -= 0.3 / height
    if len(curves) > 1:
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, top), ncol=min(len(curves), 4),
                   fontsize=9, frameon=False)
        top -= 0.3 / height
    fig.tight_layout(rect=(0, 0, 1, top))
    _save_figure(fig, Path(path))
    return curves


# --- Time to a given MAE (benchmarks/time_to_mae.py) -------------------------------------------------


def plot_time_to_mae(curves: Mapping[str, Sequence[Mapping]], path: Path | str, title: str = "",
                     target: float | None = None) -> None:
    """Test MAE against elapsed training time, one line a configuration (points: dicts with
    "elapsed_s" and "test_mae"), with the target MAE as a dashed line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.subplots()
    for i, (name, points) in enumerate(curves.items()):
        ax.plot([p["elapsed_s"] / 60 for p in points], [p["test_mae"] for p in points], marker="o", markersize=3,
                linewidth=1.5, color=f"C{i % 10}", label=f"{name} (final {points[-1]['test_mae']:.2f})")
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.2f}")
    ax.set_xlabel("elapsed training time (minutes; evaluations excluded)")
    ax.set_ylabel("test MAE (years)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save_figure(fig, Path(path))
