"""The data-loading engine: triplet batches for training, ordered batches for evaluation.

Two implementations behind one interface, chosen by `LoaderConfig.loader`:

- "dali": NVIDIA DALI. The sampler's triplet order feeds `fn.external_source` in batch mode (one
  Python call a batch returns the 3B encoded JPEGs as zero-copy views into the shard maps); one
  processing function (`process`) decodes ("mixed": nvJPEG and the hardware decoder on a GPU;
  "cpu": libjpeg-turbo on DALI's CPU backend, `device_id=None`) and augments inside the DALI graph
  (DALI's ops; on its CPU backend, the bilinear warp is a Numba op from `agecl.warp`).
  The pipeline is built once and reused for every epoch; outputs reach torch through DLPack
  without a copy. On DALI's CPU backend with a network input smaller than the crop, the training
  faces are decoded and shrunk once (`PresizedFaces`, within `LoaderConfig.cache_mb`) and the
  epochs only warp them: the JPEG decode is most of a CPU loader's work.
- "torch": the ordinary alternative we measure against and the fallback where DALI is missing: a
  `DataLoader` whose workers decode with `torchvision.io.decode_jpeg` from the same maps and
  augment with `torchvision.transforms.v2`.

Training (`build_train_loader`): `loader.epoch(e)` draws epoch e's triplets with
`agecl.sampler.TripletSampler` (seed `LoaderConfig.seed`, so the order is a pure function of
(seed, epoch): deterministic and resumable) and yields `TripletBatch`es: rows [0:B] anchors,
[B:2B] positives, [2B:3B] negatives (only the first `LoaderConfig.parts` of those: a loss that
reads the anchors alone can get them alone; 0, which the trainer resolves, counts as all three
here). Every anchor of the rank's slice comes exactly once an epoch; the last, partial batch is
yielded (smaller B) unless `drop_last`.

Evaluation (`build_eval_loader`): centre crop, no augmentation, each sample once, in order.

Labels never go through the augmentation: each batch carries its sample ids, and ages and
identities are gathered on the device from device-resident copies of the index's columns.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from . import format as fmt
from .config import LoaderConfig
from .model import IMAGENET_MEAN, IMAGENET_STD  # the network's input contract
from .reader import ShardSet
from .sampler import TripletSampler, rank_slice

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B: greyscale as torchvision makes it

LOADERS = ("dali", "torch")
FLIPS = ("horizontal", "vertical", "none")
INTERPOLATIONS = ("linear", "nearest")
STAGES = ("train", "decode")  # "decode": the benchmark's decode-only figure, no augmentation


@dataclass
class TripletBatch:
    """One training batch of B triplets, 3B images, everything on the loader's device."""

    images: torch.Tensor  # (3B, 3, S, S) float32, ImageNet-normalised; [0:B] a, [B:2B] p, [2B:3B] n
    ages: torch.Tensor  # (3B,) int64 years
    identities: torch.Tensor  # (3B,) int64 positions in identities.json
    ids: torch.Tensor  # (3B,) int64 sample ids (rows of index.npy)
    size: int  # B, triplets in this batch
    # The parts of each triplet delivered (LoaderConfig.parts): with 1 or 2 the rows above are B or
    # 2B, the anchors (and their positives) only.
    parts: int = 3

    @property
    def anchors(self) -> torch.Tensor:
        return self.images[: self.size]


@dataclass
class EvalBatch:
    """One evaluation batch: B samples of the split, in order, on the loader's device."""

    images: torch.Tensor  # (B, 3, S, S) float32, ImageNet-normalised centre crops
    ages: torch.Tensor  # (B,) int64
    identities: torch.Tensor  # (B,) int64
    ids: torch.Tensor  # (B,) int64 sample ids

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])


# ----------------------------------------------------------------------------------------------
# Factories: what the trainer and the evaluator call.


def build_train_loader(
    shards: ShardSet,
    ids: np.ndarray,
    cfg: LoaderConfig,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    stage: str = "train",
):
    """The training loader of `cfg.loader` ("dali" | "torch") over the training sample ids.

    Iterate `loader.epoch(e)` (or `loader.set_epoch(e)` then `iter(loader)`); `len(loader)` is the
    steps of an epoch (the same on every rank); `loader.fallback_count` is the current epoch's
    count of anchors drawn at a fallback age. `stage="decode"` is for the benchmark only: decode,
    no augmentation, raw uint8 images in the decoder's layout (DALI (3B, 256, 256, 3), torch
    (3B, 3, 256, 256)).
    """
    _check_config(cfg, shards)
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    cls = DaliTrainLoader if cfg.loader == "dali" else TorchTrainLoader
    return cls(shards, ids, cfg, device, rank, world_size, drop_last, stage)


