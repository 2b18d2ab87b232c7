"""Configuration: one dataclass per concern, composed into `TrainConfig`.

Defaults are the paper's (Adam, lr 0.001, 100 epochs, 64 triplets a batch, 224 crops from 256).
`apply_overrides` takes `section.field=value` strings and refuses unknown keys; `to_dict` /
`from_dict` round-trip a config through a checkpoint (a dict of plain values, never pickled code).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field


# DataConfig.fold of a run with no test fold: it trains on every sample the protocol places in a
# fold (the model to carry forward once a recipe is chosen; `agecl-train --fold none`).
NO_TEST_FOLD = -1


@dataclass
class DataConfig:
    shards: str = ""  # shard folder written by tools/make_shards.py
    protocol: str = ""  # split name under <shards>/splits ("" = the manifest's default_protocol)
    fold: int = 0  # test fold; training uses every other fold (NO_TEST_FOLD: every fold, no test)
    min_age: int = -1  # lowest age class (-1: from the manifest)
    max_age: int = -1  # highest age class (-1: from the manifest)


@dataclass
class LoaderConfig:
    loader: str = "dali"  # "dali" | "torch" (the ordinary DataLoader baseline)
    batch_size: int = 64  # triplets a batch: 3 * batch_size images
    # Images of each triplet the training loader delivers: 1 the anchors, 2 with their positives,
    # 3 the whole triplet. 0: only what the loss reads (agecl.losses.triplet_parts, worked out by
    # the trainer): an MV run then decodes, augments and computes its anchors alone, about twice as
    # fast, but BatchNorm sees a third of the images; fine-tuning MV from the AAF model at 16
    # triplets a batch that cost +0.24 and -0.05 years on FG-NET's select halves (RESULTS.md), so
    # the default stays the whole triplet.
    parts: int = 3
    image_size: int = 224  # side of the training / evaluation crop of the stored face, pixels
    # Side of the training images the loader delivers (0: the crop itself). The trainer sets it to
    # the network's input size: a 64 px network then gets 64 px images drawn straight from the
    # stored face (antialiased resize, then the augmentation warp at about 1:1) rather than 224 px
    # crops it would shrink itself, 12x fewer pixels warped, moved and resized a step.
    output_size: int = 0
    flip: str = "horizontal"  # "horizontal" | "vertical" (the paper's literal text) | "none"
    rotate_degrees: float = 5.0  # random affine: rotation range, +-degrees
    translate: float = 0.02  # random affine: shift range, fraction of the side
    scale: float = 0.05  # random affine: zoom range, 1 +- scale
    interpolation: str = "linear"  # random affine resampling: "linear" | "nearest"
    # Probability that a training image is shown in greyscale (its luma, ITU-R BT.601, in all three
    # channels). FG-NET has scanned greyscale photos (about a fifth) that AAF, all colour, never
    # shows a model. 0: never (the paper's).
    grey: float = 0.0
    workers: int = 2  # DALI CPU threads / DataLoader worker processes
    # MiB the training loader may spend holding every training face decoded and already shrunk to
    # the network input's scale (DALI's CPU backend, output smaller than the crop): the batches
    # then skip the JPEG decode, the CPU loader's largest cost. 0, or a set that needs more: decode
    # every batch (the faces are the same to rounding: half a grey level).
    cache_mb: float = 4096
    prefetch: int = 2  # batches prepared ahead of the training step
    seed: int = 0


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    pretrained: str = ""  # "" (random init) | "imagenet" (torchvision weights) | path to a weights file
    # Side of the network input, pixels (0 = the loader's crop, the paper's 224). Smaller: the model
    # resizes its input first (antialiased), so a quick CPU run sees the whole face at low
    # resolution rather than a small window of it; every user of a checkpoint gets the same.
    input_size: int = 0
    # Fine-tuning: start from another agecl run's weights, a checkpoint file or a single-fold run
    # folder (its checkpoint.pt). The backbone always; the age head class by class by age value
    # (ages the source never had start fresh). See agecl.finetune.
    init_from: str = ""
    # What init_from was when the run started: the source checkpoint's path, sha256, architecture,
    # ages, template and configuration. Filled in by the trainer (config.json, the checkpoint).
    init_source: dict = field(default_factory=dict)
    # Fine-tuning: hold the backbone fixed up to this stage ("stem", "layer1" .. "layer4"; "" trains
    # everything): its weights and BatchNorm statistics stay the source's, and the backward pass
    # stops at the first stage trained, so a step costs less.
    freeze: str = ""


@dataclass
class LossConfig:
    """Weights of Eq. 7: L = L_s + lm*L_m + lv*L_v + lc*L_c + lt*L_t (+ lkl*L_kl, the Eq. 9 ablation)."""

    ce: float = 1.0  # softmax cross-entropy on the anchor
    mean: float = 0.2  # lambda_m, mean loss (Pan et al.)
    variance: float = 0.05  # lambda_v, variance loss (Pan et al.)
    cosine: float = 1.0  # lambda_c, 1 - cos(f_a, f_p)
    triplet: float = 0.0  # lambda_t, margin loss on softmax outputs (0: binary contrast)
    kl: float = 0.0  # KL(s_p || s_a) (the anchor matches the positive), the Eq. 9 ablation alternative to cosine
    margin: float = 0.2  # alpha of Eq. 6, on squared L2 distances between softmax vectors
    # Which images the age terms (ce, mean, variance) supervise: "anchor" (the paper's) or
    # "triplet" (anchors, positives and negatives: their forward passes are paid for anyway).
    supervise: str = "anchor"
    # Age balance of the age terms: each supervised image weighted by (n_a / n)^-balance, n_a the
    # training images of its age and n their mean over the ages present (the weights average 1 over
    # the training set). A small set of mostly children (FG-NET) otherwise teaches its few adults
    # to be young. 0: every image alike (the paper's); 1: every age alike.
    balance: float = 0.0


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    preset: str = ""  # named loss preset applied before overrides (see agecl.losses.PRESETS)
    epochs: int = 100
    lr: float = 1e-3  # Adam
    lr_schedule: str = "constant"  # "constant" (the paper's) | "cosine" (decay to 0 over the run, per step)
    weight_decay: float = 0.0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    precision: str = "auto"  # "auto" (bf16 on CUDA and on CPUs with AMX / AVX512-BF16, else fp32) | "bf16" | "fp32"
    compile: str = "auto"  # "auto" (on for CUDA) | "on" | "off"
    # The test fold's evaluation-time augmentation: "none" | "flip" (the mean of each face's and its
    # mirror's age distributions; agecl.evaluate.predict). agecl-eval and agecl-predict default to it.
    test_tta: str = "none"
    log_every: int = 50  # steps between host syncs for logging
    seed: int = 0
    out: str = ""  # run folder ("" = runs/<name>)
    name: str = ""  # run name ("" = derived from the shard folder, protocol and fold)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, d: dict):
    """Build `cls` from a dict, recursively; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise KeyError(f"unknown {cls.__name__} keys: {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in d.items():
        tp = hints[name]
        kwargs[name] = from_dict(tp, value) if dataclasses.is_dataclass(tp) else value
    return cls(**kwargs)


def _parse(value: str, tp):
    if tp is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    return tp(value)


def apply_overrides(cfg, overrides: list[str]):
    """Apply `a.b=value` strings in place. Unknown keys and unparsable values raise ValueError."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value")
        key, value = item.split("=", 1)
        target = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            if not dataclasses.is_dataclass(target) or not hasattr(target, part):
                raise ValueError(f"override {item!r}: unknown section {part!r}")
            target = getattr(target, part)
        leaf = parts[-1]
        fields = {f.name: f for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else {}
        if leaf not in fields:
            raise ValueError(f"override {item!r}: unknown key {key!r}")
        tp = typing.get_type_hints(type(target))[leaf]
        if dataclasses.is_dataclass(tp):
            raise ValueError(f"override {item!r}: {key!r} is a section, not a value")
        try:
            setattr(target, leaf, _parse(value, tp))
        except ValueError as e:
            raise ValueError(f"override {item!r}: {e}") from e
    return cfg


def describe(cfg) -> str:
    """The config as indented JSON, printed at the start of a run."""
    return json.dumps(to_dict(cfg), indent=2)
