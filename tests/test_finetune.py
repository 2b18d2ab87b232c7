"""Fine-tuning from an agecl checkpoint (agecl.finetune): which file a run folder means, the head
mapped class by class by age, refusals naming the file. The trainer's side is in test_train.py."""

import hashlib

import pytest
import torch

from agecl.checkpoint import CheckpointError, save_checkpoint
from agecl.config import TrainConfig, to_dict
from agecl.finetune import (blend_with_source, describe, init_model, load_source, recorded_source, resolve_path,
                             sha256_weights)
from agecl.model import AgeModel

TEMPLATE = {"size": 256, "coverage": 1.4, "border": "constant"}


def _source(path, min_age=10, max_age=20, arch="resnet18"):
    cfg = TrainConfig()
    cfg.model.arch = arch
    torch.manual_seed(1)
    model = AgeModel(min_age, max_age, arch=arch)
    save_checkpoint(path, config=cfg, model=model, min_age=min_age, max_age=max_age, template=TEMPLATE, epoch=4, step=40)
    return model


def test_head_is_mapped_class_by_class_by_age(tmp_path):
    src = _source(tmp_path / "checkpoint.pt")  # ages 10..20
    source = load_source(str(tmp_path), "resnet18")  # a run folder means its checkpoint.pt
    torch.manual_seed(2)
    model = AgeModel(5, 15)  # ages 5..15: 10..15 known to the source, 5..9 new
    fresh = model.head.weight.detach().clone(), model.head.bias.detach().clone()
    report = init_model(model, source)
    assert "ages 10-15 from its head" in report and "5 of 11 age classes fresh" in report
    for key, value in src.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    for age in range(5, 16):
        j = age - 5
        want_w, want_b = (src.head.weight[age - 10], src.head.bias[age - 10]) if age >= 10 else (fresh[0][j], fresh[1][j])
        assert torch.equal(model.head.weight[j], want_w) and torch.equal(model.head.bias[j], want_b), age

    # No age in common: the backbone only.
    torch.manual_seed(3)
    far = AgeModel(40, 45)
    before = far.head.weight.detach().clone()
    assert "no age in common" in init_model(far, source)
    assert torch.equal(far.head.weight, before)

    record = describe(source)
    assert record["path"] == str((tmp_path / "checkpoint.pt").resolve())
    assert record["sha256"] == hashlib.sha256((tmp_path / "checkpoint.pt").read_bytes()).hexdigest()
    assert record["weights_sha256"] == sha256_weights(src.state_dict())
    assert (record["arch"], record["min_age"], record["max_age"], record["epoch"]) == ("resnet18", 10, 20, 4)
    assert record["template"] == TEMPLATE and record["config"]["model"]["arch"] == "resnet18"


def test_foreign_files_other_architectures_and_fold_folders_are_refused(tmp_path):
    _source(tmp_path / "r34.pt", arch="resnet34")
    with pytest.raises(CheckpointError, match=r"r34.pt: a resnet34 model; this run's is resnet18.*--arch resnet34"):
        load_source(str(tmp_path / "r34.pt"), "resnet18")
    weights = tmp_path / "resnet18.pth"  # a torchvision state_dict: backbone weights, not a run
    torch.save(AgeModel(0, 1).backbone.state_dict(), weights)
    with pytest.raises(CheckpointError, match=r"resnet18.pth: not an agecl checkpoint.*model.pretrained"):
        load_source(str(weights), "resnet18")
    with pytest.raises(CheckpointError, match=r"absent.pt: no such checkpoint file"):
        load_source(str(tmp_path / "absent.pt"), "resnet18")
    runs = tmp_path / "all-folds"
    for k in range(3):
        (runs / f"fold-{k}").mkdir(parents=True)
        (runs / f"fold-{k}" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"all-folds: a run of every fold \(3 fold folders.*fold-0/checkpoint.pt"):
        resolve_path(str(runs))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: a folder without checkpoint.pt"):
        resolve_path(str(tmp_path / "empty"))


