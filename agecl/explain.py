"""Grad-CAM attention maps of an age model (the paper's Fig. 2c) and the `agecl-explain` command line.

Grad-CAM (Selvaraju et al., ICCV 2017) on the last convolutional block, `backbone.layer4`, whose
activations A (N, C, h, w) are 7x7 for a 224 crop:

    y       = the expected age  min_age + sum_j j * s_j        (target "age", the default)
              or the logit of the most probable age class      (target "class", classic Grad-CAM)
    w_c     = mean over (h, w) of dy / dA_c                     (N, C)  channel weights
    cam     = ReLU(sum_c w_c * A_c)                             (N, h, w)
    map     = bilinear upsampling of cam to the crop (S, S), divided by its maximum  -> [0, 1]

Why the expected age: it is what the model reports (regression by expectation), so the map shows
the regions whose features raise the predicted age, for every face whatever its age. The class
logit explains one of A correlated neighbouring classes and changes target as the prediction
moves by a year. The ReLU keeps evidence for an older prediction: regions that pull the age down
are not shown. A map whose maximum is 0 (no region raises the target) stays all zero.

The grid shows, for each face, the crop the network sees and the map over it, titled with the
predicted age +- std and the true age when it is known (shard samples).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agecl.checkpoint import CheckpointError

TARGETS = ("age", "class")


def grad_cam(
    model: nn.Module, x: torch.Tensor, target: str = "age", layer: nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grad-CAM maps of an `AgeModel` for normalised crops x (N, 3, S, S).

    Returns (maps (N, S, S) float32 in [0, 1], expected ages (N,), stds (N,)), detached. `layer`
    defaults to `model.backbone.layer4`. The model must be in eval mode: batch-norm then mixes
    no samples, so the gradient of the summed target gives each sample its own gradient.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if model.training:
        raise ValueError("grad_cam needs the model in eval mode (batch statistics would mix the samples)")
    layer = model.backbone.layer4 if layer is None else layer
    captured: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _m, _inp, out: captured.append(out))
    try:
        # Gradients are needed even when the caller is under no_grad (not under inference_mode:
        # tensors made there never record a graph).
        with torch.enable_grad():
            _, logits = model(x.detach())  # (N, A)
            acts = captured[-1]  # (N, C, h, w)
            if target == "age":
                y = model.expected_age(logits)  # (N,)
            else:
                y = logits.float().gather(1, logits.argmax(1, keepdim=True))[:, 0]  # (N,)
            (grads,) = torch.autograd.grad(y.sum(), acts)  # (N, C, h, w), samples independent
    finally:
        hook.remove()
    weights = grads.float().mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
    cam = F.relu((weights * acts.detach().float()).sum(1, keepdim=True))  # (N, 1, h, w)
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]  # (N, S, S)
    peak = cam.amax(dim=(1, 2), keepdim=True)  # (N, 1, 1)
    maps = torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam)).clamp_(0.0, 1.0)
    logits = logits.detach()
    return maps, model.expected_age(logits), model.age_std(logits)


def explain_faces(
    predictor, faces: np.ndarray, target: str = "age"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Grad-CAM over aligned faces (N, T, T, 3) uint8 with an `AgePredictor`'s model and crop.

    Returns (crops (N, S, S, 3) uint8 as the network sees them before normalisation, maps
    (N, S, S) float32 in [0, 1], ages (N,), stds (N,) float32). No test-time augmentation.
    """
    o, s = predictor.crop_offset, predictor.crop_size
    crops = np.ascontiguousarray(faces[:, o : o + s, o : o + s])  # (N, S, S, 3)
    maps, ages, stds = [], [], []
    for k in range(0, len(faces), predictor.batch_size):
        m, a, d = grad_cam(predictor.model, predictor.preprocess(faces[k : k + predictor.batch_size]), target)
        maps.append(m), ages.append(a), stds.append(d)
    if not maps:
        z = np.zeros(0, np.float32)
        return crops, np.zeros((0, s, s), np.float32), z, z
    return crops, torch.cat(maps).cpu().numpy(), torch.cat(ages).cpu().numpy(), torch.cat(stds).cpu().numpy()


