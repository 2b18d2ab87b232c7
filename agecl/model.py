"""ResNet backbone + age head: `f = R(x)`, `logits = FC(f)`, `s = softmax(logits)` (paper, Sec. 3).

The backbone is a torchvision ResNet with its last FC layer removed, so `f` is the pooled feature
(512-d for ResNet-18/34). The head is a fresh linear layer to A = max_age - min_age + 1 classes;
class j is the age min_age + j. The prediction is the expected age min_age + sum_j j * s_j, not
rounded (the paper's Eq. 8 reading).

The forward pass has no Python branch on tensor values: the trainer compiles it and runs it under
bf16 autocast with channels_last inputs. Inputs are RGB crops normalised with ImageNet's mean and
std (the loader's job; `IMAGENET_MEAN` / `IMAGENET_STD` are the values on the 0..1 scale).
"""

from __future__ import annotations

import urllib.error
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, 0..1 scale: what torchvision's weights were trained on
IMAGENET_STD = (0.229, 0.224, 0.225)

# Architectures whose torchvision constructor and ImageNet weights we know. ResNet-18 is the
# paper's; ResNet-50 is what Paplham & Franc's re-evaluation used.
ARCHS = {
    "resnet18": torchvision.models.ResNet18_Weights,
    "resnet34": torchvision.models.ResNet34_Weights,
    "resnet50": torchvision.models.ResNet50_Weights,
    "resnet101": torchvision.models.ResNet101_Weights,
}


# The backbone's stages in order, as `ModelConfig.freeze` names them: freezing one freezes it and
# every stage before it.
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


class PretrainedError(RuntimeError):
    """Backbone weights could not be obtained or do not fit the architecture."""


