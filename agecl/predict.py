"""Photos in, faces found, aligned, ages out: `AgePredictor` and the `agecl-predict` command line.

Every face of every photo goes through the path a training sample took, with the settings read
from the checkpoint, so that the network sees what it was trained on:

    photo ──load_photo──> (H, W, 3) uint8 RGB, EXIF orientation applied
          ──FaceDetector.detect──> every face: box, score, five landmarks (MTCNN, as the builder)
          ──align_face──> (T, T, 3) uint8, T, coverage and border = the checkpoint's "template"
          ──centre crop──> (S, S, 3), S = config["loader"]["image_size"] (the evaluation crop)
          ──normalise──> (x / 255 - IMAGENET_MEAN) / IMAGENET_STD, (B, 3, S, S) float32
          ──AgeModel──> s = softmax(logits) ──> age = min_age + sum_j j s_j, std = sqrt(var s)

One difference from evaluation on shards remains, and it is small: shard faces were JPEG-encoded
(quality 95) and decoded again before the crop. The crop offset is `centre_crop_offset` (the
evaluation loaders' centre crop).

Many photos are processed in groups (`photo_batch`): the group is decoded, detected in one
batched MTCNN pass, every face aligned, and the faces run through the model in batches of
`batch_size`, on the GPU when there is one. A photo that cannot be read or has no face becomes a
`FaceAge` with `error` set (a reason tag of `agecl.align`) and never stops the run.

Exit codes of `agecl-predict`: 0 when at least one face got an age; 1 when none did (no photos,
or every photo unreadable or faceless); 2 on a usage error or an unusable checkpoint; 130 when
interrupted.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from agecl.align import (
    REASON_NO_FACE,
    FaceDetector,
    Faces,
    PhotoError,
    align_face,
    load_photo,
)
from agecl.atomic import EXIT_DISK_FULL, disk_full_message
from agecl.checkpoint import CheckpointError, load_model
from agecl.datasets import PHOTO_EXTENSIONS  # the suffixes (lower-cased) a folder walk picks up
from agecl.evaluate import TTA_MODES
from agecl.format import template_border
from agecl.model import IMAGENET_MEAN, IMAGENET_STD

PROGRESS_MIN_PHOTOS = 8  # more photos than this get a progress bar
REASON_BAD_LANDMARKS = "bad-landmarks"  # MTCNN landmarks that collapse onto a point: not alignable
REASON_DETECT_FAILED = "detection-failed"  # MTCNN raised on the image (e.g. a few pixels wide)


# --- Records -------------------------------------------------------------------------------------


@dataclass
class FaceAge:
    """One face's predicted age, or one photo's failure (then `error` is set and `face` is None).

    box is (x1, y1, x2, y2) in the photo's pixels after EXIF rotation; faces of a photo are
    numbered left to right (by box x1). `aligned` (T, T, 3) uint8 is kept only on request.
    """

    photo: str
    face: int | None = None
    box: tuple[float, float, float, float] | None = None
    score: float | None = None  # MTCNN's face probability
    age: float | None = None  # expected age, years, not rounded
    std: float | None = None  # standard deviation of the predicted age distribution, years
    error: str | None = None  # reason tag: "missing", "not-an-image", "no-face", ... (agecl.align), or
    # "bad-landmarks" / "detection-failed" (this module)
    message: str | None = None  # human-readable error, naming the file
    aligned: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def record(self) -> dict:
        """JSON-ready dict: photo, face, box [x1, y1, x2, y2], score, age, std, error, message."""
        r2 = lambda v, d: None if v is None else round(float(v), d)  # noqa: E731
        return {
            "photo": self.photo,
            "face": self.face,
            "box": None if self.box is None else [r2(v, 1) for v in self.box],
            "score": r2(self.score, 4),
            "age": r2(self.age, 2),
            "std": r2(self.std, 2),
            "error": self.error,
            "message": self.message,
        }


# --- Devices and files ---------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when a GPU is visible, else cpu. ValueError for an unusable request."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA GPU is visible")
    return torch.device(name)


def find_photos(inputs: Iterable[Path | str]) -> tuple[list[Path], list[Path]]:
    """Expand files and folders into photo paths; returns (photos, base of each photo).

    A folder is walked recursively for files whose suffix is in PHOTO_EXTENSIONS (any case),
    sorted, skipping hidden files and folders (names starting with '.'). A file named directly
    is taken whatever its suffix (a non-image is reported as such later), and so is a path that
    does not exist (reported as missing). The base of a photo is
    the folder argument it was found under, or its own parent; `--annotate` mirrors paths
    relative to it.
    """
    photos, bases = [], []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in filenames:
                    if not name.startswith(".") and Path(name).suffix.lower() in PHOTO_EXTENSIONS:
                        found.append(Path(dirpath) / name)
            found.sort()
            photos += found
            bases += [p] * len(found)
        else:
            photos.append(p)
            bases.append(p.parent)
    return photos, bases


def centre_crop_offset(size: int, crop: int) -> int:
    """Offset (x and y, pixels) of the centre `crop` square in a `size` square.

    torchvision's CenterCrop convention (the torch evaluation loader's): round((size - crop) / 2).
    DALI's crop_pos 0.5 gives the same offset whenever size - crop is even (256 / 224: 16).
    """
    return int(round((size - crop) / 2.0))


# --- The predictor -------------------------------------------------------------------------------


class AgePredictor:
    """A trained checkpoint ready to age faces: detection, alignment, crop, model, on one device.

    checkpoint: path of an agecl checkpoint (`runs/<name>/checkpoint.pt`).
    device: "auto" (cuda when present) | "cpu" | "cuda" | "cuda:N"; the detector runs there too.
    tta: "none" or "flip" (average the age distributions of each face and its horizontal mirror);
        None: the checkpoint's `test_tta`, the choice its tests were scored with.
    batch_size: aligned faces per forward pass. photo_batch: photos decoded and detected together.
    workers: threads decoding photos ahead of detection (0: decode in the calling thread).
    detector: a `FaceDetector` to use instead of the builder's defaults (e.g. a larger
        `detect_size` for group photos with small faces).
    """

    def __init__(
        self,
        checkpoint: Path | str,
        device: str | torch.device = "auto",
        *,
        tta: str | None = None,
        batch_size: int = 64,
        photo_batch: int = 16,
        workers: int = 2,
        detector: FaceDetector | None = None,
    ):
        if tta is not None and tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
        if batch_size < 1 or photo_batch < 1:
            raise ValueError(f"batch_size and photo_batch must be at least 1, got {batch_size}, {photo_batch}")
        self.device = resolve_device(device)
        self.model, self.info = load_model(checkpoint, self.device)
        self.checkpoint = str(checkpoint)
        self.min_age, self.max_age = int(self.info["min_age"]), int(self.info["max_age"])
        self.template_size = int(self.info["template"]["size"])  # T: side of the aligned face
        self.coverage = float(self.info["template"]["coverage"])
        self.border = template_border(self.info["template"])  # what the shards filled beyond a photo's edge
        self.crop_size = int(self.info["config"].get("loader", {}).get("image_size", self.template_size))  # S
        if not 0 < self.crop_size <= self.template_size:
            raise CheckpointError(
                f"{checkpoint}: crop size {self.crop_size} does not fit the {self.template_size}-pixel aligned face"
            )
        self.crop_offset = centre_crop_offset(self.template_size, self.crop_size)
        self.tta = self.info["config"].get("test_tta", "none") if tta is None else tta
        self.batch_size = int(batch_size)
        self.photo_batch = int(photo_batch)
        self.workers = max(0, int(workers))
        self.detector = detector if detector is not None else FaceDetector(device=str(self.device))
        # (1, 3, 1, 1) on the device, on the 0..255 scale: uint8 crops are normalised there.
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255.0
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)

    # -- Tensors ----------------------------------------------------------------------------------

    def preprocess(self, faces: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, T, T, 3) uint8 aligned faces -> (N, 3, S, S) float32 normalised centre crops on the device."""
        if faces.ndim != 4 or tuple(faces.shape[1:]) != (self.template_size, self.template_size, 3):
            raise ValueError(
                f"expected aligned faces (N, {self.template_size}, {self.template_size}, 3) uint8, "
                f"got {tuple(faces.shape)}"
            )
        o, s = self.crop_offset, self.crop_size
        crop = faces[:, o : o + s, o : o + s]  # (N, S, S, 3) uint8: crop on the host, copy fewer bytes
        if isinstance(crop, np.ndarray):
            if crop.dtype != np.uint8:
                raise ValueError(f"expected uint8 faces, got {crop.dtype}")
            crop = torch.from_numpy(np.ascontiguousarray(crop))
        # uint8 travels to the device; the float conversion happens there (a quarter of the bytes).
        x = crop.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()  # (N, 3, S, S), channels_last
        return (x - self._mean) / self._std

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(N, A) float32 age distributions of normalised crops (N, 3, S, S).

        Under tta "flip" the mean of the face's and its mirror's distributions: the age and std
        reported are then those of that mixture.
        """
        _, logits = self.model(x)  # (N, A)
        s = F.softmax(logits.float(), dim=-1)
        if self.tta == "flip":
            _, logits_m = self.model(x.flip(-1))  # the horizontal mirror: the template is near symmetric
            s = 0.5 * (s + F.softmax(logits_m.float(), dim=-1))
        return s

    def predict_aligned(self, faces: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Ages of aligned faces (N, T, T, 3) uint8: (expected ages (N,), stds (N,)) float32, years."""
        n = int(faces.shape[0])
        if n == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        idx = torch.arange(self.max_age - self.min_age + 1, dtype=torch.float32, device=self.device)  # (A,)
        ages, stds = [], []
        with torch.inference_mode():
            for k in range(0, n, self.batch_size):
                s = self.probabilities(self.preprocess(faces[k : k + self.batch_size]))  # (B, A)
                m = (s * idx).sum(-1)  # (B,) mean class index
                var = (s * (idx - m[:, None]) ** 2).sum(-1)  # (B,) years^2
                ages.append(m + self.min_age)
                stds.append(var.clamp_min(0).sqrt())
        # The one device-to-host copy (a sync point), after every batch is queued.
        return torch.cat(ages).cpu().numpy(), torch.cat(stds).cpu().numpy()

    # -- Photos -----------------------------------------------------------------------------------

    def align_all(
        self, image: np.ndarray, faces: Faces, name: str = "<image>"
    ) -> tuple[list[FaceAge], list[np.ndarray]]:
        """Align every detected face of one photo, left to right: (FaceAge records without ages, faces)."""
        records, aligned = [], []
        order = np.lexsort((faces.boxes[:, 1], faces.boxes[:, 0])) if faces.count else []  # by x1, then y1
        for k in order:
            try:
                face, _ = align_face(image, faces.points[k], self.template_size, self.coverage, self.border)  # (T, T, 3)
            except ValueError:  # landmarks on one point: MTCNN's rare degenerate output
                continue
            box = tuple(float(v) for v in faces.boxes[k])
            records.append(FaceAge(name, len(records), box, float(faces.scores[k])))  # type: ignore[arg-type]
            aligned.append(face)
        if not records:
            reason = REASON_NO_FACE if faces.count == 0 else REASON_BAD_LANDMARKS
            return [FaceAge(name, error=reason, message=f"{name}: {reason}")], []
        return records, aligned

    def _detect(self, images: list[np.ndarray]) -> list[Faces | str]:
        """Faces of each image; an image MTCNN fails on gets its error text instead.

        One batched pass; when it raises (MTCNN fails on images of a few pixels; CUDA may run out
        of memory on a large group), each image is detected alone so that only the bad one fails.
        """
        try:
            return self.detector.detect(images)
        except (ValueError, RuntimeError) as e:
            if len(images) == 1:
                return [f"{REASON_DETECT_FAILED} ({type(e).__name__}: {e})"]
            return [self._detect([image])[0] for image in images]

    def predict_images(
        self, images: Sequence[np.ndarray], names: Sequence[str] | None = None, keep_aligned: bool = False
    ) -> list[list[FaceAge]]:
        """Ages of every face of (H, W, 3) uint8 RGB images: one list of FaceAge per image.

        An image without a face gets one FaceAge with error "no-face". Detection is one batched
        pass over `images`; the aligned faces of all of them share the model's batches.
        """
        names = list(names) if names is not None else [f"<image {i}>" for i in range(len(images))]
        per_image: list[list[FaceAge]] = []
        todo: list[FaceAge] = []
        stack: list[np.ndarray] = []
        for image, faces, name in zip(images, self._detect(list(images)), names):
            if isinstance(faces, str):
                per_image.append([FaceAge(name, error=REASON_DETECT_FAILED, message=f"{name}: {faces}")])
                continue
            records, aligned = self.align_all(image, faces, name)
            per_image.append(records)
            if aligned:
                todo += records
                stack += aligned
        if stack:
            batch = np.stack(stack)  # (F, T, T, 3) uint8, every face of every image
            ages, stds = self.predict_aligned(batch)
            for i, r in enumerate(todo):
                r.age, r.std = float(ages[i]), float(stds[i])
                if keep_aligned:
                    r.aligned = batch[i]
        return per_image

    def iter_photos(
        self, paths: Sequence[Path | str], keep_aligned: bool = False
    ) -> Iterator[tuple[str, np.ndarray | None, list[FaceAge]]]:
        """Yield (path, decoded image or None, its FaceAge records) for each photo, in order.

        Photos are handled `photo_batch` at a time; a photo that cannot be read yields image None
        and one FaceAge whose `error` is `PhotoError.reason`. With `workers` > 0, threads decode
        the next group while this one is detected and aged (Pillow and OpenCV release the GIL).
        """
        groups = [[str(p) for p in paths[k : k + self.photo_batch]] for k in range(0, len(paths), self.photo_batch)]
        pool = ThreadPoolExecutor(self.workers) if self.workers > 0 and groups else None
        submit = (lambda g: pool.map(_load, g)) if pool is not None else (lambda g: map(_load, g))  # noqa: E731
        try:
            pending = submit(groups[0]) if groups else None
            for j, group in enumerate(groups):
                loaded = list(pending)  # (H, W, 3) uint8 arrays or FaceAge errors
                if j + 1 < len(groups):
                    pending = submit(groups[j + 1])  # decode ahead
                ok = [i for i, x in enumerate(loaded) if isinstance(x, np.ndarray)]
                results = self.predict_images([loaded[i] for i in ok], [group[i] for i in ok], keep_aligned)
                by_index = dict(zip(ok, results))
                for i, p in enumerate(group):
                    if i in by_index:
                        yield p, loaded[i], by_index[i]
                    else:
                        yield p, None, [loaded[i]]
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def predict_photos(self, paths: Sequence[Path | str], keep_aligned: bool = False) -> list[FaceAge]:
        """Ages of every face in each photo file: a flat list of FaceAge, photos in order.

        Unreadable and faceless photos give one FaceAge each with `error` set; nothing raises.
        """
        return [r for _, _, records in self.iter_photos(paths, keep_aligned) for r in records]


