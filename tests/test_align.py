"""Photo loading, the five-point warp, and MTCNN detection on real FG-NET photos (skipped when absent)."""

import io
import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from agecl import format as fmt
from agecl.align import (
    AlignedFace,
    FaceDetector,
    Faces,
    NoFaceError,
    PhotoError,
    Rejected,
    align_batch,
    align_face,
    align_files,
    align_photo,
    alignment_matrix,
    choose_face,
    decode_photo,
    load_photo,
    outside_share,
    similarity_transform,
    transform_points,
    warp_face,
)

FGNET = Path(os.environ.get("AGECL_FGNET") or Path(__file__).resolve().parents[1].parent / "shared/data/fgnet")
# A grayscale toddler, a close-up whose face touches the frame, a colour teenager, a grayscale adult.
FGNET_PHOTOS = ("001A02", "033A30", "046A10", "063A18")


def _similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


def _encode(im: Image.Image, format: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format, **kw)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# The warp


def test_warp_puts_marked_dots_on_the_template():
    size = fmt.IMAGE_SIZE
    template = fmt.face_template(size)  # (5, 2)
    # A photo in which the face is the template turned 25 degrees, enlarged 1.6x and moved.
    to_photo = _similarity(25.0, 1.6, 140.0, 60.0)
    photo_pts = transform_points(to_photo, template)
    photo = np.full((520, 560, 3), 90, np.uint8)
    for x, y in photo_pts:
        cv2.circle(photo, (int(round(x)), int(round(y))), 5, (255, 255, 255), -1, lineType=cv2.LINE_AA)
    # Dots are drawn at rounded pixels: the truth is where they were drawn.
    drawn = np.rint(photo_pts)

    aligned, pts = align_face(photo, drawn)
    assert aligned.shape == (size, size, 3) and aligned.dtype == np.uint8
    assert pts.shape == (5, 2) and pts.dtype == np.float32
    # Rounding moved the dots by at most half a pixel of the photo: 0.5/1.6 px in the face.
    np.testing.assert_allclose(pts, template, atol=0.5)
    m = alignment_matrix(drawn)
    inverse = np.linalg.inv(np.vstack([to_photo, [0, 0, 1]]))[:2]
    np.testing.assert_allclose(m[:, :2], inverse[:, :2], atol=2e-3)

    # Each dot's brightness centroid in the output lies on its template point.
    gray = aligned[:, :, 0].astype(np.float64) - 90.0
    for tx, ty in template:
        x0, y0 = int(tx) - 8, int(ty) - 8
        win = gray[y0 : y0 + 17, x0 : x0 + 17].clip(0, None)
        yy, xx = np.mgrid[y0 : y0 + 17, x0 : x0 + 17]
        c = np.array([(win * xx).sum(), (win * yy).sum()]) / win.sum()
        assert np.hypot(*(c - (tx, ty))) < 0.75, (c, (tx, ty))


