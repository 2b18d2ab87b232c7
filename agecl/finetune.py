"""Fine-tuning: a new run that starts from another agecl run's weights (`agecl-train --init-from`).

    source = load_source("runs/morph-se-fold0", "resnet18")   # the checkpoint, checked
    record = describe(source)                                 # config.json's model.init_source
    report = init_model(model, source)                        # backbone, then the head by age

What is taken: the whole backbone, and the age head class by class by age value. Class j of the
new head is the age min_age + j; where the source's head has that age its row (weights and bias)
is copied, and an age the source never had keeps the new head's fresh initialisation. So a
MORPH model (ages 16-77) fine-tuned on FG-NET (0-69) starts with ages 16-69 known and 0-15 fresh.

What is refused (CheckpointError, naming the file and the reason): a missing file, a file that
is not an agecl checkpoint (a torchvision state_dict belongs in model.pretrained), a checkpoint of
another architecture, and a run folder of every fold (`--all-folds` writes fold-<k>/ folders): it
holds one model a fold and which one to start from is the user's choice, so name one fold's
checkpoint.pt. A run of `--all-folds` with --init-from starts every fold from that one checkpoint.

A fine-tuned model can also be moved back part of the way towards its source, weight by weight
(WiSE-FT, Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022): `blend_with_source`,
`agecl-eval --wise-ft W`. The source is the one the run recorded (path, checked by sha256).
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import torch

from agecl.checkpoint import CheckpointError, load_checkpoint, stored_template
from agecl.model import AgeModel, strip_prefixes

CHECKPOINT_FILE = "checkpoint.pt"  # a run folder's checkpoint (agecl.train writes it)


def resolve_path(init_from: str) -> Path:
    """The checkpoint file that `init_from` names: the file itself, or a run folder's checkpoint.pt."""
    path = Path(init_from)
    if not path.is_dir():
        return path  # a file, or nothing (load_checkpoint says "no such checkpoint file")
    if (path / CHECKPOINT_FILE).is_file():
        return path / CHECKPOINT_FILE
    folds = sorted((p for p in path.glob("fold-*") if (p / CHECKPOINT_FILE).is_file()), key=lambda p: p.name)
    if folds:
        raise CheckpointError(
            f"{path}: a run of every fold ({len(folds)} fold folders, one model each); name the checkpoint to "
            f"start from, e.g. {folds[0] / CHECKPOINT_FILE}"
        )
    raise CheckpointError(f"{path}: a folder without {CHECKPOINT_FILE} (not a run folder of agecl-train)")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_weights(state: dict[str, torch.Tensor]) -> str:
    """The sha256 of a model's weights alone: every tensor's name, dtype, shape and bytes, by name.

    The checkpoint file's own sha256 also covers what varies between two trainings of the same
    weights (each epoch's images/sec and wall time), so a model rebuilt bit for bit on another day
    has a new file sha256 and this same one."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_source(init_from: str, arch: str) -> dict:
    """The source checkpoint of `init_from`, checked to fit a model of `arch`; it also carries
    "sha256" (of the file) and "weights_sha256" (of its model's weights, `sha256_weights`).
    Raises CheckpointError naming the file and the reason."""
    path = resolve_path(init_from)
    ckpt = load_checkpoint(path, map_location="cpu")  # refuses a missing, corrupt or foreign file
    source_arch = ckpt["config"].get("model", {}).get("arch", "resnet18")
    if source_arch != arch:
        raise CheckpointError(
            f"{path}: a {source_arch} model; this run's is {arch}. Fine-tuning keeps the architecture: "
            f"add --arch {source_arch}"
        )
    state = strip_prefixes(ckpt["model"])
    if "head.weight" not in state or "head.bias" not in state:
        raise CheckpointError(f"{path}: its model has no age head (head.weight, head.bias)")
    ckpt["sha256"] = sha256_file(path)
    ckpt["weights_sha256"] = sha256_weights(state)
    return ckpt


def describe(source: dict) -> dict:
    """What a run records of its source (config.json's model.init_source): enough to find the file
    again and to know it is the same one (sha256: the file; weights_sha256: its weights, the same for
    a model rebuilt bit for bit), and how it was trained."""
    return {
        "path": str(Path(source["path"]).resolve()),
        "sha256": source["sha256"],
        "weights_sha256": source["weights_sha256"],
        "arch": source["config"].get("model", {}).get("arch", "resnet18"),
        "min_age": int(source["min_age"]),
        "max_age": int(source["max_age"]),
        "epoch": int(source["epoch"]),
        "template": dict(source["template"]),
        "config": source["config"],
    }


def frame_mismatch(source: dict, template: dict) -> str | None:
    """A warning when the source was trained on faces framed otherwise than this run's shard set
    (another size, coverage or border), else None. Not an error: fine-tuning across frames may be
    meant, but a model learns its frame (on AAF val a 1.4 frame scored 0.65 years worse than 1.0)."""
    theirs, ours = stored_template(source["template"]), stored_template(template)
    differ = [f"{k} {theirs[k]} there, {ours[k]} here" for k in ("size", "coverage", "border") if theirs[k] != ours[k]]
    if not differ:
        return None
    return (f"warning: {source['path']} was trained on faces framed otherwise than this shard set's "
            f"({'; '.join(differ)}): build the shards with the source's make_shards.py --coverage/--border")


def init_model(model: AgeModel, source: dict) -> str:
    """Load the source's backbone into `model` and its head rows of the ages both heads have.
    Returns a one-line report. Raises CheckpointError when the weights do not fit."""
    state = strip_prefixes(source["model"])
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    try:
        model.backbone.load_state_dict(backbone, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source['path']}: its backbone does not fit this run's {model.arch}: {e}") from e
    weight, bias = state["head.weight"], state["head.bias"]  # (A_source, D), (A_source,)
    if weight.shape[1] != model.head.weight.shape[1]:
        raise CheckpointError(
            f"{source['path']}: its head takes {weight.shape[1]}-d features, this run's {model.head.weight.shape[1]}-d"
        )
    src_min, src_max = int(source["min_age"]), int(source["min_age"]) + weight.shape[0] - 1
    lo, hi = max(model.min_age, src_min), min(model.max_age, src_max)  # the ages both heads have
    with torch.no_grad():
        if lo <= hi:
            new, old = slice(lo - model.min_age, hi - model.min_age + 1), slice(lo - src_min, hi - src_min + 1)
            model.head.weight[new] = weight[old].to(model.head.weight.dtype)
            model.head.bias[new] = bias[old].to(model.head.bias.dtype)
    shared = f"ages {lo}-{hi} from its head" if lo <= hi else "no age in common with its head"
    fresh = model.num_classes - max(0, hi - lo + 1)
    return (f"init from {source['path']} ({src_min}-{src_max}, epoch {source['epoch']}): backbone, {shared}, "
            f"{fresh} of {model.num_classes} age classes fresh")


def recorded_source(config: dict, arch: str, path: str | None = None) -> dict:
    """The checkpoint a fine-tuned run started from, as its config recorded it (model.init_source),
    loaded and checked to be that very file (sha256) or the same weights (weights_sha256, where the
    run recorded it: a source rebuilt bit for bit); `path` names it where it has moved.
    Raises CheckpointError naming the file and the reason."""
    recorded = config.get("model", {}).get("init_source") or {}
    if not recorded and path is None:
        raise CheckpointError("the model was not fine-tuned from another agecl run (no model.init_source): "
                              "there is no source to blend with")
    source = load_source(path or recorded["path"], arch)
    same_weights = recorded.get("weights_sha256") == source["weights_sha256"]
    if recorded and source["sha256"] != recorded["sha256"] and not same_weights:
        raise CheckpointError(
            f"{source['path']}: not the checkpoint the run started from (sha256 {source['sha256'][:12]}..., "
            f"recorded {recorded['sha256'][:12]}...)"
        )
    return source


def blend_with_source(model: AgeModel, source: dict, weight: float) -> str:
    """WiSE-FT: every weight and BatchNorm statistic of the fine-tuned `model` becomes
    weight * fine-tuned + (1 - weight) * source, in place (weight 1: the model as fine-tuned, 0:
    the source). The source's head is mapped by age value as `init_model` maps it, so the head rows
    of ages the source never had stay as fine-tuned. Returns a one-line report."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"wise-ft weight {weight}: expected a number from 0 (the source) to 1 (as fine-tuned)")
    anchor = copy.deepcopy(model)  # the fine-tuned model with the source's weights laid over it
    report = init_model(anchor, source)
    sources = anchor.state_dict()
    with torch.no_grad():
        for name, value in model.state_dict().items():  # tensors that share the model's storage
            if value.is_floating_point():  # not BatchNorm's num_batches_tracked
                value.lerp_(sources[name].to(value.dtype), 1.0 - weight)
    return f"wise-ft {weight:g}: {weight:g} x fine-tuned + {1 - weight:g} x source ({report})"
