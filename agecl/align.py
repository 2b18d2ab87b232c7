"""Photo loading, MTCNN face detection and the five-point similarity warp (offline path only).

The shard builder and `agecl-predict` call this module; the training path never imports it
(STYLE.md, "What agecl takes" 5). facenet-pytorch and torch are imported lazily inside
`FaceDetector`, so `import agecl.align` for `load_photo`, `align_face` or the template costs
only numpy, OpenCV and Pillow.

Coordinates are pixels, x to the right, y down, (0, 0) the centre of the top-left pixel.
Landmarks are in MTCNN's order (the order of `agecl.format.face_template`): image-left eye,
image-right eye, nose tip, image-left mouth corner, image-right mouth corner.

    photo file ──load_photo──> (H, W, 3) uint8 RGB
               ──FaceDetector.detect──> Faces (boxes, scores, points in the photo's pixels)
               ──choose_face──> one face
               ──align_face──> (256, 256, 3) uint8 + its five points in the aligned frame
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from agecl.format import DEFAULT_BORDER, DEFAULT_COVERAGE, IMAGE_SIZE, face_template

# Reject reasons, written to rejects.jsonl by the shard builder. PhotoError.reason is one of the
# first six; align_* adds NO_FACE.
REASON_MISSING = "missing"  # no such file
REASON_EMPTY = "empty-file"  # zero bytes
REASON_NOT_IMAGE = "not-an-image"  # no image format recognises the bytes
REASON_TRUNCATED = "truncated"  # a recognised image whose data ends early
REASON_UNREADABLE = "unreadable"  # an I/O error, or a decoder error that is not truncation
REASON_TOO_LARGE = "too-large"  # more pixels than Pillow's decompression-bomb limit
REASON_NO_FACE = "no-face"


class PhotoError(ValueError):
    """A photo that cannot become an RGB array. `reason` is a short machine-readable tag."""

    def __init__(self, source: str, reason: str, detail: str = ""):
        self.source = str(source)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{source}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # survives the trip back from a worker process
        return PhotoError, (self.source, self.reason, self.detail)


class NoFaceError(ValueError):
    """No face was found in a photo (reason "no-face")."""

    reason = REASON_NO_FACE

    def __init__(self, source: str = "<image>"):
        self.source = str(source)
        super().__init__(f"{source}: {REASON_NO_FACE}")

    def __reduce__(self):
        return NoFaceError, (self.source,)


# ---------------------------------------------------------------------------------------------
# Loading


def load_photo(path: Path | str) -> np.ndarray:
    """Read any common image file as (H, W, 3) uint8 RGB, EXIF orientation applied.

    Raises PhotoError (reason "missing", "empty-file", "not-an-image", "truncated", "unreadable"
    or "too-large") naming the file.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise PhotoError(path, REASON_MISSING) from None
    except OSError as e:  # a folder, no permission, an I/O error
        raise PhotoError(path, REASON_UNREADABLE, e.strerror or type(e).__name__) from e
    return decode_photo(data, str(path))


