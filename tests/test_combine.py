"""Combined shard sets (`make_shards.py --combine`) and the split value that trains in every fold."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from agecl import format as fmt
from agecl.build import main as build_main
from agecl.reader import ShardSet
from agecl.shards import Sample, write_manifest, write_samples, write_split

TEMPLATE = {"size": 256, "coverage": 1.4, "border": "constant", "points": [[99.0, 121.0], [157.0, 121.0]]}


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((fmt.IMAGE_SIZE, fmt.IMAGE_SIZE, 3), value, np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _set(root, n: int, first_age: int, seed: int, template=TEMPLATE):
    """n samples of persons p0..p3 (the same names in every set), ages from first_age; a 3-fold kfold split."""
    samples = [Sample(age=first_age + i % 7, identity=f"p{i % 4}", source=f"p{i % 4}/{i}.jpg",
                      jpeg=_jpeg((seed * 37 + i * 11) % 250), meta={"outside": round(i / n, 3), "gender": "f"})
               for i in range(n)]  # fmt: skip
    w = write_samples(root, samples, shard_size=6)
    write_split(root, "kfold", np.arange(n) % 3, {"protocol": "kfold"})
    write_manifest(root, w, dataset=f"d{seed}", template=template, default_protocol="kfold", splits=["kfold"])
    return ShardSet(root)


def test_combined_set_keeps_every_face_and_label_and_carries_the_splits(tmp_path):
    a, b = _set(tmp_path / "small", 14, 10, 1), _set(tmp_path / "large", 25, 14, 2)
    out = tmp_path / "both"
    assert build_main(["--combine", str(a.root), str(b.root), "--out", str(out), "--quiet"]) == 0
    c = ShardSet(out)  # opens: index, shards and checksums agree
    assert len(c) == 39 and c.manifest["dataset"] == "combined" and c.manifest["template"] == TEMPLATE
    assert [s["set"] for s in c.manifest["sources"]] == ["small", "large"]
    # The same person names in both sets stay two people: 4 + 4 identities.
    assert sorted(c.identity_names) == [f"{s}/p{k}" for s in ("large", "small") for k in range(4)]
    order = [(int(c.ages[i]), c.identity_names[c.identities[i]], c.meta(i)["source"]) for i in range(len(c))]
    assert order == sorted(order)  # shards grouped by age, as every set is
    for name, src in (("small", a), ("large", b)):
        rows = [i for i in range(len(c)) if c.meta(i)["set"] == name]
        assert len(rows) == len(src)
        by_key = {src.key(i): i for i in range(len(src))}
        for r in rows:
            meta = c.meta(r)
            i = by_key[meta["set_key"]]
            assert c.jpeg(r).tobytes() == src.jpeg(i).tobytes()  # the JPEG bytes, not re-encoded
            assert c.ages[r] == src.ages[i] and meta["identity"] == f"{name}/{src.meta(i)['identity']}"
            assert meta["outside"] == src.meta(i)["outside"] and meta["gender"] == "f"
            assert meta["source"] == f"{name}/{src.meta(i)['source']}"
        # The set's split is carried; the other set's samples are in no fold.
        folds = c.split(f"{name}-kfold")
        by_row = {r: src.split("kfold")[by_key[c.meta(r)["set_key"]]] for r in rows}
        assert all(folds[r] == f for r, f in by_row.items())
        assert np.all(np.delete(folds, rows) == fmt.NOT_IN_SPLIT)
    assert c.manifest["splits"] == ["small-kfold", "large-kfold"] and c.manifest["default_protocol"] == "small-kfold"
    # Run again: the same set, byte for byte.
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    assert build_main(["--combine", str(a.root), str(b.root), "--out", str(out), "--quiet"]) == 0
    assert before == {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}


def test_every_train_part_is_trained_in_every_fold_and_never_tested(tmp_path):
    s = _set(tmp_path / "s", 12, 20, 1)
    folds = np.array([0, 1, 2, -2, -2, -1, 0, 1, 2, -2, 0, 1])
    write_split(s.root, "replay", folds, {"protocol": "replay"})
    always = {3, 4, 9}
    for k in range(3):
        test, train = s.split_ids("replay", k, "test"), s.split_ids("replay", k, "train")
        assert set(test) == set(np.flatnonzero(folds == k)) and not always & set(test)
        assert set(train) == set(np.flatnonzero((folds >= 0) & (folds != k))) | always
        assert 5 not in train and 5 not in test  # in no fold: in neither
    assert set(s.split_ids("replay", -1, "train")) == set(range(12)) - {5}  # --fold none: every training face
    assert json.loads((s.root / "splits" / "replay.json").read_text())["folds"] == 3


def test_sets_that_cannot_be_combined_are_named(tmp_path, capsys):
    a = _set(tmp_path / "a", 8, 10, 1)
    other = _set(tmp_path / "b", 8, 10, 2, template={**TEMPLATE, "border": "reflect"})
    assert build_main(["--combine", str(a.root), str(other.root), "--out", str(tmp_path / "c"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(other.root) in err and "border constant against reflect" in err
    assert not (tmp_path / "c").exists()
    (tmp_path / "x").mkdir()
    same_name = _set(tmp_path / "x" / "a", 8, 10, 3)
    assert build_main(["--combine", str(a.root), str(same_name.root), "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "same folder name" in capsys.readouterr().err
    assert build_main(["--combine", str(a.root), "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "two shard sets or more" in capsys.readouterr().err
    assert build_main(["--combine", str(a.root), str(tmp_path / "missing"), "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "missing" in capsys.readouterr().err
    b = _set(tmp_path / "b2", 8, 10, 4)
    assert build_main(["--combine", str(a.root), str(b.root), "--out", str(a.root), "--quiet"]) == 2
    assert "is also --out" in capsys.readouterr().err
    assert build_main(["--combine", str(a.root), str(b.root), "--synthetic", "10", "--out", str(tmp_path / "c")]) == 2
    assert "give one of" in capsys.readouterr().err
