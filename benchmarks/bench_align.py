"""Face detection + five-point alignment over a folder of photos (FG-NET by default): one JSON line.

    python benchmarks/bench_align.py --root /work/shared/data/fgnet [--limit N] [--device cpu|cuda]
        [--detect-size 320] [--threads 1]

Measures what the shard builder's offline path does to each photo: load_photo, FaceDetector.detect
(batched), choose_face + the similarity warp. Prints the share aligned, rejects by reason, faces
per photo, wall time, images/sec, the time split, and, where the folder has FG-NET's hand-marked
landmarks (<root>/points/<stem>.pts), the landmark error of MTCNN's five points (NME: mean
point distance over the hand-marked inter-ocular distance).

FG-NET's 68 points are NOT in the iBUG-300W order (which the dataset README states). Read off the
files (0-based): 0-14 jaw, 15-20 and 21-26 brows, 27-30 image-left eye contour (outer, top, inner,
bottom) with 31 its pupil, 32-35 image-right eye contour with 36 its pupil, 37-47 nose, 48-59
outer lip (48 and 54 the corners), 60-66 inner lip, 67 nose tip. `nme` uses that order (eye
centre = mean of the four contour points); `nme_ibug_indices` applies the iBUG indices (36-41,
42-47, 30, 48, 54) to the same files, to show what the README's order would measure.

Threads: one torch thread by default, as in one builder worker process (--threads to change).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provenance import commit  # noqa: E402
from agecl.align import (  # noqa: E402
    AlignedFace,
    FaceDetector,
    PhotoError,
    Rejected,
    align_detected,
    load_photo,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}

# (5, 2) ground truth in MTCNN's order from 68 points, per annotation scheme.
FGNET_FIVE = {
    "eyes": ((27, 28, 29, 30), (32, 33, 34, 35)),  # contour points; pupils are 31 and 36
    "nose": 67,
    "mouth": (48, 54),
}
IBUG_FIVE = {"eyes": (tuple(range(36, 42)), tuple(range(42, 48))), "nose": 30, "mouth": (48, 54)}


def five_points(p68: np.ndarray, scheme: dict) -> np.ndarray:
    """(68, 2) annotation -> (5, 2) float64: image-left eye, image-right eye, nose, mouth corners."""
    le, re = scheme["eyes"]
    left, right = scheme["mouth"]
    return np.stack([p68[list(le)].mean(0), p68[list(re)].mean(0), p68[scheme["nose"]], p68[left], p68[right]])


def read_pts(path: Path) -> np.ndarray:
    """An ISBE .pts file (version, n_points, { x y ... }) -> (n, 2) float64."""
    text = path.read_text()
    body = text[text.index("{") + 1 : text.index("}")]
    return np.array(body.split(), dtype=np.float64).reshape(-1, 2)


def nme(pred5: np.ndarray, true5: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean distance over the 5 points / inter-ocular distance of the truth; and the (5,) per point."""
    iod = float(np.linalg.norm(true5[0] - true5[1]))
    per = np.linalg.norm(pred5 - true5, axis=1) / max(iod, 1e-6)
    return float(per.mean()), per


def summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    v = np.asarray(values)
    return {
        "n": int(v.size),
        "mean": round(float(v.mean()), 4),
        "median": round(float(np.median(v)), 4),
        "p90": round(float(np.percentile(v, 90)), 4),
        "share_over_0.1": round(float((v > 0.1).mean()), 4),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="/work/shared/data/fgnet", help="folder with images/ (and points/), or of photos")
    ap.add_argument("--limit", type=int, default=0, help="first N photos in name order (0: all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--detect-size", type=int, default=FaceDetector.detect_size)
    ap.add_argument("--min-face", type=int, default=FaceDetector.min_face)
    ap.add_argument("--margin", type=float, default=FaceDetector.margin)
    ap.add_argument("--fallback-size", type=int, default=FaceDetector.fallback_size, help="0: no second pass")
    ap.add_argument("--batch", type=int, default=16, help="photos loaded and detected together")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = one builder worker)")
    ap.add_argument("--save", default="", help="write the aligned faces here as JPEGs, to look at")
    args = ap.parse_args(argv)

    import cv2
    import facenet_pytorch
    import torch

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)  # one worker: no OpenCV thread pool either

    root = Path(args.root)
    folder = root / "images" if (root / "images").is_dir() else root
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if args.limit:
        photos = photos[: args.limit]
    if not photos:
        raise SystemExit(f"{folder}: no photos")
    points_dir = root / "points"
    save = Path(args.save) if args.save else None
    if save:
        save.mkdir(parents=True, exist_ok=True)

    detector = FaceDetector(
        device=args.device, detect_size=args.detect_size, min_face=args.min_face, margin=args.margin,
        fallback_size=args.fallback_size, batch_size=args.batch,
    )
    # Warm-up (not timed): builds both MTCNN instances and runs torch's first-call setup.
    detector.warm_up()
    detector.detect([load_photo(photos[0])])
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    t_load = t_detect = t_warp = 0.0
    rejects: dict[str, list[str]] = {}
    aligned = 0
    faces_total = 0
    several, fallback, outside = [], [], []
    err_fg, err_ibug, per_point, worst = [], [], [], []
    t_start, cpu_start = time.perf_counter(), time.process_time()
    for b in range(0, len(photos), args.batch):
        batch = photos[b : b + args.batch]
        t0 = time.perf_counter()
        images, names = [], []
        for p in batch:
            try:
                images.append(load_photo(p))
                names.append(p)
            except PhotoError as e:
                rejects.setdefault(e.reason, []).append(p.name)
        t1 = time.perf_counter()
        found = detector.detect(images)
        sync()
        t2 = time.perf_counter()
        results = [align_detected(im, f, name=str(p)) for im, f, p in zip(images, found, names)]
        t3 = time.perf_counter()
        t_load, t_detect, t_warp = t_load + t1 - t0, t_detect + t2 - t1, t_warp + t3 - t2

        for p, f, r in zip(names, found, results):
            faces_total += f.count
            if f.fallback and f.count:
                fallback.append(p.name)
            if isinstance(r, Rejected):
                rejects.setdefault(r.reason, []).append(p.name)
                continue
            assert isinstance(r, AlignedFace)
            aligned += 1
            outside.append(r.outside)
            if r.n_faces > 1:
                several.append(p.name)
            if save:
                cv2.imwrite(str(save / f"{p.stem}.jpg"), cv2.cvtColor(r.image, cv2.COLOR_RGB2BGR))
            pts = points_dir / f"{p.stem.lower()}.pts"
            if pts.is_file():
                p68 = read_pts(pts)
                if p68.shape == (68, 2):
                    e, per = nme(r.photo_points, five_points(p68, FGNET_FIVE))
                    err_fg.append(e)
                    per_point.append(per)
                    worst.append((e, p.name))
                    err_ibug.append(nme(r.photo_points, five_points(p68, IBUG_FIVE))[0])
    wall, cpu = time.perf_counter() - t_start, time.process_time() - cpu_start

    n = len(photos)
    result = {
        "bench": "align",
        "root": str(root),
        "photos": n,
        "aligned": aligned,
        "aligned_share": round(aligned / n, 4),
        "rejects": {k: len(v) for k, v in sorted(rejects.items())},
        "rejected": {k: v[:20] for k, v in sorted(rejects.items())},
        "faces_per_photo": round(faces_total / n, 4),
        "several_faces": len(several),
        "several_faces_photos": several[:20],
        "found_by_fallback": len(fallback),
        "fallback_photos": fallback[:20],
        "outside_mean": round(float(np.mean(outside)), 4) if outside else None,
        "outside_over_0.1": round(float(np.mean(np.asarray(outside) > 0.1)), 4) if outside else None,
        "wall_s": round(wall, 2),
        "images_per_s": round(n / wall, 2),
        "per_photo_s": round(wall / n, 4),
        # CPU seconds of this process: what wall time would be on an idle core (all threads summed).
        "cpu_s": round(cpu, 2),
        "cpu_per_photo_s": round(cpu / n, 4),
        "time_s": {"load": round(t_load, 2), "detect": round(t_detect, 2), "warp": round(t_warp, 2)},
        "nme": summary(err_fg),
        "nme_per_point": [round(float(x), 4) for x in np.mean(per_point, 0)] if per_point else [],
        "nme_worst": [[name, round(e, 3)] for e, name in sorted(worst, reverse=True)[:5]],
        "nme_ibug_indices": summary(err_ibug),
        "landmark_scheme": "fgnet: eyes = mean(27-30), mean(32-35); nose 67; mouth 48, 54 (0-based)",
        "config": {f.name: getattr(detector, f.name) for f in dataclasses.fields(detector) if f.init}
        | {"batch": args.batch, "threads": args.threads},
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
        "cpus": os.cpu_count(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "facenet_pytorch": getattr(facenet_pytorch, "__version__", "2.5.3"),
            "opencv": cv2.__version__,
            "numpy": np.__version__,
        },
        "commit": commit(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