def draw_grid(
    crops: np.ndarray,
    maps: np.ndarray,
    ages: np.ndarray,
    stds: np.ndarray,
    labels: Sequence[str],
    true_ages: Sequence[float | None],
    path: Path | str,
    cols: int = 4,
    alpha: float = 0.5,
) -> None:
    """Write a PNG grid: per face, the crop (titled with its label and true age) and the map
    overlaid on it (titled with the predicted age +- std); `cols` faces a row."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    from agecl.atomic import atomic_path

    n = len(crops)
    cols = max(1, min(cols, n))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(2 * cols * 1.7, rows * 2.0), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, cols)
        true = "?" if true_ages[i] is None else f"{true_ages[i]:g}"
        left, right = axes[r, 2 * c], axes[r, 2 * c + 1]
        left.imshow(crops[i])
        left.set_title(f"{labels[i]}\ntrue {true}", fontsize=7)
        right.imshow(crops[i])
        right.imshow(maps[i], cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0)
        right.set_title(f"pred {ages[i]:.1f} ± {stds[i]:.1f}", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# --- Command line --------------------------------------------------------------------------------


def _shard_faces(args, predictor) -> tuple[np.ndarray, list[str], list[float | None]]:
    """Aligned faces (N, T, T, 3), labels and true ages of `--samples` random shard samples."""
    from agecl import format as fmt
    from agecl.align import decode_photo
    from agecl.reader import ShardSet

    shards = ShardSet(args.shards)
    t = shards.manifest.get("template") or {}
    size, coverage = int(t.get("size", shards.manifest.get("image_size", fmt.IMAGE_SIZE))), t.get("coverage")
    if size != predictor.template_size:
        raise ValueError(
            f"{args.shards}: faces of {size} pixels, the checkpoint was trained on {predictor.template_size}"
        )
    if coverage is not None and abs(float(coverage) - predictor.coverage) > 1e-6:
        print(f"agecl-explain: warning: {args.shards} has coverage {coverage}, the checkpoint "
              f"{predictor.coverage}: the faces are framed differently from training", file=sys.stderr)
    if fmt.template_border(t) != predictor.border:
        print(f"agecl-explain: warning: {args.shards} fills beyond a photo's edge with border {fmt.template_border(t)}, "
              f"the checkpoint's shards with {predictor.border}", file=sys.stderr)
    if args.protocol:
        pool = shards.split_ids(args.protocol, args.fold, args.part)
    else:
        pool = np.arange(len(shards))
    if len(pool) == 0:
        raise ValueError(f"{args.shards}: no samples to draw from")
    rng = np.random.default_rng(args.seed)
    ids = rng.choice(pool, size=min(args.samples, len(pool)), replace=False)
    ids = ids[np.argsort(shards.ages[ids], kind="stable")]  # youngest first: the grid reads by age
    faces = np.stack([decode_photo(shards.jpeg(int(i)).tobytes(), shards.sample_name(int(i))) for i in ids])
    return faces, [f"sample {int(i)}" for i in ids], [float(shards.ages[i]) for i in ids]


def _photo_faces(args, predictor) -> tuple[np.ndarray, list[str], list[float | None]]:
    """Aligned faces (N, T, T, 3) and labels of every face in the photos (at most --samples)."""
    from agecl.predict import find_photos

    photos, _ = find_photos(args.photos)
    faces, labels = [], []
    for r in predictor.predict_photos(photos, keep_aligned=True):
        if not r.ok:
            print(f"agecl-explain: skipped {r.message}", file=sys.stderr)
            continue
        if len(faces) < args.samples:
            faces.append(r.aligned)
            labels.append(f"{Path(r.photo).stem} #{r.face}")
    if not faces:
        raise ValueError("no face found in the photos given")
    return np.stack(faces), labels, [None] * len(faces)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agecl-explain",
        description="Grad-CAM attention maps of a trained age model over aligned faces, as a PNG grid "
        "(face, map overlay, predicted and true age). Grad-CAM target: the expected age (default) or the "
        "logit of the most probable age class, on backbone.layer4.",
        epilog="examples:\n  agecl-explain photo.jpg --checkpoint runs/fgnet/checkpoint.pt --out cam.png\n"
        "  agecl-explain --shards shards/fgnet --samples 16 --checkpoint C --out cam.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("photos", nargs="*", metavar="PHOTO_OR_FOLDER",
                   help="photos (or folders): every face found is drawn")
    p.add_argument("--shards", help="draw random samples of this shard set instead of photos")
    p.add_argument("--samples", type=int, default=16, help="faces drawn at most (default %(default)s)")
    p.add_argument("--protocol", help="with --shards: draw from one part of this split")
    p.add_argument("--fold", type=int, default=0, help="with --protocol: the fold (default %(default)s)")
    p.add_argument("--part", choices=("test", "train"), default="test", help="with --protocol (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample draw (default %(default)s)")
    p.add_argument("--checkpoint", required=True, help="trained model, e.g. runs/<name>/checkpoint.pt")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--target", choices=TARGETS, default="age", help="what Grad-CAM explains (default %(default)s)")
    p.add_argument("--cols", type=int, default=4, help="faces a row (default %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the map over the face (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=16, help="faces a Grad-CAM pass (default %(default)s)")
    return p


def run(args: argparse.Namespace) -> int:
    """Run the command with parsed options; returns the exit status."""
    from agecl.predict import AgePredictor

    if bool(args.photos) == bool(args.shards):
        raise ValueError("give photos or --shards DIR (one of the two)")
    if args.samples < 1 or args.batch_size < 1 or args.cols < 1:
        raise ValueError("--samples, --batch-size and --cols must be at least 1")
    predictor = AgePredictor(args.checkpoint, args.device, batch_size=args.batch_size)
    faces, labels, true_ages = (_shard_faces if args.shards else _photo_faces)(args, predictor)
    crops, maps, ages, stds = explain_faces(predictor, faces, args.target)
    draw_grid(crops, maps, ages, stds, labels, true_ages, args.out, cols=args.cols, alpha=args.alpha)
    print(f"agecl-explain: {len(crops)} face(s) -> {args.out}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (agecl-explain). Exit status 0 on success, 1 on bad input, 2 on usage."""
    args = get_args_parser().parse_args(argv)
    try:
        return run(args)
    except CheckpointError as e:
        print(f"agecl-explain: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # also agecl.format.FormatError, a ValueError
        print(f"agecl-explain: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("agecl-explain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
