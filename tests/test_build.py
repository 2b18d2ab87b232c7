"""The shard builder end to end: real photos and the generated set, read back independently of the
writer (tarfile, webdataset); bad inputs in the rejects report; kill and resume; parts and merge."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agecl import build, shards
from agecl import format as fmt

REPO = Path(__file__).resolve().parents[1]
FGNET = Path(os.environ.get("AGECL_FGNET", Path(__file__).resolve().parents[2] / "shared/data/fgnet"))
VOLATILE = {"command", "wall_time_s"}  # manifest fields that differ between two runs of one build


def _run(*args) -> int:
    return build.main([*map(str, args), "--quiet"])


def _read_tars(root: Path) -> dict:
    """key -> (image array, meta) of every sample, read with tarfile alone."""
    out = {}
    for path in sorted(root.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            key, ext = name.split(".", 1)
            if ext == "jpg":
                out[key] = (np.asarray(Image.open(io.BytesIO(data))), json.loads(members[f"{key}.json"]))
    return out


def _check_samples(root: Path, dataset: str) -> dict:
    samples = _read_tars(root)
    manifest = fmt.load_manifest(root)
    assert len(samples) == manifest["samples"] == len(fmt.load_index(root))
    for key, (image, meta) in samples.items():
        assert image.shape == (fmt.IMAGE_SIZE, fmt.IMAGE_SIZE, 3) and image.dtype == np.uint8, key
        assert {"age", "identity", "source", "score", "points", "box", "faces"} <= set(meta), key
        assert meta["dataset"] == dataset and len(meta["points"]) == 5
    wds = pytest.importorskip("webdataset")
    urls = [str(p) for p in sorted(root.glob("shard-*.tar"))]
    got = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert len(got) == len(samples) and all(g["jpg"].shape == (256, 256, 3) for g in got)
    assert {g["json"]["source"] for g in got} == {m["source"] for _, m in samples.values()}
    return samples


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_same_build(a: Path, b: Path) -> None:
    """Every file byte for byte; the manifest up to the command line and the wall time."""
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        if name == fmt.MANIFEST_FILE:
            ma, mb = (json.loads(f[name].read_text()) for f in (fa, fb))
            assert {k: v for k, v in ma.items() if k not in VOLATILE} == {k: v for k, v in mb.items() if k not in VOLATILE}
        else:
            assert fa[name].read_bytes() == fb[name].read_bytes(), name


def _no_leftovers(root: Path) -> None:
    hidden = [p for p in root.rglob(".*")]
    assert not hidden, f"left behind: {hidden}"


def _face_photo(i: int) -> np.ndarray:
    """A generated face in a larger frame: a 'photo' that MTCNN must find and align."""
    import cv2

    from agecl.synthetic import synthetic_sample

    face = synthetic_sample(i, 50, seed=1).image
    return cv2.copyMakeBorder(face, 60, 60, 90, 90, cv2.BORDER_REFLECT)


# --- the generated dataset ----------------------------------------------------------------------------


def test_synthetic_same_format_manifest_and_splits(tmp_path):
    assert _run("--synthetic", 200, "--out", tmp_path, "--shard-size", 64) == 0
    samples = _check_samples(tmp_path, "synthetic")
    assert all(m["score"] == 1.0 and m["faces"] == 1 for _, m in samples.values())
    m = fmt.load_manifest(tmp_path)
    assert m["dataset"] == "synthetic" and m["inputs"] == 200 and m["samples"] == 200 and m["rejects"] == 0
    assert m["shards"] == 4 and m["default_protocol"] == "kfold" and m["splits"] == ["kfold", "rs"]
    assert m["template"]["size"] == 256 and m["template"]["coverage"] == fmt.DEFAULT_COVERAGE
    assert {"agecl", "python", "numpy", "torch", "facenet_pytorch", "opencv", "pillow"} <= set(m["versions"])
    for name in ("kfold", "rs"):
        folds = fmt.load_split(tmp_path, name)
        assert folds.shape == (200,) and set(folds.tolist()) == set(range(5))
    # identities never straddle kfold's folds
    index, folds = fmt.load_index(tmp_path), fmt.load_split(tmp_path, "kfold")
    for p in np.unique(index["identity"]):
        assert np.unique(folds[index["identity"] == p]).size == 1
    assert not (tmp_path / build.STAGING_DIR).exists()
    _no_leftovers(tmp_path)


def test_streamed_final_pass_equals_the_in_memory_writer(tmp_path):
    # Chunks and shards of a few samples: the final pass holds one shard, never the whole set.
    out, ref = tmp_path / "out", tmp_path / "ref"
    assert _run("--synthetic", 90, "--out", out, "--chunk-size", 4, "--shard-size", 7, "--keep-staging") == 0
    samples = []
    for p in sorted((out / build.STAGING_DIR).glob("chunk-*.tar")):
        samples += build.read_chunk(p)[1]
    assert len(samples) == 90
    w = shards.write_samples(ref, samples, shard_size=7)
    assert w.shards == 13 == fmt.load_manifest(out)["shards"]
    for p in sorted(ref.iterdir()):
        assert p.read_bytes() == (out / p.name).read_bytes(), p.name


# The builder, but each generated sample takes 20 ms more: time for the test to kill it halfway.
_SLOW_BUILD = """
import sys, time
import agecl.synthetic as synthetic
fast = synthetic.synthetic_samples
def slow(*args, **kwargs):
    for s in fast(*args, **kwargs):
        time.sleep(0.02)
        yield s