def _load(path: str) -> np.ndarray | FaceAge:
    """load_photo, with a PhotoError turned into the photo's FaceAge record."""
    try:
        return load_photo(path)
    except PhotoError as e:
        return FaceAge(path, error=e.reason, message=str(e))


# --- Output --------------------------------------------------------------------------------------

CSV_FIELDS = ("photo", "face", "x1", "y1", "x2", "y2", "score", "age", "std", "error", "message")


class RecordWriter:
    """Streams records as a table (default), one JSON document (a list of records) or CSV."""

    def __init__(self, out: IO[str], kind: str = "table", photo_width: int = 24):
        self.out, self.kind, self.count = out, kind, 0
        self.width = max(5, min(photo_width, 80))
        if kind == "csv":
            self._csv = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
            self._csv.writeheader()
        elif kind == "json":
            out.write("[")
        elif kind == "table":
            out.write(
                f"{'photo':<{self.width}}  {'face':>4}  {'x1':>6} {'y1':>6} {'x2':>6} {'y2':>6}  "
                f"{'score':>5}  {'age':>6}  {'std':>5}\n"
            )
        else:
            raise ValueError(f"unknown output kind {kind!r}")

    def write(self, records: Iterable[FaceAge]) -> None:
        for r in records:
            d = r.record()
            if self.kind == "json":
                self.out.write(("\n" if self.count == 0 else ",\n") + json.dumps(d))
            elif self.kind == "csv":
                box = d.pop("box") or [None] * 4
                self._csv.writerow({**d, **dict(zip(("x1", "y1", "x2", "y2"), box))})
            else:
                self.out.write(self._row(r) + "\n")
            self.count += 1
        self.out.flush()

    def _row(self, r: FaceAge) -> str:
        photo = r.photo if len(r.photo) <= self.width else "..." + r.photo[-(self.width - 3) :]
        if not r.ok:
            # The message starts with the photo's path, already in the first column.
            detail = (r.message or "").removeprefix(f"{r.photo}: ")
            return f"{photo:<{self.width}}  {'-':>4}  {detail or r.error}"
        x1, y1, x2, y2 = r.box  # type: ignore[misc]
        return (
            f"{photo:<{self.width}}  {r.face:>4}  {x1:>6.0f} {y1:>6.0f} {x2:>6.0f} {y2:>6.0f}  "
            f"{r.score:>5.3f}  {r.age:>6.1f}  {r.std:>5.1f}"
        )

    def close(self) -> None:
        if self.kind == "json":
            self.out.write("\n]\n" if self.count else "]\n")
        self.out.flush()