def test_similarity_is_least_squares_and_never_mirrors():
    rng = np.random.default_rng(1)
    dst = fmt.face_template()
    true = _similarity(-12.0, 0.7, 30.0, -20.0)
    src = transform_points(true, dst).astype(np.float64) + rng.normal(0, 2.0, (5, 2))
    m = similarity_transform(src, dst)
    assert np.linalg.det(m[:, :2]) > 0
    # Exact least squares: no other similarity fits better, neither OpenCV's robust fit nor a
    # nudge of any of the four parameters [[a, -b, tx], [b, a, ty]].
    def sse(mat):
        return float(((src @ mat[:, :2].T + mat[:, 2] - dst) ** 2).sum())

    cv_m, _ = cv2.estimateAffinePartial2D(src.astype(np.float32), dst, method=cv2.LMEDS)
    assert sse(m) <= sse(cv_m) + 1e-6
    assert m[0, 0] == pytest.approx(m[1, 1]) and m[0, 1] == pytest.approx(-m[1, 0])
    for delta in np.vstack([np.eye(4), -np.eye(4)]) * 1e-3:
        a, b, tx, ty = m[0, 0] + delta[0], m[1, 0] + delta[1], m[0, 2] + delta[2], m[1, 2] + delta[3]
        assert sse(m) < sse(np.array([[a, -b, tx], [b, a, ty]]))
    skimage = pytest.importorskip("skimage.transform")
    if hasattr(skimage.SimilarityTransform, "from_estimate"):  # skimage >= 0.26
        tf = skimage.SimilarityTransform.from_estimate(src, dst)
    else:
        tf = skimage.SimilarityTransform()
        tf.estimate(src, dst)
    np.testing.assert_allclose(m, tf.params[:2], atol=1e-4)
    # Mirrored landmarks (left and right swapped) still give a proper rotation, not a flip.
    mirrored = src * [-1, 1]
    assert np.linalg.det(similarity_transform(mirrored, dst)[:, :2]) > 0
    with pytest.raises(ValueError, match="degenerate"):
        similarity_transform(np.ones((5, 2)), dst)


def test_border_and_outside_share():
    photo = np.full((300, 300, 3), 200, np.uint8)
    # Template face at the photo's top-left corner: a quarter or more of the frame is outside.
    pts = transform_points(_similarity(0, 1.0, -128, -128), fmt.face_template())
    m = alignment_matrix(pts)
    share = outside_share(m, photo.shape)
    assert 0.7 < share < 0.8  # 1 - (128.5/256)^2
    reflect, _ = align_face(photo, pts)
    black, _ = align_face(photo, pts, border="constant")
    assert reflect.min() == 200 and black[0, 0].tolist() == [0, 0, 0]
    assert outside_share(alignment_matrix(fmt.face_template()), (256, 256)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="border"):
        align_face(photo, pts, border="wrap")


def _inverse_warp_outside(matrix: np.ndarray, shape, size: int = fmt.IMAGE_SIZE) -> float:
    """Share of the output pixels whose centre comes from beyond the photo (pixel edges at -0.5 and
    w - 0.5), by the inverse warp of every output pixel: an independent count."""
    h, w = shape[:2]
    inv = cv2.invertAffineTransform(np.asarray(matrix, np.float64))
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    x = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2]
    y = inv[1, 0] * u + inv[1, 1] * v + inv[1, 2]
    return float(((x < -0.5) | (x > w - 0.5) | (y < -0.5) | (y > h - 0.5)).mean())


def test_outside_share_matches_a_hand_computation():
    # A shift: the 200 px wide photo covers output columns 49.5..249.5 and every row (it is 300 tall,
    # shifted up 20): 56 of 256 columns lie outside.
    shift = np.array([[1.0, 0, 50], [0, 1.0, -20]])
    assert outside_share(shift, (300, 200)) == pytest.approx(1 - 200 / 256, abs=1e-6) == 56 / 256
    # Scale 2 and a shift: the 100 px photo spans x 99.5..299.5 and y -51.5..148.5 of the frame, of
    # which 156 x 149 px fall inside it.
    zoom = np.array([[2.0, 0, 100.5], [0, 2.0, -50.5]])
    assert outside_share(zoom, (100, 100)) == pytest.approx(1 - 156 * 149 / 256**2, abs=1e-6)
    for m, shape in ((shift, (300, 200)), (zoom, (100, 100))):
        assert outside_share(m, shape) == pytest.approx(_inverse_warp_outside(m, shape), abs=1e-6)
    # A rotation: the exact area and the pixel count agree to a fraction of a pixel row.
    turned = _similarity(20, 1.3, -60, 10)
    assert outside_share(turned, (240, 320)) == pytest.approx(_inverse_warp_outside(turned, (240, 320)), abs=0.005)


