"""ShardSet against shard sets written by agecl.shards: bytes, labels, splits, and bad input."""

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from agecl import format as fmt
from agecl.reader import ShardSet
from agecl.shards import Sample, write_manifest, write_samples, write_split


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((fmt.IMAGE_SIZE, fmt.IMAGE_SIZE, 3), value, np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write(root, samples, shard_size=7):
    w = write_samples(root, samples, shard_size=shard_size)
    write_split(root, "kfold", np.arange(len(samples)) % 3, {"protocol": "kfold"})
    write_manifest(root, w, dataset="test")
    return w


@pytest.fixture
def written(tmp_path):
    samples = [Sample(age=20 + i % 5, identity=f"p{i % 4}", source=f"p{i % 4}/{i}.jpg", jpeg=_jpeg(i * 11 % 250)) for i in range(20)]
    w = _write(tmp_path, samples)
    return tmp_path, samples, w


def test_bytes_labels_and_splits(written):
    root, samples, w = written
    ss = ShardSet(root)
    assert len(ss) == 20 and ss.num_shards == 3
    by_source = {s.source: s for s in samples}
    for i in range(len(ss)):
        view = ss.jpeg(i)
        assert view.dtype == np.uint8 and not view.flags.writeable  # a read-only view, not a copy
        assert view.tobytes() == by_source[w.sources[i]].jpeg
        assert ss.ages[i] == by_source[w.sources[i]].age
        assert ss.identity_names[ss.identities[i]] == by_source[w.sources[i]].identity
        assert ss.key(i) == w.keys[i]
    batch = ss.jpegs(np.array([5, 0, 19, 5]))
    assert [b.tobytes() for b in batch] == [ss.jpeg(i).tobytes() for i in (5, 0, 19, 5)]
    assert ss.ages.dtype == ss.identities.dtype == np.int64
    assert (ss.min_age, ss.max_age) == (20, 24)
    folds = ss.split("kfold")
    test = ss.split_ids("kfold", 1, "test")
    train = ss.split_ids("kfold", 1)
    assert test.dtype == train.dtype == np.int64
    assert list(test) == list(np.flatnonzero(folds == 1))
    assert sorted(np.concatenate([test, train])) == list(range(20))
    with pytest.raises(ValueError, match="folds 0..2"):
        ss.split_ids("kfold", 3)
    with pytest.raises(ValueError, match="part"):
        ss.split_ids("kfold", 0, "val")
    with pytest.raises(fmt.FormatError, match="known: kfold"):
        ss.split("lopo")


def test_one_map_per_shard_and_pickles_without_maps(written):
    root, _, _ = written
    ss = ShardSet(root)
    ss.jpegs(np.arange(20))
    assert sorted(ss._maps) == [0, 1, 2]
    # the views of one shard share one buffer: no per-sample file opens, no copies
    assert ss.jpeg(0).base is ss.jpeg(1).base is ss._maps[0]
    clone = pickle.loads(pickle.dumps(ss))  # what a DataLoader worker receives
    assert clone._maps == {}
    assert clone.jpeg(7).tobytes() == ss.jpeg(7).tobytes()


def test_missing_shard_names_the_file(written):
    root, _, _ = written
    fmt.shard_path(root, 1).unlink()
    with pytest.raises(fmt.FormatError, match=r"shard-00001\.tar: missing shard"):
        ShardSet(root)


def test_truncated_tar_names_shard_and_sample(written):
    root, _, w = written
    path = fmt.shard_path(root, 2)
    index = fmt.load_index(root)
    first = int(np.flatnonzero(index["shard"] == 2)[2])  # the third sample of shard 2 is cut
    with open(path, "r+b") as f:
        f.truncate(int(index["offset"][first]) + 10)
    with pytest.raises(fmt.FormatError, match=rf"shard-00002\.tar: truncated tar .*sample {first} \(key {w.keys[first]}\)"):
        ShardSet(root)


def test_not_a_jpeg_names_shard_and_sample(tmp_path):
    samples = [Sample(age=20 + i % 3, identity=f"p{i % 2}", source=f"{i}.jpg", jpeg=_jpeg(100)) for i in range(9)]
    samples[4].jpeg = b"\x89PNG\r\n\x1a\n" + samples[4].jpeg[8:]  # a PNG header on JPEG bytes
    w = _write(tmp_path, samples, shard_size=4)
    bad = w.sources.index("4.jpg")
    shard = bad // 4
    with pytest.raises(fmt.FormatError, match=rf"shard-{shard:05d}\.tar: sample {bad} \(key {w.keys[bad]}\): not a complete JPEG"):
        ShardSet(tmp_path)
    ShardSet(tmp_path, verify=False)  # opening without the check works; decoding will fail later


def test_truncated_jpeg_inside_a_whole_tar(tmp_path):
    samples = [Sample(age=30 + i % 2, identity=f"p{i % 3}", source=f"{i}.jpg", jpeg=_jpeg(60)) for i in range(6)]
    samples[2].jpeg = samples[2].jpeg[: len(samples[2].jpeg) // 2]  # cut mid-scan: no EOI
    w = _write(tmp_path, samples)
    bad = w.sources.index("2.jpg")
    with pytest.raises(fmt.FormatError, match=rf"sample {bad} .*ends .*expected ff d8 \.\.\. ff d9"):
        ShardSet(tmp_path)


def test_index_and_manifest_disagree(written):
    root, _, w = written
    write_manifest(root, w, samples=21)
    with pytest.raises(fmt.FormatError, match="20 samples, the manifest says 21"):
        ShardSet(root)