def decode_photo(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes as (H, W, 3) uint8 RGB; `name` is used in error messages."""
    if len(data) == 0:
        raise PhotoError(name, REASON_EMPTY)
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if data.startswith(_IMAGE_SIGNATURES):  # an image whose header does not parse
            raise PhotoError(name, REASON_UNREADABLE, "image header cut short or corrupt") from None
        raise PhotoError(name, REASON_NOT_IMAGE) from None
    except Image.DecompressionBombError as e:
        raise PhotoError(name, REASON_TOO_LARGE, str(e)) from None
    except (OSError, ValueError, SyntaxError) as e:  # a recognised header that does not parse
        raise PhotoError(name, REASON_UNREADABLE, str(e)) from None
    try:
        # Image.open is lazy: decoding (and so truncation) happens here. LOAD_TRUNCATED_IMAGES
        # stays False so that a cut file is an error, never a photo with a grey lower half.
        im.load()
    except Image.DecompressionBombError as e:
        raise PhotoError(name, REASON_TOO_LARGE, str(e)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        text = str(e)
        truncated = isinstance(e, EOFError) or "truncated" in text.lower() or "premature end" in text.lower()
        raise PhotoError(name, REASON_TRUNCATED if truncated else REASON_UNREADABLE, text) from None
    try:
        im = ImageOps.exif_transpose(im)  # a phone photo stored sideways is stood upright
        return _to_rgb(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise PhotoError(name, REASON_UNREADABLE, str(e)) from None


# Leading bytes of the formats Pillow reads: a file that starts like one but does not parse is a
# damaged image ("unreadable"), not some other kind of file ("not-an-image").
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8 RGB. Transparency is composited on white."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8).copy()
    if mode.startswith("I;16") or mode in ("I", "F"):
        # 16-bit (and 32-bit) grayscale: Pillow's convert("L") clips at 255 instead of scaling.
        a = np.asarray(im).astype(np.float64)  # (H, W)
        if mode == "F":
            top = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
        else:
            top = 65535.0 if mode.startswith("I;16") or (a.size and a.max() > 255) else 255.0
        g = np.clip(np.rint(np.nan_to_num(a) * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8).copy()
    # L, 1, P, CMYK (Adobe's inverted CMYK JPEGs are un-inverted by Pillow's decoder), YCbCr, LAB, HSV
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


# ---------------------------------------------------------------------------------------------
# Detection


@dataclass(frozen=True)
class Faces:
    """The faces found in one image, in that image's pixel coordinates."""

    boxes: np.ndarray  # (N, 4) float32 x1, y1, x2, y2
    scores: np.ndarray  # (N,) float32 MTCNN's O-Net probability
    points: np.ndarray  # (N, 5, 2) float32 (x, y), MTCNN's landmark order
    fallback: bool = False  # found by the second, full-resolution pass

    @property
    def count(self) -> int:
        return int(self.scores.shape[0])

    @staticmethod
    def empty(fallback: bool = False) -> "Faces":
        return Faces(
            np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32), fallback
        )


