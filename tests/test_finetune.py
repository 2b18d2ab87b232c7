"""Fine-tuning from an agecl checkpoint (agecl.finetune): which file a run folder means, the head
mapped class by class by age, refusals naming the file. The trainer's side is in test_train.py."""

import hashlib

import pytest
import torch

from agecl.checkpoint import CheckpointError, save_checkpoint
from agecl.config import TrainConfig
from agecl.finetune import describe, init_model, load_source, resolve_path
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
