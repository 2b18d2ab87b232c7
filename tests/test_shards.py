"""The shard writer against independent readers: tarfile, webdataset, DALI's wds2idx."""

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from agecl import format as fmt
from agecl.shards import Sample, age_histogram, write_manifest, write_rejects, write_samples, write_split


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((fmt.IMAGE_SIZE, fmt.IMAGE_SIZE, 3), value, np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _samples(n=23):
    rng = np.random.default_rng(0)
    return [
        Sample(age=int(rng.integers(0, 70)), identity=f"p{i % 7}", source=f"dir/p{i % 7}_{i}.JPG", jpeg=_jpeg(i * 10 % 250), meta={"score": 0.99})
        for i in range(n)
    ]


@pytest.fixture
def written(tmp_path):
    samples = _samples()
    w = write_samples(tmp_path, samples, shard_size=5)
    write_split(tmp_path, "kfold", np.arange(len(samples)) % 3, {"protocol": "kfold", "seed": 0})
    write_rejects(tmp_path, [{"source": "bad.jpg", "reason": "truncated"}])
    write_manifest(tmp_path, w, dataset="test")
    return tmp_path, samples, w


def test_order_index_and_tar_contents_agree(written):
    root, samples, w = written
    index = fmt.load_index(root)
    assert len(index) == len(samples) and w.shards == 5
    assert np.all(np.diff(index["age"]) >= 0), "samples are grouped by age"
    identities = fmt.load_identities(root)
    by_source = {s.source: s for s in samples}
    for i, row in enumerate(index):
        raw = fmt.shard_path(root, row["shard"]).read_bytes()
        jpeg = raw[row["offset"] : row["offset"] + row["size"]]
        src = by_source[w.sources[i]]
        assert jpeg == src.jpeg
        assert row["age"] == src.age and identities[row["identity"]] == src.identity
    # tarfile, independently of the writer
    with tarfile.open(fmt.shard_path(root, 0)) as tar:
        names = tar.getnames()
        assert names[0].endswith(".jpg") and names[1].endswith(".json")
        meta = json.loads(tar.extractfile(names[1]).read())
        assert {"age", "identity", "source", "score", "key"} <= set(meta)
        assert "." not in meta["key"]


def test_webdataset_reads_every_sample(written):
    wds = pytest.importorskip("webdataset")
    root, samples, _ = written
    urls = [str(fmt.shard_path(root, i)) for i in range(5)]
    got = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert len(got) == len(samples)
    assert {g["json"]["source"] for g in got} == {s.source for s in samples}
    assert got[0]["jpg"].shape == (fmt.IMAGE_SIZE, fmt.IMAGE_SIZE, 3)


def test_dali_index_equals_wds2idx(written, tmp_path_factory):
    pytest.importorskip("wds2idx")
    root, _, _ = written
    ref = tmp_path_factory.mktemp("ref") / "ref.idx"
    subprocess.run([sys.executable, "-m", "wds2idx", str(fmt.shard_path(root, 2)), str(ref)], check=True, capture_output=True)
    assert fmt.dali_index_path(root, 2).read_text().split() == ref.read_text().split()


def test_manifest_splits_rejects(written):
    root, samples, _ = written
    m = fmt.load_manifest(root)
    assert m["samples"] == len(samples) and m["identities"] == 7 and m["dataset"] == "test"
    assert sum(m["age_histogram"].values()) == len(samples)
    assert list(fmt.load_split(root, "kfold")) == list(np.arange(len(samples)) % 3)
    with pytest.raises(fmt.FormatError, match="known: kfold"):
        fmt.load_split(root, "lopo")
    assert json.loads((root / fmt.REJECTS_FILE).read_text().splitlines()[0])["reason"] == "truncated"


def test_same_samples_same_bytes_and_no_temp_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_samples(a, _samples(), shard_size=5)
    write_samples(b, list(reversed(_samples())), shard_size=5)
    for f in sorted(a.iterdir()):
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    assert not [p for p in a.iterdir() if p.name.startswith(".")]


def test_rewrite_removes_manifest_and_stale_shards(written):
    root, samples, _ = written
    write_samples(root, samples[:4], shard_size=5)
    assert not (root / fmt.MANIFEST_FILE).exists()
    assert sorted(p.name for p in root.glob("shard-*")) == ["shard-00000.idx", "shard-00000.tar"]
    with pytest.raises(fmt.FormatError, match="incomplete"):
        fmt.load_manifest(root)


def test_format_errors_name_the_file(tmp_path):
    with pytest.raises(fmt.FormatError, match="no such shard folder"):
        fmt.load_manifest(tmp_path / "nope")
    (tmp_path / fmt.MANIFEST_FILE).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(fmt.FormatError, match="version 99"):
        fmt.load_manifest(tmp_path)


def test_age_histogram_bins():
    assert age_histogram(np.array([0, 9, 10, 69, 70, 85]))["70+"] == 2
    assert age_histogram(np.array([0, 9, 10]))["0-9"] == 2
