"""agecl-predict and agecl-explain: a tiny checkpoint, FG-NET photos (skipped when absent) and
generated images (a flat grey photo, a text file named .jpg)."""

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agecl.align import Faces
from agecl.checkpoint import save_checkpoint
from agecl.config import TrainConfig
from agecl.explain import grad_cam
from agecl.explain import main as explain_main
from agecl.model import IMAGENET_MEAN, IMAGENET_STD, AgeModel
from agecl.predict import AgePredictor, FaceAge, find_photos
from agecl.predict import main as predict_main

FGNET = Path(os.environ.get("AGECL_FGNET") or Path(__file__).resolve().parents[2] / "shared/data/fgnet")
MIN_AGE, MAX_AGE = 0, 69
CROP = 64  # small crops keep the CPU tests light; the real default is 224 of 256
RECORD_FIELDS = {"photo", "face", "box", "score", "age", "std", "error", "message"}


def make_checkpoint(path: Path, crop: int = CROP, border: str | None = None) -> Path:
    """A randomly initialised ResNet-18 checkpoint with a `crop`-pixel evaluation crop; `border`
    None: a template without one (as checkpoints were before borders were recorded)."""
    cfg = TrainConfig()
    cfg.loader.image_size = crop
    torch.manual_seed(0)
    model = AgeModel(MIN_AGE, MAX_AGE)
    template = {"size": 256, "coverage": 1.4, **({"border": border} if border else {})}
    save_checkpoint(path, config=cfg, model=model, min_age=MIN_AGE, max_age=MAX_AGE, template=template, epoch=0, step=0)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt")


@pytest.fixture(scope="module")
def predictor(ckpt) -> AgePredictor:
    return AgePredictor(ckpt, "cpu", batch_size=8)


def _fgnet(stem: str) -> Path:
    path = FGNET / "images" / f"{stem}.JPG"
    if not path.is_file():
        pytest.skip(f"FG-NET not found at {FGNET} (set AGECL_FGNET)")
    return path


@pytest.fixture(scope="module")
def junk(tmp_path_factory) -> Path:
    """A folder of photos without an age: a flat grey image, a text file named .jpg, a .txt file."""
    d = tmp_path_factory.mktemp("junk")
    Image.new("RGB", (240, 180), (128, 128, 128)).save(d / "grey.png")
    (d / "notes.jpg").write_text("this is not an image\n")
    (d / "readme.txt").write_text("not walked: not a photo suffix\n")
    return d


@pytest.fixture(scope="module")
def album(tmp_path_factory, junk) -> Path:
    """FG-NET photos: one face (face.jpg), two faces side by side (two.png), plus the junk."""
    a, b = _fgnet("046A10"), _fgnet("063A18")
    d = tmp_path_factory.mktemp("album")
    shutil.copy(a, d / "face.jpg")
    left, right = np.asarray(Image.open(a).convert("RGB")), np.asarray(Image.open(b).convert("RGB"))
    h = max(left.shape[0], right.shape[0])
    pad = lambda im: np.pad(im, ((0, h - im.shape[0]), (0, 0), (0, 0)), constant_values=128)  # noqa: E731
    Image.fromarray(np.concatenate([pad(left), pad(right)], axis=1)).save(d / "two.png")
    for name in ("grey.png", "notes.jpg", "readme.txt"):
        shutil.copy(junk / name, d / name)
    return d


# --------------------------------------------------------------------------------------------
# Aligned faces -> ages (no detection)