class AgeModel(nn.Module):
    """ResNet backbone + linear age head. `forward(x) -> (features (B, D), logits (B, A))`."""

    def __init__(
        self, min_age: int, max_age: int, arch: str = "resnet18", pretrained: str = "", input_size: int = 0, freeze: str = ""
    ):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r} (known: {', '.join(ARCHS)})")
        if freeze not in ("", *STAGES):
            raise ValueError(f"freeze {freeze!r}: expected one of {', '.join(STAGES)} (or nothing)")
        if not (0 <= int(min_age) <= int(max_age)):
            raise ValueError(f"need 0 <= min_age <= max_age, got min_age={min_age}, max_age={max_age}")
        self.arch = arch
        self.min_age = int(min_age)
        self.max_age = int(max_age)
        self.num_classes = self.max_age - self.min_age + 1
        self.input_size = int(input_size)  # 0: the input is used at the size it comes

        backbone = torchvision.models.get_model(arch, weights=None)
        self.feature_dim = backbone.fc.in_features  # 512 for resnet18/34, 2048 for resnet50/101
        if pretrained:
            load_backbone_weights(backbone, pretrained, arch)
        # Drop the ImageNet classifier: the backbone then returns the pooled feature f.
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.head = nn.Linear(self.feature_dim, self.num_classes)
        # (A,) class indices 0..A-1 as floats, for the expected value. Not persistent: it is
        # derived from (min_age, max_age), which the checkpoint stores as plain values.
        self.register_buffer("class_index", torch.arange(self.num_classes, dtype=torch.float32), persistent=False)
        # Fine-tuning: the stages up to `freeze` keep their weights and BatchNorm statistics. Nothing
        # before the first trained stage needs a gradient, so autograd records none of it: the
        # backward pass stops there.
        self.freeze = freeze
        for module in self.frozen_modules():
            module.requires_grad_(False)

    def frozen_modules(self) -> list[nn.Module]:
        """The backbone's modules that `freeze` holds fixed, from the stem to that stage."""
        if not self.freeze:
            return []
        b = self.backbone
        stages = {"stem": [b.conv1, b.bn1], "layer1": [b.layer1], "layer2": [b.layer2], "layer3": [b.layer3], "layer4": [b.layer4]}
        return [m for stage in STAGES[: STAGES.index(self.freeze) + 1] for m in stages[stage]]

    def train(self, mode: bool = True) -> "AgeModel":
        super().train(mode)
        for module in self.frozen_modules():  # frozen BatchNorm statistics too: the source's
            module.train(False)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.input_size and x.shape[-1] != self.input_size:
            # A shape test, fixed at trace time: no data-dependent branch under torch.compile.
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True, align_corners=False)
        f = self.backbone(x)  # (B, D)
        return f, self.head(f)  # (B, D), (B, A)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, A) float32 softmax; computed in float32 even when the logits are bf16."""
        return F.softmax(logits.float(), dim=-1)

    def expected_age(self, logits: torch.Tensor) -> torch.Tensor:
        """(B,) float32 expected age min_age + sum_j j * s_j, not rounded."""
        # Elementwise product and sum, not `@`: autocast would run a matmul in bf16.
        return self.min_age + (self.probabilities(logits) * self.class_index).sum(-1)

    def age_std(self, logits: torch.Tensor) -> torch.Tensor:
        """(B,) float32 standard deviation of the predicted age distribution, years."""
        s = self.probabilities(logits)  # (B, A)
        m = (s * self.class_index).sum(-1)  # (B,)
        var = (s * (self.class_index - m[:, None]) ** 2).sum(-1)
        return var.clamp_min(0).sqrt()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) float32 expected ages of a batch of normalised crops."""
        return self.expected_age(self.forward(x)[1])


def build_model(cfg, min_age: int, max_age: int) -> AgeModel:
    """An `AgeModel` from a `TrainConfig` (or a `ModelConfig`) and the resolved age range."""
    mcfg = getattr(cfg, "model", cfg)
    return AgeModel(min_age, max_age, arch=mcfg.arch, pretrained=mcfg.pretrained, input_size=mcfg.input_size,
                    freeze=mcfg.freeze)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile (`_orig_mod`) and DDP / DataParallel (`module`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def strip_prefixes(state: dict) -> dict:
    """Remove the `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes from state_dict keys."""
    out = {}
    for key, value in state.items():
        while True:
            for prefix in ("_orig_mod.", "module."):
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    break
            else:
                break
        out[key] = value
    return out


def _imagenet_state_dict(arch: str) -> dict:
    weights = ARCHS[arch].IMAGENET1K_V1  # the paper's era weights (resnet18: resnet18-f37072fd.pth)
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        # Looks in the hub cache first; downloads only when the file is not there.
        return torch.hub.load_state_dict_from_url(
            weights.url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except (urllib.error.URLError, OSError, RuntimeError, ValueError) as e:
        name = weights.url.rsplit("/", 1)[-1]
        raise PretrainedError(
            f"could not get torchvision's ImageNet {arch} weights ({type(e).__name__}: {e}). "
            f"Offline? Download {weights.url} on a machine with network and either put it in {hub}/{name} "
            f"or pass its path: model.pretrained=/path/to/{name}"
        ) from e


def _file_state_dict(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise PretrainedError(
            f"{p}: no such weights file (model.pretrained takes '', 'imagenet' or a path to a torchvision state_dict)"
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is reported with the file name
        raise PretrainedError(f"{p}: not a loadable weights file ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict) and obj.get("format") == "agecl-checkpoint":
        # An agecl checkpoint (e.g. a MORPH model to fine-tune on FG-NET): take its backbone.
        obj = {k[len("backbone.") :]: v for k, v in strip_prefixes(obj["model"]).items() if k.startswith("backbone.")}
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedError(f"{p}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
    return strip_prefixes(obj)


def load_backbone_weights(backbone: nn.Module, pretrained: str, arch: str = "resnet18") -> None:
    """Load 'imagenet' or a weights file into a torchvision ResNet in place; `fc.*` keys are ignored.

    Missing or unexpected keys and shape mismatches raise `PretrainedError` listing them.
    """
    if pretrained == "imagenet":
        source, state = f"torchvision ImageNet {arch} weights", _imagenet_state_dict(arch)
    else:
        source, state = str(pretrained), _file_state_dict(pretrained)
    # Our head replaces fc (A age classes, not 1000 ImageNet classes).
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = {k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)}, {arch} {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )

    def _few(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_few(shapes)}")
    if problems:
        raise PretrainedError(
            f"{source}: does not fit a torchvision {arch} backbone; " + "; ".join(problems)
            + f". Expected a state_dict of torchvision.models.{arch}() saved with torch.save"
        )
    backbone.load_state_dict(state, strict=False)  # strict=False only because fc.* was dropped