def build_eval_loader(
    shards: ShardSet,
    ids: np.ndarray,
    cfg: LoaderConfig,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
):
    """The evaluation loader of `cfg.loader` over sample ids `ids`, in order, each once.

    batch_size: images a batch (default 3 * cfg.batch_size, a training batch's images). With
    world_size > 1 each rank gets a contiguous slice of `ids`.
    """
    _check_config(cfg, shards)
    cls = DaliEvalLoader if cfg.loader == "dali" else TorchEvalLoader
    return cls(shards, ids, cfg, device, batch_size or 3 * cfg.batch_size, rank, world_size)


def _check_config(cfg: LoaderConfig, shards: ShardSet) -> None:
    if cfg.loader not in LOADERS:
        raise ValueError(f"loader must be one of {LOADERS}, got {cfg.loader!r}")
    if cfg.flip not in FLIPS:
        raise ValueError(f"flip must be one of {FLIPS}, got {cfg.flip!r}")
    if cfg.interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {cfg.interpolation!r}")
    side = int(shards.manifest.get("image_size", fmt.IMAGE_SIZE))
    if not 0 < cfg.image_size <= side:
        raise ValueError(f"image_size must be in [1, {side}] (the stored faces are {side} px), got {cfg.image_size}")
    if not 0 <= cfg.output_size <= cfg.image_size:
        raise ValueError(f"output_size must be in [0, image_size = {cfg.image_size}] (0: the crop itself), got {cfg.output_size}")
    if cfg.batch_size < 1 or cfg.workers < 0 or cfg.prefetch < 1:
        raise ValueError(f"need batch_size >= 1, workers >= 0, prefetch >= 1; got {cfg}")
    if cfg.parts not in (0, 1, 2, 3):
        raise ValueError(f"parts (the images of each triplet delivered) must be 1, 2, 3 or 0 (all three), got {cfg.parts}")
    if not 0 <= cfg.grey <= 1:
        raise ValueError(f"grey (the probability of a greyscale training image) must be in [0, 1], got {cfg.grey}")


def _device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _check_ids(shards: ShardSet, ids) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"sample ids must be 1-d, got shape {ids.shape}")
    if len(ids) and (ids.min() < 0 or ids.max() >= len(shards)):
        raise ValueError(f"sample ids must lie in [0, {len(shards)}) for {shards.root}")
    return ids


# ----------------------------------------------------------------------------------------------
# Epoch layout shared by both implementations.


def _epoch_steps(n: int, batch: int, world_size: int, drop_last: bool) -> int:
    """Steps of an epoch of n anchors: the same on every rank (DDP needs equal step counts)."""
    sizes = [hi - lo for lo, hi in (rank_slice(n, r, world_size) for r in range(world_size))]
    return min(sizes) // batch if drop_last else math.ceil(max(sizes) / batch)


def _batch_bounds(m: int, batch: int, steps: int) -> np.ndarray:
    """(steps + 1,) boundaries of this rank's batches over its m anchors.

    Batches of `batch`, the last partial (or the tail dropped when m > steps * batch). A rank one
    anchor short of a batch boundary that another rank crosses would have one step fewer: its last
    batch is then split in two, so every rank takes `steps` steps and every anchor still comes once.
    """
    bounds = np.minimum(np.arange(steps + 1, dtype=np.int64) * batch, m)
    if steps and bounds[-2] == bounds[-1]:  # one batch short: halve the last full batch
        lo = bounds[-3] if steps >= 2 else 0
        bounds[-2] = lo + (m - lo + 1) // 2
    return bounds


class _TrainEpochs:
    """The sampler and the epoch layout of one rank: epoch e -> list of (3b,) int64 sample ids."""

    def __init__(self, shards: ShardSet, ids, cfg: LoaderConfig, rank: int, world_size: int, drop_last: bool):
        self.ids = _check_ids(shards, ids)  # (N_train,) sample ids; the sampler works in positions
        self.sampler = TripletSampler(shards.ages[self.ids], shards.identities[self.ids])
        self.seed, self.rank, self.world_size = cfg.seed, rank, world_size
        lo, hi = rank_slice(len(self.ids), rank, world_size)
        self.steps = _epoch_steps(len(self.ids), cfg.batch_size, world_size, drop_last)
        self.bounds = _batch_bounds(hi - lo, cfg.batch_size, self.steps)
        self.parts = cfg.parts or 3
        self.fallback_count = 0

    def batches(self, epoch: int) -> list[np.ndarray]:
        t = self.sampler.epoch(self.seed, epoch, self.rank, self.world_size)
        self.fallback_count = t.fallback_count
        # (M,) sample ids each; the triplets are drawn whole whatever is delivered, so the anchors
        # of an epoch are the same for every `parts`.
        delivered = (self.ids[t.anchor], self.ids[t.positive], self.ids[t.negative])[: self.parts]
        b = self.bounds
        # (parts * b,) per batch: anchors, then their positives, then their negatives.
        return [np.concatenate([x[lo:hi] for x in delivered]) for lo, hi in zip(b[:-1].tolist(), b[1:].tolist())]