synthetic.synthetic_samples = slow
from agecl.build import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_run_resumes_to_the_same_bytes(tmp_path):
    args = ["--synthetic", "300", "--chunk-size", "10", "--shard-size", "100", "--seed", "7"]
    out, ref = tmp_path / "out", tmp_path / "ref"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_BUILD, *args, "--out", str(out), "--quiet"],
        cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    staging = out / build.STAGING_DIR
    try:
        deadline = time.monotonic() + 120
        while len(list(staging.glob("chunk-*.tar"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the builder and anything it started
        proc.wait()
    staged = len(list(staging.glob("chunk-*.tar")))
    assert 3 <= staged < 30, f"killed with {staged} of 30 chunks staged"
    assert not (out / fmt.MANIFEST_FILE).exists()
    # A temporary file of a writer that no longer exists, as a kill mid-write leaves it.
    dead = subprocess.Popen(["true"])
    dead.wait()
    (staging / f".chunk-00029.tar.{dead.pid}.tmp").write_bytes(b"half a tar")

    assert _run(*args, "--jpeg-quality", 90, "--out", out) == 2  # other settings: refused, nothing lost
    assert len(list(staging.glob("chunk-*.tar"))) == staged
    assert _run(*args, "--out", out) == 0  # resumes and finishes
    assert _run(*args, "--out", ref) == 0  # uninterrupted
    _assert_same_build(out, ref)
    _no_leftovers(out)
    assert _run(*args, "--out", out) == 0  # complete: reported, left alone
    _assert_same_build(out, ref)


def test_parts_merged_equal_one_run(tmp_path, capsys):
    args = ["--synthetic", "120", "--chunk-size", "8", "--shard-size", "50"]
    p1, p2, merged, single = (tmp_path / n for n in ("p1", "p2", "merged", "single"))
    assert _run(*args, "--out", p1, "--part", "1/2") == 0
    assert "--merge" in capsys.readouterr().out
    assert not (p1 / fmt.MANIFEST_FILE).exists()
    assert sorted(int(p.stem[6:]) for p in (p1 / build.STAGING_DIR).glob("chunk-*.tar")) == list(range(0, 15, 2))
    # Part 2 through the command-line tool, with two worker processes.
    subprocess.run(
        [sys.executable, "tools/make_shards.py", *args, "--out", str(p2), "--part", "2/2", "--workers", "2", "--quiet"],
        cwd=REPO, check=True, capture_output=True,
    )
    shutil.copytree(p1 / build.STAGING_DIR, merged / build.STAGING_DIR)
    assert _run(*args, "--out", merged, "--merge") == 2  # part 2's chunks are not there yet
    assert "7 of 15 chunks are missing" in capsys.readouterr().err
    for p in (p2 / build.STAGING_DIR).glob("chunk-*.tar"):
        shutil.copy(p, merged / build.STAGING_DIR / p.name)
    assert _run(*args, "--out", merged, "--merge") == 0
    assert _run(*args, "--out", single) == 0
    _assert_same_build(merged, single)


# --- photos: detection, alignment, rejects ------------------------------------------------------------


def _bad_and_good_folder(folder: Path) -> None:
    """Five readable photos of five people in the forms MISSION.md names, and every kind of bad
    input, under FG-NET names."""
    folder.mkdir()
    faces = [Image.fromarray(_face_photo(i)) for i in range(5)]
    faces[0].save(folder / "001A10.JPG", quality=92)
    faces[1].convert("L").save(folder / "002A20.png")  # grayscale PNG
    faces[2].convert("CMYK").save(folder / "003A30.jpg", quality=92)  # CMYK JPEG
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: stored turned a quarter, displayed upright
    faces[3].rotate(90, expand=True).save(folder / "004A40.jpg", exif=exif.tobytes())
    faces[4].save(folder / "005a50b.jpg")
    whole = (folder / "001A10.JPG").read_bytes()
    (folder / "006A11.JPG").write_bytes(whole[: len(whole) // 2])  # truncated JPEG
    (folder / "007A12.JPG").write_bytes(b"")  # empty
    (folder / "008A13.jpg").write_text("this is not a photo\n")  # text in a .jpg
    Image.fromarray(np.full((240, 320, 3), 128, np.uint8)).save(folder / "009A14.jpg")  # no face
    (folder / "IMG_0001.jpg").write_bytes(whole)  # a photo whose name is no FG-NET label
    (folder / "notes.txt").write_text("not a photo: ignored\n")


def test_bad_inputs_land_in_the_rejects_report(tmp_path, capsys):
    photos, out = tmp_path / "photos", tmp_path / "out"
    _bad_and_good_folder(photos)
    listed = tmp_path / "paper.txt"  # a published split list: lower-case names, one unknown, two left out
    listed.write_text("001a10.jpg 1\n002A20.png 2\n003A30.jpg 1\nghost.jpg 3\n")
    assert _run("--dataset", "fgnet", "--root", photos, "--out", out, "--chunk-size", 4, "--keep-staging",
                "--split-file", listed, "--split-name", "paper") == 0
    err = capsys.readouterr().err
    assert "2 sample(s) are not in" in err and "match no sample (e.g. ghost.jpg)" in err
    samples = _check_samples(out, "fgnet")
    assert sorted(m["source"] for _, m in samples.values()) == ["001A10.JPG", "002A20.png", "003A30.jpg", "004A40.jpg", "005a50b.jpg"]
    rejects = {r["source"]: r for r in map(json.loads, (out / fmt.REJECTS_FILE).read_text().splitlines())}
    assert {s: r["reason"] for s, r in rejects.items()} == {
        "006A11.JPG": "truncated",
        "007A12.JPG": "empty-file",
        "008A13.jpg": "not-an-image",
        "009A14.jpg": "no-face",
        "IMG_0001.jpg": "bad-label: name",
    }
    assert all(r["message"].startswith(s) for s, r in rejects.items())
    m = fmt.load_manifest(out)
    assert m["inputs"] == 10 == m["samples"] + m["rejects"] and m["ignored_files"] == 1
    assert m["rejects_by_reason"]["no-face"] == 1 and m["splits"] == ["lopo", "kfold", "paper"]
    sources = [meta["source"] for _, meta in samples.values()]  # tar order: the index's order
    assert dict(zip(sources, fmt.load_split(out, "paper").tolist())) == {
        "001A10.JPG": 0, "002A20.png": 1, "003A30.jpg": 0, "004A40.jpg": -1, "005a50b.jpg": -1,
    }
    assert m["default_protocol"] == "lopo" and m["detector"]["model"].startswith("MTCNN")

    # The threaded path that --device cuda takes (decode ahead, detect, encode in threads), on
    # the CPU here: its chunks are the same bytes as the serial path's.
    staging = out / build.STAGING_DIR
    from agecl.datasets import read_fgnet

    settings = json.loads((staging / build.SETTINGS_FILE).read_text())
    job = build.Job(
        staging=str(tmp_path / "threaded"), settings_sha256=settings["settings_sha256"], dataset="fgnet",
        records=read_fgnet(photos).records, synthetic=0, seed=0, chunk_size=4, coverage=fmt.DEFAULT_COVERAGE,
        jpeg_quality=95, detector=__import__("agecl.align", fromlist=["FaceDetector"]).FaceDetector(),
    )
    done = []
    build.run_chunks(job, list(range(job.chunks)), workers=2, device="cuda-like", on_done=lambda j, *_: done.append(j))
    assert done == list(range(job.chunks))
    for j in done:
        assert job.chunk_path(j).read_bytes() == (staging / build.CHUNK_PATTERN.format(j)).read_bytes()


@pytest.mark.fgnet
def test_fgnet_end_to_end(tmp_path):
    images = FGNET / "images"
    if not images.is_dir():
        pytest.skip(f"FG-NET not found at {FGNET} (set AGECL_FGNET)")
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    chosen = sorted(p for p in images.iterdir() if p.suffix.lower() == ".jpg")[::50]  # 21 photos, 21 people
    for p in chosen:
        shutil.copy(p, photos / p.name)
    assert _run("--dataset", "fgnet", "--root", photos, "--out", out, "--chunk-size", 8) == 0
    samples = _check_samples(out, "fgnet")
    m = fmt.load_manifest(out)
    assert m["inputs"] == len(chosen) == m["samples"] + m["rejects"]
    assert m["samples"] >= len(chosen) - 1  # FG-NET's faces are all findable
    for _, meta in samples.values():
        assert meta["faces"] >= 1 and 0.5 < meta["score"] <= 1.0
        # the landmarks land on the template, up to the residual of a five-point similarity fit
        residual = np.linalg.norm(np.array(meta["points"]) - np.array(m["template"]["points"]), axis=1)
        assert residual.mean() < 8, (meta["source"], residual)
    lopo = fmt.load_split(out, "lopo")
    assert sorted(lopo.tolist()) == list(range(m["identities"]))  # one photo a person here: one a fold
    assert _run("--dataset", "fgnet", "--root", photos, "--out", out, "--chunk-size", 8) == 0  # complete


def test_chunk_damaged_after_staging_is_named_removed_and_remade(tmp_path, capsys):
    args = ["--synthetic", 40, "--chunk-size", 8, "--shard-size", 16]
    out, ref = tmp_path / "out", tmp_path / "ref"
    assert _run(*args, "--out", out, "--keep-staging") == 0
    (out / fmt.MANIFEST_FILE).unlink()
    chunk = out / build.STAGING_DIR / build.CHUNK_PATTERN.format(2)
    whole = chunk.read_bytes()
    chunk.write_bytes(whole[: len(whole) // 2])  # a bad copy, cut short
    assert _run(*args, "--out", out, "--merge") == 2
    err = capsys.readouterr().err
    assert f"{chunk}: unreadable staging chunk" in err and "run the same command again" in err
    assert not chunk.exists() and not (out / fmt.MANIFEST_FILE).exists()
    assert _run(*args, "--out", out) == 0  # remakes chunk 2, then the same set as one clean run
    assert _run(*args, "--out", ref) == 0
    _assert_same_build(out, ref)


def test_aaf_build_keeps_gender_imports_the_authors_split_and_fills_with_the_chosen_border(tmp_path, capsys):
    import cv2

    from agecl.datasets import AAF_IDENTITY_NOTE, AAF_SPLIT
    from agecl.synthetic import synthetic_sample

    images, lists, out = tmp_path / "aaf" / "images", tmp_path / "aaf" / "splits", tmp_path / "out"
    images.mkdir(parents=True)
    lists.mkdir()
    # Two photos framed loosely, two tight crops whose aligned frame runs past the photo's edge.
    names = {"00000A25.jpg": "loose", "00001A30.jpg": "tight", "07381A40.jpg": "loose", "07382A50.jpg": "tight"}
    for i, (name, kind) in enumerate(names.items()):
        face = synthetic_sample(i, 50, seed=1).image
        photo = face[40:216, 40:216] if kind == "tight" else cv2.copyMakeBorder(face, 60, 60, 90, 90, cv2.BORDER_REFLECT)
        Image.fromarray(np.ascontiguousarray(photo)).save(images / name, quality=95)
    (lists / "train.txt").write_text("00000A25.jpg 0\n07381A40.jpg 1\n")
    (lists / "val.txt").write_text("00001A30.jpg 0\n07382A50.jpg 1\n")

    assert _run("--dataset", "aaf", "--root", images, "--out", out, "--folds", 2, "--border", "constant") == 0
    assert "border constant:" in capsys.readouterr().out
    samples = {meta["source"]: (image, meta) for image, meta in _check_samples(out, "aaf").values()}
    assert sorted(samples) == sorted(names)
    assert {s: m["gender"] for s, (_, m) in samples.items()} == {
        "00000A25.jpg": "female", "00001A30.jpg": "female", "07381A40.jpg": "male", "07382A50.jpg": "male",
    }
    m = fmt.load_manifest(out)
    assert m["identity_note"] == AAF_IDENTITY_NOTE and m["identities"] == 4 and m["default_protocol"] == "kfold"
    assert m["splits"] == ["kfold", "rs", AAF_SPLIT] and m["template"]["border"] == "constant"
    sources = [meta["source"] for _, meta in _read_tars(out).values()]  # tar order: the index's order
    assert dict(zip(sources, fmt.load_split(out, AAF_SPLIT).tolist())) == {
        "00000A25.jpg": 1, "00001A30.jpg": 0, "07381A40.jpg": 1, "07382A50.jpg": 0,  # fold 0 = val.txt
    }
    info = json.loads((out / fmt.SPLITS_DIR / f"{AAF_SPLIT}.json").read_text())
    assert info["matched"] == 4 and info["fold_meaning"]["0"].startswith("val.txt")

    # The outside share: the tight crops' frames run past the photo's edge, the loose ones' do not;
    # the manifest's histogram counts every sample; constant fills with black.
    for source, (image, meta) in samples.items():
        if names[source] == "tight":
            assert 0.3 < meta["outside"] < 0.8 and image[:8, :8].max() < 12, source  # black, up to JPEG noise
        else:
            assert meta["outside"] == 0.0, source
    assert sum(m["outside"]["counts"]) == 4 and m["outside"]["over_10pct"] == 2
    assert m["outside"]["edges"] == list(fmt.OUTSIDE_EDGES)

    # The border is part of what the set was made with: another is refused, not mixed in.
    assert _run("--dataset", "aaf", "--root", images, "--out", out, "--folds", 2, "--border", "reflect") == 2
    assert "built from other inputs or settings" in capsys.readouterr().err
