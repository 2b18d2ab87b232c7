"""The checkpoint format: data, not code. One dict saved with torch.save, read with weights_only=True.

    {
      "format": "agecl-checkpoint",           # FORMAT
      "version": 1,                           # VERSION; another version is refused
      "config": to_dict(TrainConfig),         # nested dicts of plain values
      "min_age": int, "max_age": int,         # the head's classes: age = min_age + class index
      "template": {"size": int, "coverage": float, "border": str},   # the aligned face frame of the shards
                                              # (no "border": written before it existed, "reflect")
      "epoch": int,                           # epochs completed
      "step": int,                            # optimizer steps completed
      "model": {name: Tensor},                # state_dict of the plain AgeModel (no _orig_mod./module.)
      "optimizer": dict | None,               # optimizer.state_dict()
      "rng": {"torch": ByteTensor, "cuda": [ByteTensor] | None, "numpy": {...}, "python": {...}},
      "metrics": {str: float | int | ...},    # whatever the trainer logs (best MAE, ...)
      "meta": {"agecl": str, "torch": str},   # versions that wrote it (informative only)
    }

Only tensors, dicts, lists, tuples, str, int, float, bool and None appear anywhere, so
`torch.load(weights_only=True)` reads it and no code is unpickled. `save_checkpoint` checks that
before writing and writes atomically (a killed job leaves the old checkpoint or the new one).
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from agecl import __version__
from agecl.atomic import atomic_path
from agecl.config import TrainConfig, to_dict
from agecl.format import template_border
from agecl.model import AgeModel, strip_prefixes, unwrap

FORMAT = "agecl-checkpoint"
VERSION = 1

REQUIRED_KEYS = ("format", "version", "config", "min_age", "max_age", "template", "epoch", "step", "model")

# Config keys that may differ between a checkpoint and the run resuming it: they control how and
# where the run executes, not what it computes. `epochs` may grow (extend a finished run); the
# shard folder may move between machines (the age range and face template are checked instead);
# device, precision, compile and the loader backend follow the hardware; test_tta scores the test
# fold and trains nothing. Everything else (data
# protocol and fold, augmentation, batch size, model, loss weights, preset, lr, seeds) must match.
# Keys absent from the config are harmless here; a trainer adding a run-control key (e.g.
# `resume`) lists it here or passes it in `ignore`.
RUN_CONTROL_KEYS = frozenset(
    {
        "epochs",
        "out",
        "name",
        "log_every",
        "device",
        "precision",
        "compile",
        "test_tta",
        "resume",
        "data.shards",
        "loader.loader",
        "loader.workers",
        "loader.prefetch",
        "loader.cache_mb",
    }
)


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, of another format or version, or of another configuration."""


# --- Plain-data checks ---------------------------------------------------------------------------


def _plain(obj: Any, where: str) -> Any:
    """`obj` with numpy values made into tensors / Python scalars; TypeError on anything else.

    What comes out is loadable with torch.load(weights_only=True).
    """
    if obj is None or type(obj) in (bool, int, float, str, torch.Tensor):
        return obj
    if isinstance(obj, np.generic):  # np.float64 subclasses float but pickles as a numpy object
        return obj.item()
    # Subclasses pickle as their own class, which weights_only refuses (e.g. torch.__version__ is a
    # TorchVersion, an IntEnum is an int): store the base value.
    for base in (bool, int, float, str):
        if isinstance(obj, base):
            return base(obj)
    if isinstance(obj, torch.Tensor):  # nn.Parameter and other tensor subclasses
        return obj.detach().as_subclass(torch.Tensor)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint {where}: key {k!r} is a {type(k).__name__}, not str or int")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return tuple(items) if isinstance(obj, tuple) else items
    raise TypeError(
        f"checkpoint {where}: {type(obj).__module__}.{type(obj).__name__} is not plain data "
        "(tensors, dicts, lists, str, int, float, bool, None only)"
    )