# --- Annotation ----------------------------------------------------------------------------------

_SAVE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
                 ".webp": "WEBP"}


def annotation_path(photo: Path, base: Path, out_dir: Path) -> Path:
    """Where the annotated copy of `photo` goes: its path relative to `base`, under `out_dir`.

    The suffix is kept when Pillow writes that format, else ".png" is appended.
    """
    try:
        rel = photo.resolve().relative_to(base.resolve())
    except ValueError:
        rel = Path(photo.name)
    if rel.suffix.lower() not in _SAVE_FORMATS:
        rel = rel.with_name(rel.name + ".png")
    return out_dir / rel


def draw_ages(image: np.ndarray, records: Sequence[FaceAge]):
    """A PIL image of `image` (H, W, 3) uint8 RGB with each face's box and "age ±std" drawn on it."""
    from PIL import Image, ImageDraw, ImageFont

    im = Image.fromarray(image)
    draw = ImageDraw.Draw(im)
    h, w = image.shape[:2]
    line = max(2, round(min(h, w) / 250))
    size = max(12, round(min(h, w) / 30))
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        font = ImageFont.load_default()
    colour = (255, 64, 32)
    for r in records:
        if not r.ok:  # a photo that was read but gave no face: say so in its corner
            draw.text((line * 2, line * 2), r.error, fill=colour, font=font)
            continue
        x1, y1, x2, y2 = r.box  # type: ignore[misc]
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        label = f"{r.age:.1f} ±{r.std:.1f}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        tw, th = right - left, bottom - top
        ty = y1 - th - 3 * line if y1 - th - 3 * line >= 0 else y2 + line  # above the box, else below
        draw.rectangle((x1, ty, x1 + tw + 2 * line, ty + th + 2 * line), fill=colour)
        draw.text((x1 + line - left, ty + line - top), label, fill=(255, 255, 255), font=font)
    return im