@dataclass
class FaceDetector:
    """MTCNN (facenet-pytorch) on a reduced copy of each image; results in the original's pixels.

    The network is built on first use and dropped when pickled, so a FaceDetector can be sent to
    worker processes: each builds its own MTCNN (2 MB of weights inside the package, milliseconds).

    detect_size: longest side, in pixels, of the copy MTCNN sees (smaller images are not
        enlarged). At 320 the first pass finds the face in 1,000 of FG-NET's 1,002 photos (the
        fallback finds the other two), landmarks as close to the hand-marked ones as at full
        resolution (NME 0.048; benchmarks/bench_align.py), about 0.05 CPU-s a photo.
    min_face: smallest face searched for, in pixels of that reduced copy. MTCNN's image pyramid
        starts at 12/min_face; 40 (an eighth of 320) drops the finest and costliest levels, which
        a one-subject photo never needs.
    margin: grey border added around the reduced copy on each side, as a fraction of its longest
        side. Close-ups whose face touches the frame (common in FG-NET) otherwise get boxes cut
        by the edge and landmarks off by a fifth of the eye distance; on a 101-photo sample 0.15
        took the 90th-percentile NME from 0.13 to 0.08 and the mean from 0.063 to 0.048, for
        1.7x the pixels.
    thresholds: P-Net, R-Net, O-Net score thresholds (MTCNN's defaults).
    fallback_size: images with no face are detected again on a copy of this longest side
        (0: no second pass), with min_face 20 and the lower fallback_thresholds: a small, blurred
        or tilted face gets a second chance at the cost of one more pass for those images only.
    batch_size: images per MTCNN call. Images are grouped by reduced size (equal sizes stack into
        one batch); see `pad`.
    pad: pad every reduced copy to one square so a whole list is one batch (pays on CUDA; on CPU
        it only adds pixels). None: pad on CUDA only.
    """

    device: str = "cpu"
    detect_size: int = 320
    min_face: int = 40
    margin: float = 0.15
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    factor: float = 0.709  # pyramid scale step (MTCNN's default)
    fallback_size: int = 800
    fallback_thresholds: tuple[float, float, float] = (0.5, 0.6, 0.6)
    batch_size: int = 32
    pad: bool | None = None
    _nets: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # The fields that change which faces are found and where (not the device or the batching):
    # a shard set records them, and a resumed build must use the same.
    RESULT_FIELDS = ("detect_size", "min_face", "thresholds", "factor", "fallback_size", "fallback_thresholds", "margin")

    def settings(self) -> dict:
        """JSON-ready settings that determine the detections (see RESULT_FIELDS)."""
        values = {k: getattr(self, k) for k in self.RESULT_FIELDS}
        return {"model": "MTCNN (facenet-pytorch)", **{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_nets"] = {}  # torch modules stay behind; the receiving process builds its own
        return state

    def _mtcnn(self, min_face: int, thresholds: Sequence[float]):
        key = (int(min_face), tuple(float(t) for t in thresholds))
        net = self._nets.get(key)
        if net is None:
            import torch  # lazy: importing agecl.align must not pay for torch
            from facenet_pytorch import MTCNN

            # keep_all: choose_face picks among the faces; select_largest=False keeps MTCNN's own
            # order rather than sorting by area (we sort nothing and rely on no order).
            net = MTCNN(
                min_face_size=key[0],
                thresholds=list(key[1]),
                factor=self.factor,
                keep_all=True,
                select_largest=False,
                device=torch.device(self.device),
            )
            net.eval()
            self._nets[key] = net
        return net

    def warm_up(self) -> "FaceDetector":
        """Build the networks of both passes and run each once, so a timed or first real call pays no setup."""
        grey = np.full((self.detect_size, self.detect_size, 3), 127, np.uint8)
        self._detect_at([grey], self.detect_size, self.min_face, self.thresholds)
        if self.fallback_size > 0:
            self._detect_at([grey], self.fallback_size, 20, self.fallback_thresholds)
        return self

    def detect(self, images: Sequence[np.ndarray]) -> list[Faces]:
        """Faces of each (H, W, 3) uint8 RGB image, in that image's pixels. Zero faces is not an error."""
        for img in images:
            _check_image(img)
        out = self._detect_at(images, self.detect_size, self.min_face, self.thresholds)
        if self.fallback_size > 0:
            retry = [i for i, f in enumerate(out) if f.count == 0]
            if retry:
                again = self._detect_at([images[i] for i in retry], self.fallback_size, 20, self.fallback_thresholds)
                for i, f in zip(retry, again):
                    out[i] = Faces(f.boxes, f.scores, f.points, fallback=True)
        return out

    def _detect_at(
        self, images: Sequence[np.ndarray], size: int, min_face: int, thresholds: Sequence[float]
    ) -> list[Faces]:
        net = self._mtcnn(min_face, thresholds)
        pad = self.device.startswith("cuda") if self.pad is None else self.pad
        canvases, geometry = [], []
        for img in images:
            small, scale = _reduce(img, size)
            m = int(round(self.margin * max(small.shape[:2])))
            if m:
                small = cv2.copyMakeBorder(small, m, m, m, m, cv2.BORDER_CONSTANT, value=(127, 127, 127))
            canvases.append(small)
            geometry.append((scale, m))
        if pad and canvases:
            side = max(max(c.shape[:2]) for c in canvases)
            canvases = [_pad_to(c, side) for c in canvases]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, c in enumerate(canvases):
            # A canvas narrower than min_face has an empty pyramid (MTCNN would raise): no face.
            if min(c.shape[:2]) >= min_face:
                groups.setdefault(c.shape[:2], []).append(i)
        out: list[Faces] = [Faces.empty()] * len(images)
        for members in groups.values():
            for k in range(0, len(members), self.batch_size):
                chunk = members[k : k + self.batch_size]
                batch = np.stack([canvases[i] for i in chunk])  # (B, h, w, 3) uint8
                boxes, probs, points = net.detect(batch, landmarks=True)
                for j, i in enumerate(chunk):
                    out[i] = _to_faces(boxes[j], probs[j], points[j], *geometry[i])
        return out


def _check_image(img: np.ndarray) -> None:
    if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3):
        raise TypeError(
            f"expected an (H, W, 3) uint8 RGB array, got {getattr(img, 'dtype', type(img).__name__)} "
            f"{getattr(img, 'shape', '')}"
        )


def _reduce(img: np.ndarray, size: int) -> tuple[np.ndarray, tuple[float, float]]:
    """A copy whose longest side is at most `size`, and the (x, y) factors back to the original."""
    h, w = img.shape[:2]
    r = size / max(h, w)
    if r >= 1.0:
        return np.ascontiguousarray(img), (1.0, 1.0)
    sw, sh = max(1, round(w * r)), max(1, round(h * r))
    # INTER_AREA averages: no aliasing for MTCNN to mistake for texture.
    return cv2.resize(img, (sw, sh), interpolation=cv2.INTER_AREA), (w / sw, h / sh)


def _pad_to(img: np.ndarray, side: int) -> np.ndarray:
    """Pad bottom and right with grey up to side x side: coordinates are unchanged."""
    h, w = img.shape[:2]
    if h == side and w == side:
        return img
    out = np.full((side, side, 3), 127, np.uint8)  # 127: about zero after MTCNN's normalisation
    out[:h, :w] = img
    return out


def _to_faces(boxes, probs, points, scale: tuple[float, float], margin: int) -> Faces:
    """One image's entries of MTCNN.detect -> Faces in the original image's pixels.

    MTCNN.detect returns object arrays, None (or [None]) for an image without faces.
    """
    if boxes is None or points is None:
        return Faces.empty()
    boxes = np.asarray(boxes)
    if boxes.dtype == object and any(b is None for b in boxes.ravel()):
        return Faces.empty()
    boxes = boxes.astype(np.float32).reshape(-1, 4)  # (N, 4)
    if boxes.shape[0] == 0:
        return Faces.empty()
    scores = np.asarray(probs).astype(np.float32).reshape(-1)  # (N,)
    points = np.asarray(points).astype(np.float32).reshape(-1, 5, 2)  # (N, 5, 2)
    # Undo the border, then the reduction. Pixel centres: reduced pixel i covers original
    # [i*s, (i+1)*s), whose centre is (i + 0.5)*s - 0.5.
    f = np.array(scale, np.float32)  # (2,) x, y
    boxes = ((boxes.reshape(-1, 2, 2) - margin + 0.5) * f - 0.5).reshape(-1, 4)
    points = (points - margin + 0.5) * f - 0.5
    return Faces(boxes.astype(np.float32), scores, points.astype(np.float32))


def choose_face(faces: Faces, image_shape: Sequence[int], tie: float = 0.2) -> int:
    """Index of the photo's subject among `faces`, -1 when there is none.

    Rule: the largest box area times detection score wins (a dataset photo's subject is the
    biggest, surest face; background faces are smaller). Faces whose weight is within `tie`
    (20 %) of the best are near-ties; among them the box centre nearest the image centre wins.
    """
    n = faces.count
    if n == 0:
        return -1
    b = faces.boxes.astype(np.float64)
    area = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    weight = area * faces.scores.astype(np.float64)
    near = np.flatnonzero(weight >= (1.0 - tie) * weight.max())
    if near.size == 1:
        return int(near[0])
    h, w = image_shape[:2]
    cx = (b[near, 0] + b[near, 2]) / 2 - (w - 1) / 2
    cy = (b[near, 1] + b[near, 3]) / 2 - (h - 1) / 2
    return int(near[np.argmin(cx * cx + cy * cy)])


# ---------------------------------------------------------------------------------------------
# Alignment


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(2, 3) float64 least-squares similarity (rotation, uniform scale, translation) src -> dst.

    Umeyama's closed form (1991), the estimator of skimage's SimilarityTransform: exact least
    squares over all points, deterministic, never a reflection. (cv2.estimateAffinePartial2D
    with LMEDS fits the same model robustly, but on five points it may drop a point as outlier.)
    """
    src = np.asarray(src, np.float64).reshape(-1, 2)  # (K, 2)
    dst = np.asarray(dst, np.float64).reshape(-1, 2)
    if src.shape != dst.shape or src.shape[0] < 2:
        raise ValueError(f"need matching point sets of at least 2 points, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    var_s = (s0 * s0).sum() / len(src)
    if not np.isfinite(var_s) or var_s <= 1e-12:
        raise ValueError("degenerate landmarks: all points coincide")
    cov = d0.T @ s0 / len(src)  # (2, 2)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0  # the best fit would mirror: take the best proper rotation instead
    rot = u @ np.diag(d) @ vt
    scale = (sig * d).sum() / var_s
    m = np.empty((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def alignment_matrix(points5: np.ndarray, size: int = IMAGE_SIZE, coverage: float = DEFAULT_COVERAGE) -> np.ndarray:
    """(2, 3) float64 matrix taking a photo's five landmarks onto `face_template(size, coverage)`."""
    return similarity_transform(points5, face_template(size, coverage))


_BORDERS = {"reflect": cv2.BORDER_REFLECT_101, "replicate": cv2.BORDER_REPLICATE, "constant": cv2.BORDER_CONSTANT}


def warp_face(image: np.ndarray, matrix: np.ndarray, size: int = IMAGE_SIZE, border: str = DEFAULT_BORDER) -> np.ndarray:
    """Apply a (2, 3) photo->face matrix to an (H, W, 3) uint8 photo: (size, size, 3) uint8, bilinear.

    border: what fills the frame beyond the photo's edge (format.BORDERS). "reflect" (the default)
    mirrors the photo; "replicate" smears its edge pixels; "constant" is black, as insightface's
    norm_crop, Paplham & Franc's benchmark and deepface pad. Black wedges survive the training crop
    as a sharp mark of how tightly the source photo was framed (FG-NET's adult photos are tight
    crops, its children's are not), a cue for age that is not in the face; reflection instead
    paints mirrored eyes and half-faces into tight crops. Which costs less MAE is measured, not
    assumed (issue 10). `AlignedFace.outside` records how much of the frame was filled.
    """
    _check_image(image)
    m = np.asarray(matrix, np.float64).reshape(2, 3)
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    if scale < 0.5:
        # Shrinking more than 2x with bilinear sampling aliases (it skips pixels): first reduce
        # the photo by area averaging to the output's scale, then warp at about unit scale.
        h, w = image.shape[:2]
        sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
        image = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
        kx, ky = sw / w, sh / h
        # reduced u = k * (x + 0.5) - 0.5  =>  x = (u + 0.5) / k - 0.5
        back = np.array([[1 / kx, 0, 0.5 / kx - 0.5], [0, 1 / ky, 0.5 / ky - 0.5], [0, 0, 1]])
        m = m @ back
    mode = _BORDERS.get(border)
    if mode is None:
        raise ValueError(f"border must be one of {sorted(_BORDERS)}, got {border!r}")
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=mode, borderValue=(0, 0, 0))