def test_constant_and_replicate_borders_hold_no_mirrored_content():
    # A photo whose columns are all different (a ramp 20..219 in x): mirrored content is recognisable.
    photo = np.zeros((300, 200, 3), np.uint8)
    photo[:, :, 0] = 20 + np.arange(200)
    photo[:, :, 1] = (np.arange(300) % 200)[:, None]
    shift = np.array([[1.0, 0, 50], [0, 1.0, -20]])  # output columns 0..49 and 250..255 lie beyond the photo
    left, inside, right = slice(0, 50), slice(50, 250), slice(250, 256)
    faces = {b: warp_face(photo, shift, border=b) for b in fmt.BORDERS}
    for face in faces.values():  # the photo itself is the same whatever the border
        np.testing.assert_array_equal(face[:, inside], photo[20:276])
    # reflect paints the photo's columns 50..1 (mirrored) into the left strip
    np.testing.assert_array_equal(faces["reflect"][:, left, 0], photo[20:276, 50:0:-1, 0])
    # constant: black; replicate: the edge column repeated, nothing from inside the photo
    assert faces["constant"][:, left].max() == 0 and faces["constant"][:, right].max() == 0
    np.testing.assert_array_equal(faces["replicate"][:, left], np.repeat(photo[20:276, :1], 50, axis=1))
    np.testing.assert_array_equal(faces["replicate"][:, right], np.repeat(photo[20:276, -1:], 6, axis=1))
    for b in ("constant", "replicate"):  # no column of the photo but its edges appears outside it
        outside = faces[b][:, np.r_[0:50, 250:256], 0]
        assert set(np.unique(outside)) <= {0, 20, 219}, b


def test_large_photo_is_reduced_before_warping():
    # A 4x larger photo: pre-shrinking by area keeps a fine stripe pattern grey, not aliased.
    photo = np.zeros((2048, 2048, 3), np.uint8)
    photo[:, ::2] = 255  # 1-px stripes: averages to 127.5
    pts = transform_points(_similarity(0, 6.0, 300, 300), fmt.face_template())
    out, _ = align_face(photo, pts)
    assert abs(out.mean() - 127.5) < 3 and out.std() < 10


# --------------------------------------------------------------------------------------------
# Loading