def test_predict_aligned_matches_manual_preprocessing(predictor):
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, size=(5, 256, 256, 3), dtype=np.uint8)  # (N, T, T, 3)
    ages, stds = predictor.predict_aligned(faces)
    assert ages.shape == stds.shape == (5,) and ages.dtype == np.float32
    assert np.all(np.isfinite(ages)) and np.all((ages >= MIN_AGE) & (ages <= MAX_AGE)) and np.all(stds >= 0)
    # The evaluation path by hand: centre crop 96:160, 0..1, ImageNet mean / std, NCHW.
    o = (256 - CROP) // 2  # even difference: every centre-crop convention agrees
    x = faces[:, o : o + CROP, o : o + CROP].astype(np.float32) / 255.0
    x = (x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    with torch.no_grad():
        _, logits = predictor.model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
        want_age, want_std = predictor.model.expected_age(logits), predictor.model.age_std(logits)
    np.testing.assert_allclose(ages, want_age.numpy(), atol=1e-4)
    np.testing.assert_allclose(stds, want_std.numpy(), atol=1e-4)
    # Batching does not change the result (batch_size 8 vs one face at a time).
    one = np.concatenate([predictor.predict_aligned(faces[i : i + 1])[0] for i in range(5)])
    np.testing.assert_allclose(ages, one, atol=1e-4)
    assert predictor.predict_aligned(faces[:0])[0].shape == (0,)
    with pytest.raises(ValueError, match="aligned faces"):
        predictor.predict_aligned(faces[:, :128])


def test_photos_are_aligned_with_the_checkpoints_border(predictor, tmp_path):
    from agecl import format as fmt
    from agecl.align import transform_points

    # A face whose aligned frame runs past the photo's left and top edges.
    photo = np.random.default_rng(1).integers(40, 216, size=(300, 300, 3), dtype=np.uint8)
    points = transform_points(np.array([[1.0, 0, -60], [0, 1.0, -50]]), fmt.face_template())  # (5, 2)
    faces = Faces(np.array([[0, 0, 150, 150]], np.float32), np.ones(1, np.float32), points[None].astype(np.float32))
    assert predictor.border == "reflect"  # the checkpoint names none: made before borders were recorded
    (_, [mirrored]) = predictor.align_all(photo, faces)
    black = AgePredictor(make_checkpoint(tmp_path / "constant.pt", border="constant"), "cpu")
    assert black.info["template"]["border"] == black.border == "constant"
    (_, [padded]) = black.align_all(photo, faces)
    assert padded[:50, :60].max() == 0 and mirrored[:50, :60].min() > 0  # the strip beyond the photo
    np.testing.assert_array_equal(padded[50:, 60:], mirrored[50:, 60:])  # the photo itself: the same


@pytest.mark.gpu
def test_cuda_agrees_with_cpu(ckpt, predictor):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    faces = np.random.default_rng(4).integers(0, 256, size=(9, 256, 256, 3), dtype=np.uint8)
    gpu = AgePredictor(ckpt, "cuda", batch_size=4)
    for a, b in zip(gpu.predict_aligned(faces), predictor.predict_aligned(faces)):
        np.testing.assert_allclose(a, b, atol=5e-3)  # TF32 / cuDNN kernels differ slightly from the CPU's


def test_flip_tta_averages_the_mirror(ckpt, predictor):
    flip, plain = AgePredictor(ckpt, "cpu", tta="flip"), predictor
    rng = np.random.default_rng(1)
    half = rng.integers(0, 256, size=(2, 256, 128, 3), dtype=np.uint8)
    symmetric = np.concatenate([half, half[:, :, ::-1]], axis=2)  # (2, 256, 256, 3), mirror-symmetric
    np.testing.assert_allclose(flip.predict_aligned(symmetric)[0], plain.predict_aligned(symmetric)[0], atol=1e-4)
    # On any face: the age of the averaged distribution lies between the face's and its mirror's.
    faces = rng.integers(0, 256, size=(3, 256, 256, 3), dtype=np.uint8)
    a, b = plain.predict_aligned(faces)[0], plain.predict_aligned(np.ascontiguousarray(faces[:, :, ::-1]))[0]
    t = flip.predict_aligned(faces)[0]
    np.testing.assert_allclose(t, (a + b) / 2, atol=1e-4)  # the expectation is linear in s
    with pytest.raises(ValueError, match="tta"):
        AgePredictor(ckpt, "cpu", tta="rotate")


def test_find_photos_walks_folders(tmp_path):
    (tmp_path / "sub" / ".hidden").mkdir(parents=True)
    for name in ("a.JPG", "b.Png", "sub/c.webp", "sub/d.TIFF", "e.txt", ".f.jpg", "sub/.hidden/g.jpg"):
        (tmp_path / name).write_bytes(b"x")
    photos, bases = find_photos([tmp_path, tmp_path / "e.txt"])
    names = [p.relative_to(tmp_path).as_posix() for p in photos]
    assert names == ["a.JPG", "b.Png", "sub/c.webp", "sub/d.TIFF", "e.txt"]  # a named file is always tried
    assert bases[:4] == [tmp_path] * 4


# --------------------------------------------------------------------------------------------
# Photos -> faces -> ages


@pytest.mark.fgnet
def test_predict_photos_faces_and_failures(predictor, album):
    paths = [album / n for n in ("face.jpg", "two.png", "grey.png", "notes.jpg", "missing.jpg")]
    records = predictor.predict_photos(paths, keep_aligned=True)
    by_photo: dict[str, list[FaceAge]] = {}
    for r in records:
        by_photo.setdefault(Path(r.photo).name, []).append(r)
    (face,) = by_photo["face.jpg"]
    assert face.ok and face.face == 0 and np.isfinite(face.age) and MIN_AGE <= face.age <= MAX_AGE
    assert face.aligned.shape == (256, 256, 3) and face.score > 0.9
    two = by_photo["two.png"]
    assert [r.face for r in two] == [0, 1] and all(r.ok for r in two)
    width = Image.open(album / "two.png").width
    centres = [(r.box[0] + r.box[2]) / 2 for r in two]
    assert centres[0] < width / 2 < centres[1]  # numbered left to right, one face in each half
    assert all(MIN_AGE <= r.age <= MAX_AGE for r in two)
    # The same photo gives the same age inside a group photo's batch as alone.
    alone = predictor.predict_aligned(face.aligned[None])[0][0]
    assert abs(alone - face.age) < 1e-3
    assert [(r.error, r.face, r.age) for r in by_photo["grey.png"]] == [("no-face", None, None)]
    assert by_photo["notes.jpg"][0].error == "not-an-image"
    assert by_photo["missing.jpg"][0].error == "missing"
    assert "missing.jpg" in by_photo["missing.jpg"][0].message


@pytest.mark.fgnet
def test_cli_json_and_annotate(ckpt, album, tmp_path, capsys):
    out, ann = tmp_path / "ages.json", tmp_path / "annotated"
    rc = predict_main([str(album), "--checkpoint", str(ckpt), "--json", "-o", str(out), "--annotate", str(ann),
                       "--device", "cpu", "--photo-batch", "2"])
    assert rc == 0
    records = json.loads(out.read_text())
    assert isinstance(records, list) and all(set(r) == RECORD_FIELDS for r in records)
    faces = [r for r in records if r["error"] is None]
    assert sorted(Path(r["photo"]).name for r in faces) == ["face.jpg", "two.png", "two.png"]
    for r in faces:
        assert len(r["box"]) == 4 and 0 < r["score"] <= 1 and MIN_AGE <= r["age"] <= MAX_AGE and r["std"] >= 0
    errors = {Path(r["photo"]).name: r["error"] for r in records if r["error"]}
    assert errors == {"grey.png": "no-face", "notes.jpg": "not-an-image"}  # readme.txt is not walked
    assert "no-face" in capsys.readouterr().err  # the summary on stderr
    # Annotated copies: every readable photo, valid images of the input's size.
    for name in ("face.jpg", "two.png", "grey.png"):
        with Image.open(ann / name) as im:
            im.load()
            assert im.size == Image.open(album / name).size
    assert not (ann / "notes.jpg").exists()
    drawn = np.asarray(Image.open(ann / "two.png").convert("RGB")).astype(int)
    assert np.abs(drawn - np.asarray(Image.open(album / "two.png").convert("RGB"))).max() > 100  # boxes drawn


@pytest.mark.fgnet
def test_cli_csv_with_flip_tta(ckpt, album, capsys):
    rc = predict_main([str(album / "face.jpg"), "--checkpoint", str(ckpt), "--csv", "--tta", "flip", "--device", "cpu"])
    assert rc == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 1
    row = rows[0]
    assert set(row) == {"photo", "face", "x1", "y1", "x2", "y2", "score", "age", "std", "error", "message"}
    assert row["face"] == "0" and row["error"] == "" and MIN_AGE <= float(row["age"]) <= MAX_AGE
    assert float(row["x1"]) < float(row["x2"]) and float(row["y1"]) < float(row["y2"])


def test_cli_without_faces_exits_1_and_reports(ckpt, junk, capsys):
    rc = predict_main([str(junk / "grey.png"), str(junk / "notes.jpg"), "--checkpoint", str(ckpt), "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 1  # nothing aged, but no crash
    lines = captured.out.splitlines()
    assert lines[0].split()[:2] == ["photo", "face"] and len(lines) == 3
    assert "no-face" in lines[1] and "not-an-image" in lines[2]
    assert "1 no-face" in captured.err and "1 not-an-image" in captured.err


class _FussyDetector:
    """Raises on any batch holding an image under 10 pixels tall (as MTCNN once did); finds no face."""

    def detect(self, images):
        if any(im.shape[0] < 10 for im in images):
            raise ValueError("empty image pyramid")
        return [Faces.empty() for _ in images]


def test_a_detector_failure_costs_one_photo(ckpt):
    predictor = AgePredictor(ckpt, "cpu", detector=_FussyDetector())
    tiny, grey = np.full((6, 6, 3), 90, np.uint8), np.full((120, 160, 3), 128, np.uint8)
    out = predictor.predict_images([tiny, grey], ["tiny", "grey"])
    assert [[r.error for r in rs] for rs in out] == [["detection-failed"], ["no-face"]]
    assert out[0][0].message.startswith("tiny: detection-failed (ValueError")


def test_cli_bad_checkpoint_exits_2(tmp_path, junk, capsys):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    assert predict_main([str(junk / "grey.png"), "--checkpoint", str(bad)]) == 2
    assert "corrupt" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Grad-CAM


def _manual_cam(model: AgeModel, x: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of the expected age without hooks: the backbone run stage by stage."""
    bb = model.backbone
    with torch.no_grad():
        h = bb.layer3(bb.layer2(bb.layer1(bb.maxpool(bb.relu(bb.bn1(bb.conv1(x)))))))
    acts = bb.layer4(h).detach().requires_grad_(True)  # (N, C, h, w)
    logits = model.head(torch.flatten(bb.avgpool(acts), 1))
    model.expected_age(logits).sum().backward()
    cam = torch.relu((acts.grad.mean((2, 3), keepdim=True) * acts).sum(1, keepdim=True)).detach()
    cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return cam / cam.amax((1, 2), keepdim=True).clamp_min(1e-12)


@pytest.mark.parametrize("target", ["age", "class"])
def test_grad_cam_maps(predictor, target):
    x = torch.randn(3, 3, CROP, CROP, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # grad_cam turns gradients on itself
        maps, ages, stds = grad_cam(predictor.model, x, target)
    assert maps.shape == (3, CROP, CROP) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    peaks = maps.amax((1, 2))
    assert torch.all((peaks == 0) | ((peaks - 1).abs() < 1e-6))  # each map is normalised to its maximum
    np.testing.assert_allclose(ages.numpy(), predictor.model.predict(x).detach().numpy(), atol=1e-4)
    assert stds.shape == (3,)
    assert all(p.grad is None for p in predictor.model.parameters())  # no gradient left behind
    if target == "age":
        np.testing.assert_allclose(maps.numpy(), _manual_cam(predictor.model, x).numpy(), atol=1e-4)
        for p in predictor.model.parameters():
            p.grad = None


def test_explain_cli_on_shards(ckpt, tmp_path):
    from agecl.build import main as build_main

    shards = tmp_path / "shards"
    assert build_main(["--synthetic", "12", "--out", str(shards), "--quiet"]) == 0
    out = tmp_path / "cam.png"
    assert explain_main(["--shards", str(shards), "--samples", "4", "--checkpoint", str(ckpt), "--out", str(out),
                         "--device", "cpu"]) == 0
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG" and im.width > 200 and im.height > 100


@pytest.mark.fgnet
def test_explain_cli_on_photos(ckpt, album, tmp_path, capsys):
    out = tmp_path / "cam.png"
    rc = explain_main([str(album / "face.jpg"), str(album / "notes.jpg"), "--checkpoint", str(ckpt),
                       "--out", str(out), "--device", "cpu"])
    assert rc == 0 and "not-an-image" in capsys.readouterr().err
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG"
    # Nothing to explain is an error, not a crash.
    assert explain_main([str(album / "grey.png"), "--checkpoint", str(ckpt), "--out", str(out)]) == 1