class _Labels:
    """Ages and identities of every sample, resident on the device: a batch's labels are a gather."""

    def __init__(self, shards: ShardSet, device: torch.device):
        self.table = torch.from_numpy(np.stack([shards.ages, shards.identities])).to(device)  # (2, N) int64

    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.table[:, ids]  # (2, n) int64, on the device
        return rows[0], rows[1]


class _TrainLoader:
    """A training loader: the sampler's epochs, laid out in batches, run through a runner (DALI or
    torch DataLoader) that turns sample ids into images. Subclasses choose the runner."""

    def __init__(self, shards, ids, cfg, device="cpu", rank=0, world_size=1, drop_last=False, stage="train"):
        self.shards, self.cfg, self.device = shards, cfg, _device(device)
        self._epochs = _TrainEpochs(shards, ids, cfg, rank, world_size, drop_last)
        self._labels = _Labels(shards, self.device)
        self.note: str | None = None  # what the runner chose that a run should print (e.g. faces held decoded)
        self._runner = self._make_runner(stage, rank)
        self._epoch = 0

    def _make_runner(self, stage: str, rank: int):
        raise NotImplementedError

    def epoch(self, epoch: int) -> Iterator[TripletBatch]:
        """Draw epoch `epoch`'s triplets (now: `fallback_count` is set) and return its batches."""
        outputs = self._runner.epoch(epoch, self._epochs.batches(epoch))
        if self.cfg.grey > 0:
            outputs = self._greyed(outputs, epoch)
        return (self._triplet_batch(images, ids) for images, ids in outputs)

    def _greyed(self, outputs, epoch: int):
        """The runner's batches with each image shown in greyscale with probability cfg.grey, the
        draws a pure function of (seed, rank, epoch, step) like the warp's, applied on the device."""
        for step, (images, ids) in enumerate(outputs):
            mask = torch.from_numpy(grey_draws(images.shape[0], self.cfg.grey, (self.cfg.seed, self._epochs.rank, epoch, step)))
            if images.is_cuda:  # pinned, so that the copy does not wait for the stream
                mask = mask.pin_memory().to(images.device, non_blocking=True)
            yield to_grey(images, mask), ids

    def __len__(self) -> int:
        return self._epochs.steps

    @property
    def fallback_count(self) -> int:
        """Anchors of this rank's current epoch drawn at a fallback age (no positive of their own)."""
        return self._epochs.fallback_count

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def __iter__(self) -> Iterator[TripletBatch]:
        return self.epoch(self._epoch)

    def _triplet_batch(self, images: torch.Tensor, ids: torch.Tensor) -> TripletBatch:
        ages, identities = self._labels(ids)
        parts = self._epochs.parts
        return TripletBatch(images, ages, identities, ids, int(ids.shape[0]) // parts, parts)


class _EvalLoader:
    """Evaluation batches: this rank's share of `ids`, in order, centre-cropped, the last partial
    batch kept; iterable again and again. Subclasses choose the runner."""

    def __init__(self, shards, ids, cfg, device="cpu", batch_size=192, rank=0, world_size=1):
        self.shards, self.cfg, self.device = shards, cfg, _device(device)
        ids = _check_ids(shards, ids)
        lo, hi = rank_slice(len(ids), rank, world_size)
        self.ids = ids[lo:hi]
        self.batch_size = batch_size
        self._batches = [self.ids[i : i + batch_size] for i in range(0, len(self.ids), batch_size)]
        self._labels = _Labels(shards, self.device)
        self._runner = self._make_runner(rank)

    def _make_runner(self, rank: int):
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[EvalBatch]:
        for images, ids in self._runner.epoch(0, self._batches):
            ages, identities = self._labels(ids)
            yield EvalBatch(images, ages, identities, ids)


# ----------------------------------------------------------------------------------------------
# DALI


def augmentation_matrices(n: int, cfg: LoaderConfig, side: int, key: Sequence[int]) -> np.ndarray:
    """(n, 2, 3) float32 source -> output maps of the training augmentation, one per image.

    Composed about the face's centre c, right to left: flip (a -1 on one axis) and zoom, rotation,
    then a shift by (translation - crop origin), so that ONE warp into an S x S output does the
    slight affine, the flip and the random crop. Drawn with NumPy from `key` = (seed, rank, epoch,
    step) rather than by DALI's random ops: those are seeded once per pipeline, and a run resumed
    at epoch e must draw what the uninterrupted run drew.
    """
    rng = np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])
    s = cfg.image_size
    zoom = rng.uniform(1 - cfg.scale, 1 + cfg.scale, n)  # (n,)
    sx, sy = zoom, zoom.copy()
    if cfg.flip != "none":
        sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)  # -1: flipped
        if cfg.flip == "horizontal":
            sx = sx * sign
        else:
            sy = sy * sign
    theta = np.deg2rad(rng.uniform(-cfg.rotate_degrees, cfg.rotate_degrees, n))
    cos, sin = np.cos(theta), np.sin(theta)
    m = np.empty((n, 2, 3))
    m[:, 0, 0], m[:, 0, 1] = cos * sx, -sin * sy  # rotation @ diag(sx, sy)
    m[:, 1, 0], m[:, 1, 1] = sin * sx, cos * sy
    shift = rng.uniform(-cfg.translate * side, cfg.translate * side, (n, 2))  # pixels
    origin = rng.integers(0, side - s + 1, (n, 2))  # whole pixels: the crop's corner
    c = np.full(2, side / 2)
    m[:, :, 2] = c + shift - origin - m[:, :, :2] @ c
    return m.astype(np.float32)


