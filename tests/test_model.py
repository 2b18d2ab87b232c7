"""AgeModel (shapes, expected age, pretrained weights) and the checkpoint format (round trip, errors)."""

from __future__ import annotations

import random
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from agecl import checkpoint as ckpt_mod
from agecl.checkpoint import (
    CheckpointError,
    check_compatible,
    drop_optimizer_state,
    load_checkpoint,
    load_model,
    model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from agecl.config import TrainConfig, from_dict
from agecl.model import AgeModel, PretrainedError, build_model, strip_prefixes

MIN_AGE, MAX_AGE = 16, 77  # MORPH II's range: A = 62 classes
A = MAX_AGE - MIN_AGE + 1
TEMPLATE = {"size": 256, "coverage": 1.4}


@pytest.fixture(scope="module")
def model() -> AgeModel:
    torch.manual_seed(0)
    return AgeModel(MIN_AGE, MAX_AGE).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (B, 3, H, W)


# --- the model -----------------------------------------------------------------------------------


def test_forward_shapes(model, x):
    f, logits = model(x)
    assert f.shape == (2, 512) and logits.shape == (2, A)
    assert model.num_classes == A and model.feature_dim == 512


def test_forward_channels_last_and_bf16_autocast(model, x):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        f, logits = model(x.contiguous(memory_format=torch.channels_last))
        ages = model.expected_age(logits)
    assert f.shape == (2, 512) and logits.shape == (2, A)
    assert ages.dtype == torch.float32 and torch.isfinite(ages).all()


def test_expected_age_by_hand(model):
    # uniform over the A classes: mean index (A-1)/2 = 30.5 -> age 16 + 30.5 = 46.5, not rounded
    logits = torch.zeros(1, A)
    assert model.expected_age(logits).item() == pytest.approx(46.5, abs=1e-4)
    # all the mass on classes 0 and 1: mean 0.5 -> 16.5 years; std 0.5
    logits = torch.full((1, A), -1e4)
    logits[0, :2] = 0.0
    assert model.expected_age(logits).item() == pytest.approx(16.5, abs=1e-5)
    assert model.age_std(logits).item() == pytest.approx(0.5, abs=1e-5)


def test_expected_age_stays_in_range(model, x):
    g = torch.Generator().manual_seed(3)
    logits = torch.cat([torch.randn(64, A, generator=g) * 50, torch.eye(A) * 1e4, -torch.eye(A) * 1e4])
    ages = model.expected_age(logits)
    assert ages.shape == (64 + 2 * A,) and ages.dtype == torch.float32
    assert (ages >= MIN_AGE).all() and (ages <= MAX_AGE).all()
    assert ages[64] == pytest.approx(MIN_AGE) and ages[64 + A - 1] == pytest.approx(MAX_AGE)
    with torch.no_grad():
        pred = model.predict(x)
    assert pred.shape == (2,) and ((pred >= MIN_AGE) & (pred <= MAX_AGE)).all()
    assert (model.age_std(logits) >= 0).all()


def test_bad_construction():
    with pytest.raises(ValueError, match="unknown arch"):
        AgeModel(0, 10, arch="vgg16")
    with pytest.raises(ValueError, match="min_age"):
        AgeModel(30, 20)


def test_freeze_holds_the_stages_up_to_it_and_stops_the_backward_there():
    torch.manual_seed(0)
    m = AgeModel(0, 9, freeze="layer2").train()
    frozen = [m.backbone.conv1, m.backbone.bn1, m.backbone.layer1, m.backbone.layer2]
    assert m.frozen_modules() == frozen
    assert all(not p.requires_grad for f in frozen for p in f.parameters())
    assert all(p.requires_grad for name, p in m.named_parameters() if name.startswith(("backbone.layer3", "backbone.layer4", "head")))
    # train() keeps the frozen stages' BatchNorm in eval mode (their statistics are the source's).
    assert not any(mod.training for f in frozen for mod in f.modules())
    assert m.backbone.layer3.training and m.head.training
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    f, logits = m(x)
    (f.sum() + logits.sum()).backward()
    assert all(p.grad is None for f in frozen for p in f.parameters())  # nothing computed for them
    assert all(p.grad is not None for p in m.backbone.layer3.parameters())
    after = m.state_dict()
    for key in before:
        if key.startswith(("backbone.conv1", "backbone.bn1", "backbone.layer1", "backbone.layer2")):
            assert torch.equal(before[key], after[key]), key  # running statistics too
    assert not torch.equal(before["backbone.layer3.0.bn1.running_mean"], after["backbone.layer3.0.bn1.running_mean"])
    with pytest.raises(ValueError, match="freeze 'layer5'"):
        AgeModel(0, 9, freeze="layer5")


def test_build_model_from_config():
    cfg = TrainConfig()
    m = build_model(cfg, 0, 69)  # FG-NET's range
    assert m.num_classes == 70 and m.arch == "resnet18"


def _resnet18_file(tmp_path, name="r18.pth"):
    torch.manual_seed(123)
    ref = torchvision.models.resnet18()  # random weights standing in for ImageNet's
    path = tmp_path / name
    torch.save(ref.state_dict(), path)
    return path, ref.state_dict()


def test_pretrained_from_a_local_file(tmp_path):
    path, ref = _resnet18_file(tmp_path)
    m = AgeModel(MIN_AGE, MAX_AGE, pretrained=str(path))
    own = m.backbone.state_dict()
    for key, value in ref.items():
        if key.startswith("fc."):
            assert key not in own  # the ImageNet classifier is dropped, our head replaces it
        else:
            assert torch.equal(own[key], value), key  # weights and BN statistics loaded
    assert m.head.weight.shape == (A, 512)


def test_pretrained_file_with_mismatched_keys(tmp_path):
    _, ref = _resnet18_file(tmp_path)
    bad = dict(ref)
    bad["layer1.0.convX.weight"] = bad.pop("layer1.0.conv1.weight")
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(PretrainedError) as e:
        AgeModel(MIN_AGE, MAX_AGE, pretrained=str(path))
    msg = str(e.value)
    assert str(path) in msg and "missing keys: layer1.0.conv1.weight" in msg
    assert "unexpected keys: layer1.0.convX.weight" in msg


def test_pretrained_file_of_another_arch_reports_shapes(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(PretrainedError, match="shape mismatches: .*file"):
        AgeModel(MIN_AGE, MAX_AGE, pretrained=str(path))


def test_pretrained_missing_or_corrupt_file(tmp_path):
    with pytest.raises(PretrainedError, match="no such weights file"):
        AgeModel(MIN_AGE, MAX_AGE, pretrained=str(tmp_path / "absent.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(PretrainedError, match="junk.pth: not a loadable weights file"):
        AgeModel(MIN_AGE, MAX_AGE, pretrained=str(junk))


def test_imagenet_offline_error_says_to_pass_a_path(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(PretrainedError, match="model.pretrained=/path/to/resnet18-f37072fd.pth"):
        AgeModel(MIN_AGE, MAX_AGE, pretrained="imagenet")


def test_strip_prefixes():
    sd = {"_orig_mod.head.bias": 1, "module._orig_mod.backbone.conv1.weight": 2, "head.weight": 3}
    assert strip_prefixes(sd) == {"head.bias": 1, "backbone.conv1.weight": 2, "head.weight": 3}


# --- the checkpoint ------------------------------------------------------------------------------


def _save(path, model, cfg=None, **kw):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    parts = dict(
        config=cfg or TrainConfig(),
        model=model,
        min_age=MIN_AGE,
        max_age=MAX_AGE,
        template=TEMPLATE,
        epoch=3,
        step=120,
        optimizer=opt,
        metrics={"val_mae": np.float64(4.25), "best_epoch": 2},
    )
    parts.update(kw)
    return save_checkpoint(path, **parts)


class _Compiled(nn.Module):
    """Stands in for torch.compile's wrapper: the real module under `_orig_mod`."""

    def __init__(self, inner):
        super().__init__()
        self._orig_mod = inner


def test_round_trip(tmp_path, model, x):
    cfg = TrainConfig(preset="paper-morph-ternary", epochs=7)
    # one optimizer step so the optimizer has state (exp_avg, step) to round-trip; the head's
    # parameters only, to keep the file (and the test) small
    m = AgeModel(MIN_AGE, MAX_AGE)
    opt = torch.optim.Adam(m.head.parameters(), lr=1e-3)
    with torch.no_grad():
        f = m.backbone(x)
    m.head(f).sum().backward()
    opt.step()
    path = tmp_path / "run" / "last.pt"
    save_checkpoint(path, config=cfg, model=_Compiled(m), min_age=MIN_AGE, max_age=MAX_AGE, template=TEMPLATE,
                    epoch=3, step=120, optimizer=opt, metrics={"val_mae": np.float64(4.25)})
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # atomic: no temp file left

    ck = load_checkpoint(path)
    assert ck["format"] == "agecl-checkpoint" and ck["version"] == 1 and ck["path"] == str(path)
    assert from_dict(TrainConfig, ck["config"]) == cfg
    assert (ck["min_age"], ck["max_age"], ck["epoch"], ck["step"]) == (MIN_AGE, MAX_AGE, 3, 120)
    assert ck["template"] == {**TEMPLATE, "border": "reflect"} and ck["metrics"] == {"val_mae": 4.25}
    assert type(ck["metrics"]["val_mae"]) is float
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ck["model"])
    for key, value in m.state_dict().items():
        assert torch.equal(ck["model"][key], value), key

    opt2 = torch.optim.Adam(AgeModel(MIN_AGE, MAX_AGE).head.parameters(), lr=1e-3)
    opt2.load_state_dict(ck["optimizer"])
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert torch.equal(s1[0]["exp_avg"], s2[0]["exp_avg"]) and s2[0]["step"] == s1[0]["step"]

    # plain data only: a bare weights_only load reads it
    raw = torch.load(path, weights_only=True)
    assert raw["config"] == ck["config"]

    # A finished run's checkpoint without the optimizer state: smaller, everything else equal.
    size = path.stat().st_size
    assert drop_optimizer_state(path) == size - path.stat().st_size > 0
    slim = load_checkpoint(path)
    assert slim["optimizer"] is None and slim["config"] == ck["config"] and slim["epoch"] == 3
    for key, value in m.state_dict().items():
        assert torch.equal(slim["model"][key], value), key
    assert drop_optimizer_state(path) == 0  # nothing left to drop
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_load_model_for_inference(tmp_path, model, x):
    path = tmp_path / "m.pt"
    _save(path, model)
    loaded, info = load_model(path)
    assert not loaded.training
    assert set(info) >= {"config", "min_age", "max_age", "template", "epoch", "metrics"}
    assert "model" not in info and "optimizer" not in info
    with torch.no_grad():
        assert torch.allclose(loaded.predict(x), model.predict(x), atol=1e-5)


def test_overwrite_and_failed_save_keep_the_old_file(tmp_path, model):
    path = tmp_path / "last.pt"
    _save(path, model, epoch=1)
    _save(path, model, epoch=2)
    assert load_checkpoint(path)["epoch"] == 2
    with pytest.raises(TypeError, match="metrics.bad"):
        _save(path, model, epoch=3, metrics={"bad": object()})  # refused before writing
    assert load_checkpoint(path)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_missing_corrupt_and_truncated_files(tmp_path, model):
    with pytest.raises(CheckpointError, match="absent.pt: no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="junk.pt: corrupt or truncated"):
        load_checkpoint(junk)
    good = tmp_path / "good.pt"
    _save(good, model)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a run killed mid-copy
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(cut)


def test_not_an_agecl_checkpoint_or_another_version(tmp_path, model):
    sd = tmp_path / "weights.pt"
    torch.save(model.state_dict(), sd)
    with pytest.raises(CheckpointError, match="weights.pt: not an agecl checkpoint"):
        load_checkpoint(sd)
    v2 = tmp_path / "v2.pt"
    torch.save({"format": "agecl-checkpoint", "version": 2}, v2)
    with pytest.raises(CheckpointError, match="v2.pt: agecl checkpoint version 2"):
        load_checkpoint(v2)
    pickled = tmp_path / "code.pt"
    torch.save({"format": "agecl-checkpoint", "config": TrainConfig()}, pickled)  # a dataclass: code
    with pytest.raises(CheckpointError, match="code.pt: refused by weights_only"):
        load_checkpoint(pickled)


def test_check_compatible_rule(tmp_path, model):
    cfg = TrainConfig(preset="paper-morph-binary")
    path = tmp_path / "c.pt"
    _save(path, model, cfg=cfg)
    ck = load_checkpoint(path)
    # run-control keys may differ: more epochs, another folder, device, precision, shard location
    same = TrainConfig(preset="paper-morph-binary", epochs=200, out="elsewhere", device="cpu", compile="off",
                       precision="fp32", log_every=1)
    same.data.shards = "/moved/shards"
    same.loader.workers = 8
    check_compatible(ck, same, min_age=MIN_AGE, max_age=MAX_AGE, template=TEMPLATE)

    other = TrainConfig(preset="paper-morph-binary")
    other.loss.cosine = 1.0
    other.data.fold = 2
    with pytest.raises(CheckpointError) as e:
        check_compatible(ck, other)
    msg = str(e.value)
    assert str(path) in msg
    assert "loss.cosine: checkpoint 1.0" not in msg  # both are 1.0 by default: not a difference
    assert "data.fold: checkpoint 0, now 2" in msg

    other = TrainConfig(preset="paper-morph-binary")
    other.loss.cosine = 10.0
    with pytest.raises(CheckpointError, match=r"loss.cosine: checkpoint 1.0, now 10.0"):
        check_compatible(ck, other)
    check_compatible(ck, other, ignore=["loss.cosine"])  # an explicit escape hatch

    with pytest.raises(CheckpointError, match="max_age: checkpoint 77, now 69"):
        check_compatible(ck, cfg, max_age=69)
    with pytest.raises(CheckpointError, match="template"):
        check_compatible(ck, cfg, template={"size": 256, "coverage": 1.0})
    # a key the checkpoint's config lacks (a config from another agecl) counts as different
    newer = ckpt_mod.to_dict(cfg)
    newer["model"]["dropout"] = 0.1
    with pytest.raises(CheckpointError, match="model.dropout: checkpoint '<absent>', now 0.1"):
        check_compatible(ck, newer)
    # a checkpoint written before a field existed: it ran with that field's default
    older = {**ck, "config": ckpt_mod.to_dict(cfg), "template": {"size": 256, "coverage": 1.4}}
    del older["config"]["lr_schedule"], older["config"]["model"]["init_from"]
    check_compatible(older, cfg, template={**TEMPLATE, "border": "reflect"})
    cfg.lr_schedule = "cosine"
    with pytest.raises(CheckpointError, match="lr_schedule: checkpoint 'constant', now 'cosine'"):
        check_compatible(older, cfg)
    # the border of the face template: absent means reflect; another border is another input
    assert ck["template"]["border"] == "reflect"
    with pytest.raises(CheckpointError, match="'border': 'reflect'}, now .*'border': 'constant'}"):
        check_compatible(older, cfg, template={**TEMPLATE, "border": "constant"}, ignore=["lr_schedule"])


def test_rng_state_round_trips_through_a_checkpoint(tmp_path, model):
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    path = tmp_path / "r.pt"
    _save(path, model, rng=rng_state())
    draws = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.standard_normal())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    set_rng_state(load_checkpoint(path)["rng"])
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.standard_normal())
    assert torch.equal(draws[0], again[0])
    assert np.array_equal(draws[1], again[1]) and draws[2] == again[2] and draws[3] == again[3]


def test_model_state_unwraps_wrappers(model):
    sd = model_state(_Compiled(_Compiled(model)))
    assert set(sd) == set(model.state_dict())
    prefixed = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    assert set(model_state(prefixed)) == set(model.state_dict())


def test_pretrained_from_an_agecl_checkpoint(tmp_path, model):
    # fine-tuning (e.g. MORPH -> FG-NET): the backbone comes from a checkpoint, the head is fresh
    path = tmp_path / "morph.pt"
    _save(path, model)
    m = AgeModel(0, 69, pretrained=str(path))
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(m.backbone.state_dict()[key], value), key
    assert m.head.weight.shape == (70, 512)


def test_input_size_resizes_inside_the_model_and_survives_a_checkpoint(tmp_path):
    """A model trained at input_size S takes the loader's larger crop and resizes it itself, so
    evaluation, prediction and export feed it the same crops as training did."""
    from agecl.checkpoint import load_model, save_checkpoint
    from agecl.config import TrainConfig

    torch.manual_seed(0)
    model = AgeModel(0, 9, input_size=32).eval()
    crops = torch.randn(2, 3, 64, 64)
    small = torch.nn.functional.interpolate(crops, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        assert torch.allclose(model(crops)[1], model(small)[1], atol=1e-5)
    cfg = TrainConfig()
    cfg.model.input_size = 32
    path = tmp_path / "c.pt"
    save_checkpoint(path, config=cfg, model=model, min_age=0, max_age=9, template={"size": 256, "coverage": 1.4}, epoch=1, step=1)
    loaded, _ = load_model(path)
    assert loaded.input_size == 32
    with torch.no_grad():
        assert torch.equal(loaded(crops)[1], model(crops)[1])