def save_annotated(image: np.ndarray, records: Sequence[FaceAge], path: Path) -> None:
    """Write `draw_ages(image, records)` to `path` (format from its suffix), atomically."""
    import io

    from agecl.atomic import write_bytes

    im = draw_ages(image, records)
    fmt = _SAVE_FORMATS.get(path.suffix.lower(), "PNG")
    # Encoded in memory, then written by Python: Pillow's encoder ignores a short write to a file
    # (a full disk left a truncated image behind), Python's raises.
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 92} if fmt in ("JPEG", "WEBP") else {}))
    write_bytes(path, buf.getvalue())


# --- Command line --------------------------------------------------------------------------------

EXAMPLES = """\
output:
  table (default) one row per face; --json one JSON document, a list of records
  {"photo", "face", "box": [x1, y1, x2, y2], "score", "age", "std", "error", "message"};
  --csv the same fields with the box as x1, y1, x2, y2 columns. Boxes are in the photo's pixels
  (after EXIF rotation); faces are numbered left to right. A photo that cannot be read or has no
  face is one record with "error" set (missing, empty-file, not-an-image, truncated, unreadable,
  too-large, no-face, bad-landmarks, detection-failed) and no age; a summary goes to stderr.

exit status:
  0 at least one face got an age; 1 no face got an age (no photos, or all unreadable or
  faceless); 2 bad arguments or an unusable checkpoint; 75 out of disk space writing --annotate
  or -o (the message names the file: free space and run the same command again); 130
  interrupted. --debug shows tracebacks.

examples:
  agecl-predict photo.jpg --checkpoint runs/fgnet/checkpoint.pt
  agecl-predict album/ --checkpoint C --csv -o ages.csv --annotate annotated/
  agecl-predict group.jpg --checkpoint C --detect-size 1024 --min-face 20 --tta flip
"""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agecl-predict",
        description="Find every face in photos, align it as training did, and predict its age "
        "(expected value and standard deviation of the model's age distribution).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="PHOTO_OR_FOLDER",
                   help="photo files, or folders walked recursively for " + ", ".join(sorted(PHOTO_EXTENSIONS)))
    p.add_argument("--checkpoint", required=True, help="trained model, e.g. runs/<name>/checkpoint.pt")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--json", action="store_true", help="one JSON document: a list of records")
    kind.add_argument("--csv", action="store_true", help="CSV with a header row")
    p.add_argument("-o", "--output", help="write the results to this file instead of stdout")
    p.add_argument("--annotate", metavar="DIR", help="write each photo with boxes and ages drawn on it under DIR")
    p.add_argument("--tta", choices=TTA_MODES,
                   help="evaluation-time augmentation: flip averages the distributions of the face and its mirror "
                   "(default: the checkpoint's test_tta)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: cuda when there is a GPU)")
    p.add_argument("--batch-size", type=int, default=64, help="faces per forward pass (default %(default)s)")
    p.add_argument("--photo-batch", type=int, default=16,
                   help="photos decoded and detected together (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="photo decoding threads (default %(default)s)")
    p.add_argument("--detect-size", type=int, default=320,
                   help="longest side of the copy MTCNN sees (default %(default)s, the shard builder's; raise it "
                   "for group photos with small faces)")
    p.add_argument("--min-face", type=int, default=40,
                   help="smallest face searched, pixels of that copy (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary on stderr")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of its message")
    return p


def _summary(n_photos: int, faces: int, aged_photos: int, failures: Counter) -> str:
    text = f"agecl-predict: {n_photos} photo(s), {faces} face(s) aged in {aged_photos} photo(s)"
    if failures:
        text += "; skipped " + ", ".join(f"{n} {reason}" for reason, n in sorted(failures.items()))
    return text


def run(args: argparse.Namespace) -> int:
    """Run the command with parsed options; returns the exit status (see the module docstring)."""
    from tqdm import tqdm

    for name, lo in (("batch_size", 1), ("photo_batch", 1), ("min_face", 1), ("workers", 0)):
        if getattr(args, name) < lo:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {lo}, got {getattr(args, name)}")
    if args.detect_size < 32:
        raise ValueError(f"--detect-size must be at least 32, got {args.detect_size}")
    photos, bases = find_photos(args.inputs)
    for item in args.inputs:
        if Path(item).is_dir() and not any(b == Path(item) for b in bases):
            print(f"agecl-predict: {item}: no photo files in this folder", file=sys.stderr)
    device = resolve_device(args.device)
    detector = FaceDetector(device=str(device), detect_size=args.detect_size, min_face=args.min_face)
    predictor = AgePredictor(
        args.checkpoint, device, tta=args.tta, batch_size=args.batch_size, photo_batch=args.photo_batch,
        workers=args.workers, detector=detector,
    )
    kind = "json" if args.json else "csv" if args.csv else "table"
    out = open(args.output, "w", newline="") if args.output else sys.stdout
    writer = RecordWriter(out, kind, photo_width=max((len(str(p)) for p in photos), default=5))
    annotate = Path(args.annotate) if args.annotate else None
    used_names: set[Path] = set()
    faces = aged_photos = 0
    failures: Counter = Counter()
    bar = tqdm(total=len(photos), unit="photo", file=sys.stderr, dynamic_ncols=True,
               disable=args.quiet or len(photos) <= PROGRESS_MIN_PHOTOS)
    try:
        for (path, image, records), photo, base in zip(predictor.iter_photos(photos), photos, bases):
            writer.write(records)
            ok = [r for r in records if r.ok]
            faces += len(ok)
            aged_photos += bool(ok)
            for r in records:
                if not r.ok:
                    failures[r.error] += 1
            if annotate is not None and image is not None:
                target = annotation_path(photo, base, annotate)
                stem, n = target, 1
                while target in used_names:  # two inputs mapping to one name (files from two folders)
                    target = stem.with_name(f"{stem.stem}-{n}{stem.suffix}")
                    n += 1
                used_names.add(target)
                save_annotated(image, records, target)
            bar.update(1)
    finally:
        bar.close()
        writer.close()
        if out is not sys.stdout:
            out.close()
    if not args.quiet:
        print(_summary(len(photos), faces, aged_photos, failures), file=sys.stderr)
    if not photos:
        print("agecl-predict: no photos to process", file=sys.stderr)
    return 0 if faces else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (agecl-predict)."""
    args = get_args_parser().parse_args(argv)
    try:
        return run(args)
    except (CheckpointError, ValueError, OSError, RuntimeError) as e:
        message = disk_full_message(e, args.annotate or args.output or ".")
        if args.debug or (isinstance(e, RuntimeError) and message is None):
            raise
        print(f"agecl-predict: error: {message or e}", file=sys.stderr)
        return EXIT_DISK_FULL if message else 2
    except KeyboardInterrupt:
        print("agecl-predict: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