GREY_STREAM = 1  # appended to a batch's key: the greyscale draws, apart from the warp's


def grey_draws(n: int, p: float, key: Sequence[int]) -> np.ndarray:
    """(n,) bool: the images of a batch shown in greyscale, each with probability p; drawn from
    `key` = (seed, rank, epoch, step), a stream apart from `augmentation_matrices`' under that key."""
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in (*key, GREY_STREAM)]).random(n) < p


@functools.lru_cache(maxsize=None)
def _grey_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, std, luma weights), each (1, 3, 1, 1) float32 on `device`: made once, not a step."""
    rows = torch.tensor([IMAGENET_MEAN, IMAGENET_STD, LUMA], dtype=torch.float32).view(3, 1, 3, 1, 1).to(device)
    return rows[0], rows[1], rows[2]


def to_grey(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """images (n, 3, S, S) ImageNet-normalised, mask (n,) bool on their device: the masked images
    replaced by their luma in all three channels, normalised again; elementwise on the device."""
    mean, std, luma = _grey_constants(images.device)
    y = (luma * (images * std + mean)).sum(1, keepdim=True)  # (n, 1, S, S), 0-1
    return torch.where(mask.view(-1, 1, 1, 1), (y - mean) / std, images)


def output_size(cfg: LoaderConfig) -> int:
    """Side of the training images the loader delivers: `cfg.output_size`, or the crop when 0."""
    return cfg.output_size or cfg.image_size


def shrink_factor(cfg: LoaderConfig) -> int:
    """f: the training path shrinks the decoded face by f (antialiased) before its warp when the
    loader delivers less than the crop; crop / output rounded, so that the warp then samples at
    0.8-1.33x and never aliases (224 -> 64: f = 4). 1 (no shrink) at full size."""
    out, crop = output_size(cfg), cfg.image_size
    return 1 if out >= crop else max(1, int(crop / out + 0.5))


def presize_scale(cfg: LoaderConfig, side: int, box: bool) -> float:
    """q: stored-face coordinates per presized-face coordinate. `box` (agecl.warp's `box_shrink`):
    exactly f, each small pixel the mean of an f x f block. Otherwise DALI's resize to side // f,
    which maps the whole extent: side / (side // f)."""
    f = shrink_factor(cfg)
    return float(f) if box else side / (side // f)


def to_output(matrices: np.ndarray, cfg: LoaderConfig, q: float) -> np.ndarray:
    """(n, 2, 3) maps of `augmentation_matrices` (stored face -> crop) rewritten in place as maps
    from the presized face (`presize_scale` q) to the delivered output (`output_size`).

    Every resize here scales continuous coordinates whose pixel centres sit at +0.5 (DALI's
    resize, `box_shrink`, torch's interpolate with align_corners=False): out = k (A src + t) with
    src = q src_small and k = output / crop. The same random draws thus give the same
    augmentation at any output size.
    """
    k = output_size(cfg) / cfg.image_size
    matrices[:, :, :2] *= k * q
    matrices[:, :, 2] *= k
    return matrices


def warp_op(cfg: LoaderConfig, gpu: bool) -> str:
    """Which op does the DALI training warp: "agecl.warp" (compiled, bilinear, DALI's CPU backend)
    or "warp_affine" (DALI's own: on a GPU, and for nearest-neighbour sampling)."""
    return "agecl.warp" if not gpu and cfg.interpolation == "linear" else "warp_affine"


def process(jpegs, cfg: LoaderConfig, mode: str, gpu: bool, matrices=None, side: int = fmt.IMAGE_SIZE, presized=False):
    """The DALI graph from encoded JPEGs to network input, as in NVIDIA's examples.

    mode "train": decode, then ONE warp by `matrices` (see `augmentation_matrices`) straight into
    an S x S output, so the warp computes only the pixels that are kept, then
    `crop_mirror_normalize` to normalised float32 NCHW. On DALI's CPU backend with bilinear
    interpolation, `agecl.warp` does both in one compiled op instead. When the loader delivers
    less than the crop (`output_size`), the decoded face is first shrunk by `shrink_factor`
    (antialiased: a box filter inside `agecl.warp` on the CPU, DALI's resize on a GPU) and the
    warp, by `to_output`'s matrices, writes the small output directly.
    mode "eval": decode, centre crop and normalise in one `crop_mirror_normalize`.
    mode "decode": decode only (the benchmark's decode figure), uint8 HWC.
    presized: `jpegs` are faces already decoded and shrunk (`PresizedFaces`, DALI's CPU backend):
    only the warp remains.
    Python `if`s choose the graph at build time.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    if presized:
        from .warp import dali_warp_normalise

        return dali_warp_normalise(jpegs, matrices, output_size(cfg))  # (3, O, O) float32
    images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)  # (H, W, 3) uint8
    if mode == "decode":
        return images
    s = cfg.image_size
    normalise = dict(
        dtype=types.FLOAT,
        output_layout="CHW",
        mean=[m * 255 for m in IMAGENET_MEAN],
        std=[d * 255 for d in IMAGENET_STD],
    )
    if mode == "eval":
        return fn.crop_mirror_normalize(images, crop=(s, s), crop_pos_x=0.5, crop_pos_y=0.5, **normalise)

    # Shrink before the warp when the output is smaller than the crop, with a filter as wide as
    # the shrink (antialias): warping 224 px and then resizing to 64 computes 12x the pixels.
    out, f = output_size(cfg), shrink_factor(cfg)
    if warp_op(cfg, gpu) == "agecl.warp":
        # DALI's own CPU warp is four times the decode's cost; agecl.warp does warp, normalise
        # and transpose in one compiled pass, on the same matrices with the same convention
        # (and the shrink by a box filter, cheaper on a CPU than DALI's resize).
        from .warp import dali_warp_normalise

        return dali_warp_normalise(images, matrices, out, shrink=f)  # (3, O, O) float32
    if f > 1:
        images = fn.resize(images, size=[side // f] * 2, antialias=True, interp_type=types.INTERP_LINEAR)
    interp = types.INTERP_LINEAR if cfg.interpolation == "linear" else types.INTERP_NN
    # Float output: no rounding back to uint8 before normalising.
    images = fn.warp_affine(
        images, matrix=matrices, size=(out, out), inverse_map=False, fill_value=0, interp_type=interp, dtype=types.FLOAT
    )  # (O, O, 3) float32, 0-255
    return fn.crop_mirror_normalize(images, **normalise)  # (3, S, S) float32


class PresizedFaces:
    """Every training face decoded once and box-shrunk by f (`shrink_factor`), held in memory as
    uint8: on DALI's CPU backend the JPEG decode is most of the loader's work, and a network input
    smaller than the crop needs only the shrunk face (64 x 64 x 3 bytes for a 64 px input).

    `faces(ids)` is the (n, h, w, 3) batch of samples `ids`; the warp then maps from these faces
    exactly as from the box filter inside `agecl.warp` (the same matrices), the pixels differing by
    the rounding to whole grey levels.
    """

    def __init__(self, pixels: np.ndarray, rows: np.ndarray, build_s: float):
        self.pixels = pixels  # (n, h, w, 3) uint8, one row per training sample
        self.rows = rows  # (N,) int64: the row of each sample id of the shard set, -1 if not held
        self.build_s = build_s

    def faces(self, ids: np.ndarray) -> np.ndarray:
        return self.pixels[self.rows[ids]]  # (len(ids), h, w, 3): one gather, no Python per sample

    def describe(self) -> str:
        n, h = self.pixels.shape[:2]
        return (f"loader: {n} training faces held decoded at {h} x {h} px ({self.pixels.nbytes / 2**20:.0f} MiB, "
                f"built in {self.build_s:.1f} s): no JPEG decode in the epochs")


def presized_bytes(shards: ShardSet, n: int, cfg: LoaderConfig) -> int:
    """Bytes `PresizedFaces` needs for n faces of this shard set under cfg."""
    h = int(shards.manifest.get("image_size", fmt.IMAGE_SIZE)) // shrink_factor(cfg)
    return n * h * h * 3


def presize_faces(shards: ShardSet, ids: np.ndarray, cfg: LoaderConfig) -> PresizedFaces:
    """Decode samples `ids` once on DALI's CPU backend (`cfg.workers` threads) and box-shrink them:
    a bad JPEG is reported by name here, as it would be by the epoch that met it."""
    import time

    from .warp import box_shrink_batch

    t0 = time.perf_counter()
    unique = np.unique(np.asarray(ids, dtype=np.int64))
    side = int(shards.manifest.get("image_size", fmt.IMAGE_SIZE))
    f = shrink_factor(cfg)
    pixels = np.empty((len(unique), side // f, side // f, 3), np.uint8)
    rows = np.full(len(shards), -1, np.int64)
    rows[unique] = np.arange(len(unique))
    batch = 3 * cfg.batch_size
    runner = _DaliRunner(shards, cfg, torch.device("cpu"), batch, "decode")
    batches = [unique[lo : lo + batch] for lo in range(0, len(unique), batch)]
    lo = 0
    for images, _ in runner.epoch(0, batches):  # (b, side, side, 3) uint8
        box_shrink_batch(images.numpy(), f, pixels[lo : lo + len(images)])
        lo += len(images)
    del runner  # its pipeline's threads and buffers
    return PresizedFaces(pixels, rows, time.perf_counter() - t0)


class _Feed:
    """The external_source callback: batch `info.iteration` of the current epoch.

    Returns (3b encoded JPEGs as zero-copy views into the shard maps, or with `presized` the
    (3b, h, w, 3) faces held decoded; (3b,) int64 sample ids) and, when it augments, the
    (3b, 2, 3) float32 warp matrices of that batch. The JPEG views and matrices are read by the
    pipeline without a copy (`no_copy`), so the matrices stay referenced until the next epoch; a
    batch of faces held decoded is a fresh gather that DALI copies (`presized`), so that an epoch
    of them is not kept alive.
    """

    def __init__(self, shards: ShardSet, cfg: LoaderConfig, augment: bool, seed: int, rank: int, gpu: bool,
                 presized: PresizedFaces | None = None):
        self.shards, self.cfg, self.augment, self.seed, self.rank = shards, cfg, augment, seed, rank
        self.side = int(shards.manifest.get("image_size", fmt.IMAGE_SIZE))
        self.q = presize_scale(cfg, self.side, box=warp_op(cfg, gpu) == "agecl.warp" or presized is not None)
        self.images = presized.faces if presized is not None else shards.jpegs  # ids -> the graph's input
        # Faces held decoded: each batch is a fresh gather that DALI copies; else DALI reads in place.
        self.presized = presized is not None
        self.batches: list[np.ndarray] = []
        self.epoch = 0
        self.kept: dict[int, np.ndarray] = {}  # step -> matrices DALI reads in place, kept for the epoch
        self.limit = 0  # batches of this epoch DALI may still ask for: 0 makes the next call end the epoch

    def start(self, epoch: int, batches: list[np.ndarray]) -> None:
        self.epoch, self.batches, self.limit, self.kept = epoch, batches, len(batches), {}

    def __call__(self, info):
        if info.iteration >= min(self.limit, len(self.batches)):
            raise StopIteration
        ids = self.batches[info.iteration]
        if not self.augment:
            return self.images(ids), ids
        key = (self.seed, self.rank, self.epoch, info.iteration)
        m = to_output(augmentation_matrices(len(ids), self.cfg, self.side, key), self.cfg, self.q)
        if not self.presized:
            self.kept[info.iteration] = m
        return self.images(ids), ids, m


class _DaliRunner:
    """One DALI pipeline, built once, run for many epochs.

    An epoch ends when the feed raises StopIteration and DALI has returned the batches it had
    prefetched; then `reset()` readies the pipeline for the next epoch. An epoch abandoned midway
    (a `break` in the training loop) is drained before the next one starts, and a pipeline that
    failed is rebuilt, so no epoch boundary leaves the pipeline in a broken state.
    """

    def __init__(self, shards: ShardSet, cfg: LoaderConfig, device: torch.device, max_batch: int, mode: str, rank: int = 0,
                 presized: PresizedFaces | None = None):
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as e:
            raise ImportError("loader 'dali' needs nvidia-dali-cuda130 (or use loader=torch)") from e
        self.shards, self.cfg, self.device, self.mode = shards, cfg, device, mode
        self.max_batch = max_batch
        self.feed = _Feed(shards, cfg, augment=mode == "train", seed=cfg.seed, rank=rank, gpu=device.type == "cuda",
                          presized=presized)
        self.pipe = None
        self.open = False  # an epoch has started and not been drained
        self.token = 0  # the epoch a running generator belongs to

    def _build(self):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        gpu = self.device.type == "cuda"

        @pipeline_def(
            batch_size=self.max_batch,  # 3B images; external_source may return fewer (last batch)
            num_threads=max(1, self.cfg.workers),
            device_id=self.device.index if gpu else None,  # None: DALI's CPU backend
            prefetch_queue_depth=self.cfg.prefetch,
            exec_dynamic=True,  # outputs are owned by the consumer: DLPack hand-off without a copy
        )
        def graph():
            outputs = fn.external_source(
                source=self.feed,
                num_outputs=3 if self.feed.augment else 2,
                batch=True,
                batch_info=True,
                no_copy=not self.feed.presized,  # views into the read-only shard maps, and arrays the feed keeps
                dtype=[types.UINT8, types.INT64, types.FLOAT][: 3 if self.feed.augment else 2],
            )
            jpegs, ids = outputs[0], outputs[1]
            images = process(jpegs, self.cfg, self.mode, gpu, outputs[2] if self.feed.augment else None, self.feed.side,
                             presized=self.feed.presized)
            return images, (ids.gpu() if gpu else ids)

        pipe = graph()
        pipe.build()
        return pipe

    def _drain(self):
        """Finish an abandoned epoch: end the feed, discard what DALI prefetched, reset."""
        if self.open and self.pipe is not None:
            self.feed.limit = 0
            try:
                while True:
                    self.pipe.run()
            except StopIteration:
                self.pipe.reset()
        self.open = False

    def epoch(self, epoch: int, batches: list[np.ndarray]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Start epoch `epoch` over `batches` (lists of sample ids); returns the generator of
        (images, ids) torch tensors on the device."""
        self._drain()
        if self.pipe is None:
            self.pipe = self._build()
        self.feed.start(epoch, batches)
        self.token += 1
        return self._run(self.token, batches)

    def _run(self, token: int, batches: list[np.ndarray]):
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        for step in range(len(batches)):
            if token != self.token:
                raise RuntimeError("this epoch's iterator was superseded by a later epoch() call")
            self.open = True
            try:
                # Outputs bound to torch's stream: no host sync, the step's kernels queue after DALI's.
                images, ids = self.pipe.run(stream) if stream is not None else self.pipe.run()
            except StopIteration:
                raise RuntimeError(f"DALI ended the epoch after {step} of {len(batches)} batches") from None
            except Exception as e:
                self.pipe, self.open = None, False  # DALI's pipeline is invalid after an error: rebuild
                if isinstance(e, fmt.FormatError):  # raised by the feed (reader), already named
                    raise
                raise _diagnose(self.shards, batches[step : step + self.cfg.prefetch + 1], e) from e
            yield torch.from_dlpack(images.as_tensor()), torch.from_dlpack(ids.as_tensor())
        # The feed ends the epoch on DALI's next call: take that StopIteration and reset now, so
        # the pipeline is ready for the next epoch.
        if token == self.token:
            self._drain()


def _decode_jpeg(jpeg: np.ndarray) -> torch.Tensor:
    """(3, H, W) uint8 RGB from encoded bytes: torchvision's libjpeg-turbo decoder (PIL where a
    torchvision without image decoding is installed: 0.29 deprecates it in favour of TorchCodec)."""
    try:
        from torchvision.io import decode_jpeg
    except ImportError:
        from PIL import Image

        return torch.from_numpy(np.array(Image.open(io.BytesIO(jpeg.tobytes())).convert("RGB"))).permute(2, 0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # decode_jpeg wants a writable tensor and the map is read-only: one copy of the bytes.
        return decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8))


def _diagnose(shards: ShardSet, batches: list[np.ndarray], error: Exception) -> Exception:
    """Find which sample of the batches in flight failed DALI, by decoding each with torchvision;
    an error naming the shard and the sample, or the original error with what was in flight."""
    for ids in batches:
        for i in ids.tolist():
            try:
                _decode_jpeg(shards.jpeg(i))
            except Exception as e:  # noqa: BLE001 - any decoder error names the sample
                return fmt.FormatError(f"{shards.sample_name(i)}: cannot decode the JPEG ({e}); DALI said: {_first_line(error)}")
    first = batches[0][0] if batches and len(batches[0]) else None
    where = f" (batch starting at {shards.sample_name(int(first))})" if first is not None else ""
    return RuntimeError(f"DALI pipeline failed{where}: {error}")


def _first_line(e: Exception) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return next((line for line in lines if "rror" in line and "Critical" not in line), lines[0] if lines else repr(e))


class DaliTrainLoader(_TrainLoader):
    """Triplet batches from a DALI pipeline fed in the sampler's order (see `build_train_loader`).

    Augmentation draws are a pure function of (cfg.seed, rank, epoch, step) (see
    `augmentation_matrices`): a run resumed at epoch e sees the images the uninterrupted run saw.
    """

    def _make_runner(self, stage: str, rank: int):
        presized, cfg = None, self.cfg
        if (stage == "train" and cfg.cache_mb > 0 and self.device.type == "cpu" and shrink_factor(cfg) > 1
                and warp_op(cfg, False) == "agecl.warp"):
            unique = np.unique(self._epochs.ids)
            need = presized_bytes(self.shards, len(unique), cfg)
            if need <= cfg.cache_mb * 2**20:
                presized = presize_faces(self.shards, unique, cfg)
                self.note = presized.describe()
            else:
                self.note = (f"loader: the training faces need {need / 2**20:.0f} MiB held decoded, over loader.cache_mb = "
                             f"{cfg.cache_mb}: every batch decodes its JPEGs")
        return _DaliRunner(self.shards, cfg, self.device, 3 * cfg.batch_size, stage, rank, presized)


class DaliEvalLoader(_EvalLoader):
    """Evaluation batches from a DALI pipeline: centre crop, in order (see `build_eval_loader`)."""

    def _make_runner(self, rank: int):
        return _DaliRunner(self.shards, self.cfg, self.device, self.batch_size, "eval", rank)


# ----------------------------------------------------------------------------------------------
# torch DataLoader baseline


class _Decoded(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches: key (epoch, step, ids) -> uint8 images.

    Runs in the DataLoader's workers. Each batch seeds torch's generator from (seed, rank, epoch,
    step), so augmentation is deterministic whatever the number of workers and resumable per epoch.
    """

    def __init__(self, shards: ShardSet, cfg: LoaderConfig, mode: str, seed: int, rank: int):
        from torchvision.transforms import v2

        self.shards, self.mode, self.seed, self.rank = shards, mode, seed, rank
        self.size = cfg.image_size
        if mode == "train":
            interp = v2.InterpolationMode.BILINEAR if cfg.interpolation == "linear" else v2.InterpolationMode.NEAREST
            steps = [
                v2.RandomAffine(
                    degrees=cfg.rotate_degrees,
                    translate=(cfg.translate, cfg.translate),
                    scale=(1 - cfg.scale, 1 + cfg.scale),
                    interpolation=interp,
                    fill=0,
                )
            ]
            if cfg.flip == "horizontal":
                steps.append(v2.RandomHorizontalFlip())
            elif cfg.flip == "vertical":
                steps.append(v2.RandomVerticalFlip())
            steps.append(v2.RandomCrop(cfg.image_size))
            if output_size(cfg) < cfg.image_size:  # the baseline shrinks the crop the ordinary way
                steps.append(v2.Resize(output_size(cfg), antialias=True))
            self.transform = v2.Compose(steps)
        elif mode == "eval":
            self.transform = v2.CenterCrop(cfg.image_size)
        else:  # decode
            self.transform = None

    def __len__(self) -> int:  # keys come from the sampler; the length is never used
        return 0

    def __getitem__(self, key) -> dict:
        epoch, step, ids = key
        # fork_rng: with workers=0 this runs in the trainer's process, whose generator stays untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([self.seed, self.rank, epoch, step]).generate_state(1)[0]))
            return {"images": self._images(ids), "ids": torch.from_numpy(ids)}

    def _images(self, ids: np.ndarray) -> torch.Tensor:
        out = None
        for k, i in enumerate(ids.tolist()):
            try:
                image = _decode_jpeg(self.shards.jpeg(i))  # (3, 256, 256) uint8
            except (RuntimeError, OSError) as e:
                raise fmt.FormatError(f"{self.shards.sample_name(i)}: cannot decode the JPEG ({e})") from e
            if self.transform is not None:
                image = self.transform(image)  # (3, S, S) uint8
            if out is None:
                out = torch.empty((len(ids), *image.shape), dtype=torch.uint8)  # (n, 3, S, S)
            out[k] = image
        return out


class _Keys(torch.utils.data.Sampler):
    """The DataLoader's sampler: the current epoch's batch keys (epoch, step, ids), in order."""

    def __init__(self):
        self.keys: list[tuple[int, int, np.ndarray]] = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class _TorchRunner:
    """A DataLoader with persistent workers, over batch keys set per epoch."""

    def __init__(self, shards: ShardSet, cfg: LoaderConfig, device: torch.device, mode: str, rank: int):
        self.device = device
        self.keys = _Keys()
        workers = cfg.workers
        self.loader = torch.utils.data.DataLoader(
            _Decoded(shards, cfg, mode, cfg.seed, rank),
            batch_size=None,  # items are whole batches already
            sampler=self.keys,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=cfg.prefetch if workers > 0 else None,
            worker_init_fn=_worker_init,
        )
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        self.mean, self.inv_std = mean, 1.0 / std
        self.normalise = mode != "decode"

    def epoch(self, epoch: int, batches: list[np.ndarray]):
        self.keys.keys = [(epoch, step, ids) for step, ids in enumerate(batches)]
        return self._run(iter(self.loader))

    def _run(self, it):
        for item in it:
            # uint8 until the device; normalisation happens there (4x fewer bytes to move).
            images = item["images"].to(self.device, non_blocking=True)  # (n, 3, S, S) uint8
            if self.normalise:
                images = (images.float() - self.mean) * self.inv_std  # (n, 3, S, S) float32
            yield images, item["ids"].to(self.device, non_blocking=True)


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # one core a worker: the workers are the parallelism


class TorchTrainLoader(_TrainLoader):
    """Triplet batches from a torch DataLoader: the baseline with the same interface."""

    def _make_runner(self, stage: str, rank: int):
        return _TorchRunner(self.shards, self.cfg, self.device, stage, rank)


class TorchEvalLoader(_EvalLoader):
    """Evaluation batches from a torch DataLoader: centre crop, in order."""

    def _make_runner(self, rank: int):
        return _TorchRunner(self.shards, self.cfg, self.device, "eval", rank)
