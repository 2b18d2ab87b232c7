"""The out-of-memory sort (agecl.spill) against the in-memory writer: the same bytes."""

import json

import numpy as np
import pytest

from agecl import format as fmt
from agecl.shards import Sample, write_ordered, write_reject_lines, write_rejects, write_samples
from agecl.spill import Records, SampleSpill


def _samples(n=41):
    """Ages and identities that clash a lot, sources whose byte order is not their insertion order,
    non-ASCII names (UTF-8 order must equal Python's), JPEG-like payloads of varied length."""
    rng = np.random.default_rng(3)
    names = ["zoë", "Zed", "alice", "Ålund", "bob", "b", "ba"]
    out = []
    for i in rng.permutation(n).tolist():
        identity = names[i % len(names)]
        source = f"{['ü', 'u', 'U', 'ä/x', 'a'][i % 5]}/{identity}_{n - i}.jpg"
        jpeg = b"\xff\xd8" + bytes(rng.integers(0, 256, int(rng.integers(1, 300))).astype(np.uint8)) + b"\xff\xd9"
        out.append(Sample(int(rng.integers(20, 24)), identity, source, jpeg, {"score": round(float(rng.random()), 4)}))
    return out


def _spill(folder, samples) -> SampleSpill:
    """Samples into a SampleSpill, their JPEGs in a few files as the staged chunks hold them."""
    spill = SampleSpill(folder)
    for f in range(0, len(samples), 6):
        path = folder / f"jpegs-{f}.bin"
        blob, places = b"", []
        for s in samples[f : f + 6]:
            blob += b"pad" * (f % 4)
            places.append((len(blob), len(s.jpeg)))
            blob += s.jpeg
        path.write_bytes(blob)
        number = spill.add_file(path)
        for s, (offset, size) in zip(samples[f : f + 6], places):
            spill.add({"age": s.age, "identity": s.identity, "source": s.source, "meta": s.meta}, number, offset, size)
    return spill


@pytest.mark.parametrize("shard_size,batch", [(1, 1), (4, 3), (5, 5), (100, 7)])
def test_spilled_samples_write_the_same_bytes(tmp_path, shard_size, batch):
    samples = _samples()
    ref, out, work = tmp_path / "ref", tmp_path / "out", tmp_path / "work"
    work.mkdir()
    w = write_samples(ref, samples, shard_size=shard_size)
    with _spill(work, samples) as spill:
        spill.sort()
        assert spill.identities == w.identities
        assert list(spill.sorted_sources()) == list(w.sources)
        index, shards = write_ordered(out, spill.ordered(batch), len(spill), spill.identities, shard_size)
    assert shards == w.shards and np.array_equal(index, w.index)
    names = sorted(p.name for p in ref.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:
        assert (ref / name).read_bytes() == (out / name).read_bytes(), name
    assert not list(work.glob(".spill-*"))  # the spill files never had a name, or lost it


def test_duplicate_keys_are_refused_like_the_in_memory_writer(tmp_path):
    samples = _samples(12)
    # Distinct sources, one key: the key drops the suffix and turns '/' into '-'.
    samples.append(Sample(samples[0].age, samples[0].identity, samples[0].source.replace("/", "-"), b"\xff\xd8\xff\xd9"))
    with pytest.raises(ValueError) as expected:
        write_samples(tmp_path / "ref", samples)
    with _spill(tmp_path, samples) as spill, pytest.raises(ValueError) as got:
        spill.sort()
    assert str(got.value) == str(expected.value)


def test_records_sorted_like_the_rejects_writer(tmp_path):
    rejects = [{"source": s, "reason": r} for s, r in
               [("b.jpg", "x"), ("ä.jpg", "y"), ("a.jpg", "z"), ("b.jpg", "w"), ("Z.jpg", "v"), ("\udcff.jpg", "s")]]
    ref = tmp_path / "ref"
    ref.mkdir()
    assert write_rejects(ref, rejects) == len(rejects)
    with Records(tmp_path) as spilled:
        for r in rejects:
            spilled.add(r["source"], json.dumps(r, sort_keys=True).encode())
        assert write_reject_lines(tmp_path, spilled.sorted()) == len(rejects)
    assert (tmp_path / fmt.REJECTS_FILE).read_bytes() == (ref / fmt.REJECTS_FILE).read_bytes()