def test_load_grayscale_cmyk_alpha_palette_16bit(tmp_path):
    g = tmp_path / "gray.jpg"
    Image.fromarray(np.full((30, 40), 100, np.uint8), "L").save(g)
    a = load_photo(g)
    assert a.shape == (30, 40, 3) and a.dtype == np.uint8 and (a[..., 0] == a[..., 2]).all()

    c = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (40, 30), (255, 0, 0, 0)).save(c, quality=95)  # pure cyan
    a = load_photo(c)
    assert a.shape == (30, 40, 3)
    r, gg, b = a.reshape(-1, 3).mean(0)
    assert r < 40 and gg > 215 and b > 215

    p = tmp_path / "alpha.png"
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., 0] = 255  # red, transparent on the left half
    rgba[:, 20:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(p)
    a = load_photo(p)
    assert a.shape == (30, 40, 3)
    assert a[0, 0].tolist() == [255, 255, 255] and a[0, 39].tolist() == [255, 0, 0]

    pal = Image.fromarray(np.arange(40, dtype=np.uint8).reshape(5, 8), "L").convert("P")
    q = tmp_path / "pal.gif"
    pal.save(q)
    assert load_photo(q).shape == (5, 8, 3)

    s = tmp_path / "sixteen.png"
    Image.fromarray(np.array([[0, 32896, 65535]], np.uint16)).save(s)
    assert load_photo(s)[0, :, 0].tolist() == [0, 128, 255]


def test_load_applies_exif_orientation(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:5, :5] = 255  # a white mark top-left of the stored pixels
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # Orientation: the viewer must turn the stored image 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif.tobytes(), quality=95)
    a = load_photo(path)
    assert a.shape == (40, 20, 3)
    # Stored top-left ends at the top-right after a clockwise turn.
    assert a[:5, -5:].mean() > 200 and a[:5, :5].mean() < 50


def test_broken_files_raise_photo_error_with_reason(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    jpeg = _encode(rgb, "JPEG")
    cases = {
        "half.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "half.png": (_encode(rgb, "PNG")[:3000], "truncated"),
        "empty.jpg": (b"", "empty-file"),
        "notes.jpg": (b"age,identity\n3,001\n", "not-an-image"),
        "header.jpg": (jpeg[:20], "unreadable"),
    }
    for name, (data, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(PhotoError) as e:
            load_photo(path)
        assert e.value.reason == reason, (name, e.value)
        assert name in str(e.value) and isinstance(e.value, ValueError)
    with pytest.raises(PhotoError) as e:
        load_photo(tmp_path / "absent.jpg")
    assert e.value.reason == "missing"
    with pytest.raises(PhotoError, match="bytes.jpg: truncated"):
        decode_photo(jpeg[:-100], "bytes.jpg")
    assert decode_photo(jpeg).shape == (64, 64, 3)
    # Errors cross process boundaries intact (the builder's workers send them back).
    back = pickle.loads(pickle.dumps(e.value))
    assert back.reason == "missing" and str(back) == str(e.value)
    assert str(pickle.loads(pickle.dumps(NoFaceError("x.jpg")))) == "x.jpg: no-face"


# --------------------------------------------------------------------------------------------
# Choosing among faces (no network)


def _faces(boxes, scores) -> Faces:
    boxes = np.asarray(boxes, np.float32)
    pts = np.zeros((len(boxes), 5, 2), np.float32)
    return Faces(boxes, np.asarray(scores, np.float32), pts)


def test_choose_face_rule():
    assert choose_face(Faces.empty(), (100, 100, 3)) == -1
    # Largest area x score wins even when off-centre.
    f = _faces([[0, 0, 20, 20], [50, 10, 150, 110]], [0.99, 0.95])
    assert choose_face(f, (200, 200, 3)) == 1
    # A big box with a poor score loses to a slightly smaller sure one.
    f = _faces([[0, 0, 100, 100], [100, 100, 190, 190]], [0.5, 0.99])
    assert choose_face(f, (200, 200, 3)) == 1
    # Near-tie (within 20 %): the one nearer the image centre.
    f = _faces([[0, 0, 100, 100], [60, 60, 155, 155]], [0.99, 0.99])
    assert choose_face(f, (200, 200, 3)) == 1


# --------------------------------------------------------------------------------------------
# Detection on real photos


@pytest.fixture(scope="module")
def detector():
    import torch

    torch.set_num_threads(1)  # the test machine is shared; one builder worker uses one thread
    return FaceDetector().warm_up()


def _fgnet_photo(stem: str) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 photo and its hand-marked five points (5, 2), FG-NET's own 68-point order."""
    if not (FGNET / "images").is_dir():
        pytest.skip(f"FG-NET not found at {FGNET} (set AGECL_FGNET)")
    text = (FGNET / "points" / f"{stem.lower()}.pts").read_text()
    p = np.array(text[text.index("{") + 1 : text.index("}")].split(), np.float64).reshape(68, 2)
    five = np.stack([p[27:31].mean(0), p[32:36].mean(0), p[67], p[48], p[54]])
    return load_photo(FGNET / "images" / f"{stem}.JPG"), five


def _nme(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.linalg.norm(pred - true, axis=1).mean() / np.linalg.norm(true[0] - true[1]))


@pytest.mark.fgnet
def test_fgnet_one_face_near_hand_marked_points(detector):
    loaded = [_fgnet_photo(s) for s in FGNET_PHOTOS]
    images = [im for im, _ in loaded]
    found = detector.detect(images)
    for stem, (im, truth), faces in zip(FGNET_PHOTOS, loaded, found):
        assert faces.count == 1, stem
        assert faces.boxes.dtype == faces.points.dtype == faces.scores.dtype == np.float32
        assert faces.points.shape == (1, 5, 2) and faces.scores[0] > 0.9
        assert _nme(faces.points[0], truth) < 0.1, stem
    results = align_batch(images, detector, names=list(FGNET_PHOTOS))
    template = fmt.face_template()
    for r in results:
        assert isinstance(r, AlignedFace) and r.image.shape == (256, 256, 3) and r.n_faces == 1
        # Residual of a five-point similarity fit: a few pixels at most.
        assert np.abs(r.points - template).max() < 12


@pytest.mark.fgnet
def test_fgnet_points_scale_with_the_photo(detector):
    im, _ = _fgnet_photo("046A10")
    big = cv2.resize(im, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    small_faces, big_faces = detector.detect([im, big])
    # Both reduce to nearly the same copy: the points map back to the same face, twice as far out.
    iod = np.linalg.norm(small_faces.points[0, 0] - small_faces.points[0, 1])
    err = np.linalg.norm((small_faces.points[0] + 0.5) * 2 - 0.5 - big_faces.points[0], axis=1)
    assert err.max() < 0.05 * 2 * iod


@pytest.mark.fgnet
def test_two_faces_and_blank_images(detector):
    a, _ = _fgnet_photo("046A10")
    b, _ = _fgnet_photo("063A18")
    h = 300
    a = cv2.resize(a, (round(a.shape[1] * h / a.shape[0]), h), interpolation=cv2.INTER_AREA)
    b = cv2.resize(b, (round(b.shape[1] * 0.6 * h / b.shape[0]), round(0.6 * h)), interpolation=cv2.INTER_AREA)
    pair = np.full((h, a.shape[1] + b.shape[1] + 20, 3), 128, np.uint8)
    pair[:, : a.shape[1]] = a
    pair[h - b.shape[0] :, a.shape[1] + 20 :] = b
    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    blank = np.full((240, 320, 3), 255, np.uint8)
    pair_faces, noise_faces, blank_faces = detector.detect([pair, noise, blank])
    assert pair_faces.count == 2
    k = choose_face(pair_faces, pair.shape)
    assert pair_faces.boxes[k, 2] < a.shape[1] + 10  # the bigger face, on the left
    assert noise_faces.count == 0 and blank_faces.count == 0
    assert noise_faces.points.shape == (0, 5, 2)
    # Images too small to hold a face give none (MTCNN itself would raise on an empty pyramid).
    tiny = [np.zeros((1, 1, 3), np.uint8), np.zeros((15, 30, 3), np.uint8)]
    assert [f.count for f in detector.detect(tiny)] == [0, 0]
    assert detector.detect([]) == []
    r_pair, r_noise = align_batch([pair, noise], detector, names=["pair.jpg", "noise.jpg"])
    assert isinstance(r_pair, AlignedFace) and r_pair.n_faces == 2
    assert isinstance(r_noise, Rejected) and r_noise.reason == "no-face" and "noise.jpg" in r_noise.message
    with pytest.raises(NoFaceError):
        align_photo(blank, detector)


@pytest.mark.fgnet
def test_files_and_pickled_detector(detector, tmp_path):
    src = FGNET / "images" / "001A02.JPG"
    if not src.is_file():
        pytest.skip(f"FG-NET not found at {FGNET}")
    (tmp_path / "cut.jpg").write_bytes(src.read_bytes()[:4000])
    detector.detect([load_photo(src)])  # build the network, then send the detector elsewhere
    copy = pickle.loads(pickle.dumps(detector))
    assert copy._nets == {} and copy.detect_size == detector.detect_size
    ok, cut = align_files([src, tmp_path / "cut.jpg"], copy)
    assert isinstance(ok, AlignedFace) and ok.n_faces == 1
    assert isinstance(cut, Rejected) and cut.reason == "truncated"