def model_state(model: nn.Module | Mapping) -> dict[str, torch.Tensor]:
    """The plain module's state_dict: unwraps torch.compile (`_orig_mod`) and DDP (`module`)."""
    if isinstance(model, nn.Module):
        model = unwrap(model).state_dict()
    return strip_prefixes(dict(model))


# --- RNG state -----------------------------------------------------------------------------------


def rng_state() -> dict:
    """Torch (CPU, and CUDA when initialised), numpy and python `random` states as plain data."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),  # ByteTensor
        # Not initialising CUDA just to save its state: a CPU run stores None.
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else None,
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),  # (624,) uint32 values as int64
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": int(py_version), "internal": list(py_internal), "gauss_next": py_gauss},
    }


def set_rng_state(state: Mapping) -> None:
    """Restore what `rng_state` captured. CUDA states are restored when CUDA is available."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


# --- Save / load ---------------------------------------------------------------------------------


def save_checkpoint(
    path: Path | str,
    *,
    config,
    model: nn.Module | Mapping,
    min_age: int,
    max_age: int,
    template: Mapping,
    epoch: int,
    step: int,
    optimizer: torch.optim.Optimizer | Mapping | None = None,
    rng: Mapping | None = None,
    metrics: Mapping | None = None,
) -> dict:
    """Write a checkpoint atomically to `path`; returns the dict written.

    `config` is a TrainConfig (or its `to_dict`); `model` the module (compiled / DDP wrappers are
    unwrapped) or a state_dict; `optimizer` the optimizer or its state_dict; `rng` defaults to
    `rng_state()` now; `template` the shard set's {"size", "coverage"}. Raises TypeError, before
    writing anything, if any part is not plain data.
    """
    if not isinstance(config, Mapping):
        config = to_dict(config)
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.state_dict()
    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        "config": config,
        "min_age": int(min_age),
        "max_age": int(max_age),
        "template": stored_template(template),
        "epoch": int(epoch),
        "step": int(step),
        "model": model_state(model),
        "optimizer": optimizer,
        "rng": rng_state() if rng is None else rng,
        "metrics": dict(metrics or {}),
        "meta": {"agecl": __version__, "torch": str(torch.__version__)},
    }
    ckpt = _plain(ckpt, "")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(ckpt, f)  # through a Python file: a failed write keeps its errno (disk full)
    return ckpt



def drop_optimizer_state(path: Path | str) -> int:
    """Rewrite a finished run's checkpoint without its optimizer state, atomically; returns the
    bytes saved (0 when it had none). Adam's two moments are twice the model's size and only a run
    that trains on needs them: a finished fold of a protocol run never does (its weights still
    serve predict, explain, export and --init-from), and 82 LOPO folds with them take 11 GB."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    if ckpt.get("optimizer") is None:
        return 0
    before = path.stat().st_size
    ckpt.pop("path")  # added on load, not stored
    ckpt["optimizer"] = None
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(ckpt, f)
    return before - path.stat().st_size

def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict:
    """Read and check a checkpoint with `torch.load(weights_only=True)`.

    Raises CheckpointError naming the file when it is missing, unreadable (corrupt, truncated, or
    holding objects other than plain data), not an agecl checkpoint, or of another version. The
    returned dict also carries "path" (str; added on load, not stored).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # a readable pickle that would import code
            raise CheckpointError(
                f"{path}: refused by weights_only loading: it holds objects other than tensors and "
                f"plain values (not written by agecl.checkpoint?) ({e})"
            ) from e
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint (UnpicklingError: {e})") from e
    except Exception as e:  # noqa: BLE001 - zip, EOF, runtime errors: all mean the file is damaged
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        what = f"a dict with keys {sorted(map(str, ckpt))[:6]}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path}: not an agecl checkpoint (no 'format': {FORMAT!r}; found {what}). "
            "Backbone weights go to model.pretrained instead"
        )
    if ckpt.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: agecl checkpoint version {ckpt.get('version')!r}; this agecl reads version {VERSION}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: incomplete agecl checkpoint, missing {', '.join(missing)}")
    ckpt["path"] = str(path)
    return ckpt