def outside_share(matrix: np.ndarray, image_shape: Sequence[int], size: int = IMAGE_SIZE) -> float:
    """Share (0..1) of the size x size aligned frame that lies beyond the photo's edge (border fill)."""
    h, w = image_shape[:2]
    photo = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [w - 0.5, h - 0.5], [-0.5, h - 0.5]], np.float32)
    quad = transform_points(matrix, photo)  # (4, 2) the photo's outline in the aligned frame
    frame = np.array([[-0.5, -0.5], [size - 0.5, -0.5], [size - 0.5, size - 0.5], [-0.5, size - 0.5]], np.float32)
    inside, _ = cv2.intersectConvexConvex(quad, frame)
    return float(np.clip(1.0 - inside / float(size * size), 0.0, 1.0))


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(K, 2) float32 points mapped by a (2, 3) matrix."""
    p = np.asarray(points, np.float64).reshape(-1, 2)
    m = np.asarray(matrix, np.float64).reshape(2, 3)
    return (p @ m[:, :2].T + m[:, 2]).astype(np.float32)


def align_face(
    image: np.ndarray, points5: np.ndarray, size: int = IMAGE_SIZE, coverage: float = DEFAULT_COVERAGE,
    border: str = DEFAULT_BORDER,
) -> tuple[np.ndarray, np.ndarray]:
    """Warp a photo so its five landmarks land on the template.

    image (H, W, 3) uint8 RGB, points5 (5, 2) in MTCNN's order. Returns the aligned face
    (size, size, 3) uint8 and its five landmarks in the aligned frame (5, 2) float32 (on the
    template up to the fit's residual). `alignment_matrix` gives the matrix itself.
    """
    m = alignment_matrix(points5, size, coverage)
    return warp_face(image, m, size, border), transform_points(m, points5)


# ---------------------------------------------------------------------------------------------
# Photos in, aligned faces or reject reasons out: what the shard builder calls


@dataclass
class AlignedFace:
    """One photo's subject, aligned. Everything the shard builder stores beside the JPEG."""

    image: np.ndarray  # (size, size, 3) uint8 RGB
    points: np.ndarray  # (5, 2) float32 landmarks in the aligned frame
    matrix: np.ndarray  # (2, 3) float64 photo -> aligned frame
    box: np.ndarray  # (4,) float32 x1, y1, x2, y2 in the photo
    score: float  # MTCNN's probability of the chosen face
    n_faces: int  # faces found in the photo (several: recorded, not rejected)
    photo_points: np.ndarray  # (5, 2) float32 landmarks in the photo
    outside: float  # share of the aligned frame beyond the photo's edge, filled by the border
    fallback: bool = False  # found only by FaceDetector's second pass


@dataclass
class Rejected:
    """A photo that did not become a sample: `reason` as in rejects.jsonl, and a message."""

    reason: str
    message: str
    n_faces: int = 0


def align_detected(
    image: np.ndarray, faces: Faces, size: int = IMAGE_SIZE, coverage: float = DEFAULT_COVERAGE,
    name: str = "<image>", border: str = DEFAULT_BORDER,
) -> AlignedFace | Rejected:
    """Choose the subject among `faces` (found in `image`) and align it; Rejected when there is none."""
    k = choose_face(faces, image.shape)
    if k < 0:
        return Rejected(REASON_NO_FACE, str(NoFaceError(name)))
    try:
        m = alignment_matrix(faces.points[k], size, coverage)
    except ValueError as e:  # landmarks collapsed onto one point: not a usable face
        return Rejected(REASON_NO_FACE, f"{name}: {REASON_NO_FACE} ({e})", faces.count)
    return AlignedFace(
        image=warp_face(image, m, size, border),
        points=transform_points(m, faces.points[k]),
        matrix=m,
        box=faces.boxes[k].copy(),
        score=float(faces.scores[k]),
        n_faces=faces.count,
        photo_points=faces.points[k].copy(),
        outside=outside_share(m, image.shape, size),
        fallback=faces.fallback,
    )


def align_batch(
    images: Sequence[np.ndarray], detector: FaceDetector, size: int = IMAGE_SIZE,
    coverage: float = DEFAULT_COVERAGE, names: Sequence[str] | None = None, border: str = DEFAULT_BORDER,
) -> list[AlignedFace | Rejected]:
    """Detect (one batched pass), choose and align the subject of each photo: AlignedFace or Rejected."""
    names = names if names is not None else [f"<image {i}>" for i in range(len(images))]
    return [
        align_detected(img, faces, size, coverage, name, border)
        for img, faces, name in zip(images, detector.detect(images), names)
    ]


def align_photo(
    image: np.ndarray, detector: FaceDetector, size: int = IMAGE_SIZE, coverage: float = DEFAULT_COVERAGE,
    name: str = "<image>", border: str = DEFAULT_BORDER,
) -> AlignedFace:
    """Align the subject of one photo. Raises NoFaceError when there is none."""
    (r,) = align_batch([image], detector, size, coverage, [name], border)
    if isinstance(r, Rejected):
        raise NoFaceError(name)
    return r


def align_files(
    paths: Sequence[Path | str], detector: FaceDetector, size: int = IMAGE_SIZE,
    coverage: float = DEFAULT_COVERAGE, border: str = DEFAULT_BORDER,
) -> list[AlignedFace | Rejected]:
    """load_photo + align_batch over files; unreadable files become Rejected with PhotoError's reason."""
    out: list[AlignedFace | Rejected | None] = [None] * len(paths)
    images, where = [], []
    for i, p in enumerate(paths):
        try:
            images.append(load_photo(p))
            where.append(i)
        except PhotoError as e:
            out[i] = Rejected(e.reason, str(e))
    named = [os.fspath(paths[i]) for i in where]
    for i, r in zip(where, align_batch(images, detector, size, coverage, named, border)):
        out[i] = r
    return out  # type: ignore[return-value]