def test_wise_ft_blends_every_weight_towards_the_recorded_source(tmp_path):
    src = _source(tmp_path / "source.pt")  # ages 10..20
    source = load_source(str(tmp_path / "source.pt"), "resnet18")
    torch.manual_seed(5)
    tuned = AgeModel(5, 15)  # "fine-tuned": other weights everywhere, BN statistics included
    with torch.no_grad():
        for buf in tuned.buffers():
            if buf.is_floating_point():
                buf.uniform_(0.5, 1.5)
    before = {k: v.clone() for k, v in tuned.state_dict().items()}
    assert "wise-ft 0.25" in blend_with_source(tuned, source, 0.25)
    after, origin = tuned.state_dict(), src.state_dict()
    for key, value in after.items():
        if key.startswith("backbone.") and value.is_floating_point():
            want = 0.25 * before[key] + 0.75 * origin[key]
            torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6, msg=key)
        elif not value.is_floating_point():  # num_batches_tracked: the fine-tuned run's count
            assert torch.equal(value, before[key]), key
    for age in range(5, 16):  # the head by age: 10..15 blended, 5..9 (new to the source) as fine-tuned
        j = age - 5
        for part in ("weight", "bias"):
            tuned_row, got = before[f"head.{part}"][j], after[f"head.{part}"][j]
            want = 0.25 * tuned_row + 0.75 * origin[f"head.{part}"][age - 10] if age >= 10 else tuned_row
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{part} {age}")

    with pytest.raises(ValueError, match="wise-ft weight 1.5"):
        blend_with_source(tuned, source, 1.5)

    # The source is the one the run recorded, checked by sha256; none recorded is an error.
    cfg = TrainConfig()
    cfg.model.init_source = describe(source)
    assert recorded_source(to_dict(cfg), "resnet18")["sha256"] == source["sha256"]
    _source(tmp_path / "other.pt", min_age=11)
    with pytest.raises(CheckpointError, match=r"other.pt: not the checkpoint the run started from"):
        recorded_source(to_dict(cfg), "resnet18", str(tmp_path / "other.pt"))
    with pytest.raises(CheckpointError, match="not fine-tuned from another agecl run"):
        recorded_source(to_dict(TrainConfig()), "resnet18")


def test_a_source_rebuilt_bit_for_bit_is_known_by_its_weights(tmp_path):
    # The same training run again writes the same weights into a file that differs elsewhere (each
    # epoch's images/sec and wall time): the file's sha256 changes, the weights' does not.
    _source(tmp_path / "first.pt")
    _source(tmp_path / "rebuilt.pt")
    rebuilt = torch.load(tmp_path / "rebuilt.pt", weights_only=False)
    rebuilt["metrics"] = {"images_per_sec": 321.0, "epoch_time_s": 117.0}
    torch.save(rebuilt, tmp_path / "rebuilt.pt")
    first, again = load_source(str(tmp_path / "first.pt"), "resnet18"), load_source(str(tmp_path / "rebuilt.pt"), "resnet18")
    assert first["sha256"] != again["sha256"] and first["weights_sha256"] == again["weights_sha256"]
    # One weight changed by one bit in its last place is another model.
    torch.manual_seed(1)  # as _source made it
    state = {k: v.clone() for k, v in AgeModel(10, 20).state_dict().items()}
    assert sha256_weights(state) == first["weights_sha256"]
    state["head.bias"][0] = torch.nextafter(state["head.bias"][0], torch.tensor(1.0))
    assert sha256_weights(state) != first["weights_sha256"]
    # WiSE-FT finds a run's source in the rebuilt file; another model is still refused.
    cfg = TrainConfig()
    cfg.model.init_source = describe(first)
    assert recorded_source(to_dict(cfg), "resnet18", str(tmp_path / "rebuilt.pt"))["path"] == str(tmp_path / "rebuilt.pt")
    _source(tmp_path / "other.pt", min_age=11)
    with pytest.raises(CheckpointError, match=r"other.pt: not the checkpoint the run started from"):
        recorded_source(to_dict(cfg), "resnet18", str(tmp_path / "other.pt"))