def flatten_config(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"model": {"arch": "resnet18"}} -> {"model.arch": "resnet18"}."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v
    return out


_ABSENT = "<absent>"


def stored_template(template: Mapping) -> dict:
    """A face template as a checkpoint stores it: size, coverage, border (the default when absent)."""
    return {"size": int(template["size"]), "coverage": float(template["coverage"]), "border": template_border(template)}


def check_compatible(
    ckpt: Mapping,
    cfg,
    *,
    min_age: int | None = None,
    max_age: int | None = None,
    template: Mapping | None = None,
    ignore: Iterable[str] = (),
) -> None:
    """Refuse to resume from a checkpoint of another configuration.

    Rule: every key of the flattened config (`section.field`) must be equal in the checkpoint and
    in `cfg` (a TrainConfig or its dict), except RUN_CONTROL_KEYS and `ignore`: epochs (a resumed
    run may extend them), out, name, log_every, device, precision, compile, resume, data.shards
    (the folder may move), loader.loader, loader.workers, loader.prefetch, loader.cache_mb. A key the checkpoint
    lacks counts as TrainConfig's default (a field added since it was written: new fields default
    to the old behaviour); any other key present on one side only counts as different. When given,
    the resolved `min_age` / `max_age` (the head's size) and the shard set's face `template` (its
    border "reflect" when it names none) must equal the checkpoint's too.

    Raises CheckpointError naming the file and listing each differing key with both values.
    """
    skip = RUN_CONTROL_KEYS | set(ignore)
    old = flatten_config(ckpt["config"])
    new = flatten_config(cfg if isinstance(cfg, Mapping) else to_dict(cfg))
    defaults = flatten_config(to_dict(TrainConfig()))
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key in skip:
            continue
        a, b = old.get(key, defaults.get(key, _ABSENT)), new.get(key, _ABSENT)
        if a != b:
            diffs.append(f"{key}: checkpoint {a!r}, now {b!r}")
    for key, now in (("min_age", min_age), ("max_age", max_age)):
        if now is not None and int(now) != ckpt[key]:
            diffs.append(f"{key}: checkpoint {ckpt[key]!r}, now {int(now)!r}")
    if template is not None:
        now_t, then_t = stored_template(template), stored_template(ckpt["template"])
        if now_t != then_t:
            diffs.append(f"template: checkpoint {then_t!r}, now {now_t!r}")
    if diffs:
        raise CheckpointError(
            f"{ckpt.get('path', 'checkpoint')}: written by another configuration; differing keys:\n  "
            + "\n  ".join(diffs)
            + "\n(start a new run folder, or set the keys back to the checkpoint's values)"
        )


def info(ckpt: Mapping) -> dict:
    """The checkpoint without the bulky state: config, ages, template, epoch, step, metrics, meta, path."""
    return {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "rng")}


def load_model(path: Path | str, device: str | torch.device = "cpu") -> tuple[AgeModel, dict]:
    """An AgeModel with a checkpoint's weights, on `device`, in eval mode, and `info(ckpt)`.

    For inference (predict, evaluate, export): no pretrained weights are fetched, the head size
    comes from the checkpoint's min_age / max_age, the architecture from its config.
    """
    ckpt = load_checkpoint(path, map_location="cpu")
    model_cfg = ckpt["config"].get("model", {})
    arch = model_cfg.get("arch", "resnet18")
    model = AgeModel(ckpt["min_age"], ckpt["max_age"], arch=arch, pretrained="", input_size=model_cfg.get("input_size", 0))
    try:
        model.load_state_dict(strip_prefixes(ckpt["model"]), strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{ckpt['path']}: model weights do not fit {arch} with ages {ckpt['min_age']}..{ckpt['max_age']}: {e}"
        ) from e
    return model.to(device).eval(), info(ckpt)
