"""Export a trained checkpoint for serving without agecl: ONNX, TorchScript, torch.export.

Every exported program computes the same thing as the checkpoint's `AgeModel` at evaluation:

    input  (N, 3, S, S) float32  normalised RGB crops, NCHW; N is dynamic (any batch size)
    age    (N,) float32          expected age  min_age + sum_j j * s_j, years, not rounded
    std    (N,) float32          standard deviation of the age distribution s, years
    probs  (N, A) float32        s = softmax(logits), only with --probs; class j is age min_age + j

The softmax, expected value and standard deviation are part of the graph, in float32. Beside
each artifact a JSON sidecar (`<artifact>.json`) records what a server must do to a photo first:
MTCNN's five landmarks, the similarity warp onto the template (size, coverage and the five
template points in pixels), the centre crop S, the 0..255 -> 0..1 scale and ImageNet mean / std,
and the age range. It also records the verification: each written artifact is loaded back and
run on random batches whose sizes differ from the export batch, and its ages and stds compared
with the checkpoint's (max abs difference, years; default tolerance 1e-3 in fp32).

ONNX is checked with onnxruntime when it is installed, else with the ONNX reference evaluator
(`onnx.reference`, pure numpy: slow, but it runs the graph as the standard defines it).
TorchScript is deprecated in recent torch releases; it is offered for older C++ servers, and
`torch.export` (`.pt2`, loaded with `torch.export.load`) is its successor.

Exports are made on the CPU in float32. Exit status of `agecl-export`: 0 when every artifact was
written and verified, 1 when a verification failed (the artifact is kept, its sidecar says
"passed": false), 2 on bad arguments or an unusable checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import io
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agecl import __version__
from agecl import format as fmt
from agecl.atomic import EXIT_DISK_FULL, atomic_path, disk_full_message, write_bytes, write_json
from agecl.checkpoint import CheckpointError, load_model
from agecl.model import IMAGENET_MEAN, IMAGENET_STD, AgeModel
from agecl.predict import centre_crop_offset

SIDECAR_FORMAT = "agecl-export"
SIDECAR_VERSION = 1
INPUT_NAME = "input"
EXPORT_BATCH = 2  # example batch for tracing; torch.export specialises sizes 0 and 1, so not 1
VERIFY_BATCHES = (1, 3, 5)  # batch sizes of the round-trip check, all unlike EXPORT_BATCH
DEFAULT_TOLERANCE = 1e-3  # years, max abs difference of age and std in fp32
KINDS = ("onnx", "torchscript", "torch.export")


class ExportedAge(nn.Module):
    """An AgeModel as a serving graph: x (N, 3, S, S) -> age (N,), std (N,) [, probs (N, A)]."""

    def __init__(self, model: AgeModel, probs: bool = False):
        super().__init__()
        self.model = model
        self.with_probs = bool(probs)
        self.min_age = float(model.min_age)

    def forward(self, x: torch.Tensor):
        _, logits = self.model(x)  # (N, A)
        s = F.softmax(logits.float(), dim=-1)  # (N, A)
        idx = self.model.class_index  # (A,) 0..A-1, a constant of the graph
        m = (s * idx).sum(-1)  # (N,) mean class index
        std = (s * (idx - m[:, None]) ** 2).sum(-1).clamp_min(0).sqrt()  # (N,)
        age = m + self.min_age
        if self.with_probs:
            return age, std, s
        return age, std


def output_names(probs: bool) -> list[str]:
    return ["age", "std", "probs"] if probs else ["age", "std"]


# --- Writing -------------------------------------------------------------------------------------


def _batch_dim():
    return torch.export.Dim("batch", min=1, max=1 << 16)


def export_onnx(module: ExportedAge, path: Path | str, crop: int) -> dict:
    """Write `module` as one self-contained ONNX file (weights inside), dynamic batch. Returns facts for the sidecar."""
    example = torch.zeros(EXPORT_BATCH, 3, crop, crop)
    with atomic_path(path) as tmp:
        program = torch.onnx.export(
            module, (example,), str(tmp), dynamo=True, external_data=False, verbose=False,
            input_names=[INPUT_NAME], output_names=output_names(module.with_probs),
            dynamic_shapes={"x": {0: _batch_dim()}},
        )
    import onnx

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)  # a malformed graph fails here, not in a server
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    del program
    return {"opset": opset}


def export_torchscript(module: ExportedAge, path: Path | str, crop: int) -> dict:
    """Write `module` traced with torch.jit (dynamic batch: nothing in the graph depends on N)."""
    example = torch.zeros(EXPORT_BATCH, 3, crop, crop)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated")
        with torch.no_grad():
            traced = torch.jit.trace(module, example)
        with atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp))
    return {}


def export_program(module: ExportedAge, path: Path | str, crop: int) -> dict:
    """Write `module` as a torch.export ExportedProgram (`torch.export.save`), dynamic batch."""
    example = torch.zeros(EXPORT_BATCH, 3, crop, crop)
    program = torch.export.export(module, (example,), dynamic_shapes={"x": {0: _batch_dim()}})
    # Through a buffer: torch.export.save wants a name ending in .pt2, the atomic temporary does not.
    buf = io.BytesIO()
    torch.export.save(program, buf)
    write_bytes(path, buf.getvalue())
    return {}


# --- Loading back and checking -------------------------------------------------------------------


def load_runner(kind: str, path: Path | str) -> tuple[Callable[[np.ndarray], list[np.ndarray]], str]:
    """A function running an exported artifact on a (N, 3, S, S) float32 batch, and its runtime's name."""
    path = str(path)
    if kind == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            import onnx
            from onnx.reference import ReferenceEvaluator

            evaluator = ReferenceEvaluator(onnx.load(path))
            return (lambda x: evaluator.run(None, {INPUT_NAME: x})), f"onnx.reference (onnx {onnx.__version__})"
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return (lambda x: session.run(None, {INPUT_NAME: x})), f"onnxruntime {ort.__version__}"
    if kind == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated")
            scripted = torch.jit.load(path, map_location="cpu")

        def run_ts(x: np.ndarray) -> list[np.ndarray]:
            with torch.no_grad():
                return [t.numpy() for t in scripted(torch.from_numpy(x))]

        return run_ts, f"torch.jit (torch {torch.__version__})"
    if kind == "torch.export":
        program = torch.export.load(path).module()

        def run_ep(x: np.ndarray) -> list[np.ndarray]:
            with torch.no_grad():
                return [t.numpy() for t in program(torch.from_numpy(x))]

        return run_ep, f"torch.export (torch {torch.__version__})"
    raise ValueError(f"unknown export kind {kind!r} (known: {', '.join(KINDS)})")


def verify(
    module: ExportedAge, run: Callable[[np.ndarray], list[np.ndarray]], crop: int,
    batch_sizes: Sequence[int] = VERIFY_BATCHES, seed: int = 0,
) -> dict:
    """Run the checkpoint's module and an exported artifact on random normalised batches.

    Returns {"batch_sizes", "max_abs_diff_age", "max_abs_diff_std", "max_abs_diff_probs"?}, years
    (probabilities unitless). Inputs are N(0, 1) per channel: the range of normalised photos.
    """
    g = torch.Generator().manual_seed(seed)
    diffs: dict[str, float] = {}
    names = output_names(module.with_probs)
    for n in batch_sizes:
        x = torch.randn(n, 3, crop, crop, generator=g)  # (n, 3, S, S) float32
        with torch.no_grad():
            want = [t.numpy() for t in module(x)]
        got = run(x.numpy())
        if len(got) != len(want):
            raise ValueError(f"exported program returned {len(got)} outputs, expected {len(want)} ({', '.join(names)})")
        for name, a, b in zip(names, want, got):
            b = np.asarray(b)
            if b.shape != a.shape:
                raise ValueError(
                    f"exported program: output {name} has shape {b.shape} for batch {n}, expected {a.shape}"
                )
            key = f"max_abs_diff_{name}"
            diffs[key] = max(diffs.get(key, 0.0), float(np.max(np.abs(a.astype(np.float64) - b))))
    return {"batch_sizes": list(batch_sizes), **diffs}


# --- Sidecar -------------------------------------------------------------------------------------


# How each border of format.BORDERS fills the frame beyond the photo's edge, in OpenCV's words.
_BORDER_WORDS = {
    "reflect": "the photo mirrored about its edge pixel (OpenCV BORDER_REFLECT_101)",
    "replicate": "the edge pixels repeated (OpenCV BORDER_REPLICATE)",
    "constant": "black, 0 (OpenCV BORDER_CONSTANT)",
}


def preprocessing(info: dict) -> dict:
    """What a server must do to a photo before the exported graph, from a checkpoint's info."""
    size = int(info["template"]["size"])
    coverage = float(info["template"]["coverage"])
    border = fmt.template_border(info["template"])
    crop = int(info["config"].get("loader", {}).get("image_size", size))
    return {
        "steps": [
            "decode the photo as RGB (EXIF orientation applied)",
            "detect faces and five landmarks with MTCNN (facenet-pytorch): left eye, right eye, nose tip, "
            "left mouth corner, right mouth corner (image left / right)",
            "warp each face with the least-squares similarity (rotation, uniform scale, translation) taking "
            f"its landmarks onto template_points, bilinear, to template_size square; beyond the photo's edge: "
            f"{_BORDER_WORDS[border]}",
            "take the centre crop_size square at crop_offset (x and y)",
            "scale to 0..1 (divide by 255), subtract mean and divide by std per channel, NCHW float32",
        ],
        "template_size": size,
        "coverage": coverage,
        "border": border,
        "template_points": np.round(fmt.face_template(size, coverage).astype(np.float64), 4).tolist(),
        "crop_size": crop,
        "crop_offset": centre_crop_offset(size, crop),
        "scale": 1.0 / 255.0,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "color": "RGB",
        "layout": "NCHW",
    }


def sidecar(info: dict, kind: str, artifact: Path, probs: bool, facts: dict, check: dict | None) -> dict:
    """The JSON sidecar of one exported artifact."""
    crop = int(info["config"].get("loader", {}).get("image_size", info["template"]["size"]))
    classes = int(info["max_age"]) - int(info["min_age"]) + 1
    outputs = [
        {"name": "age", "shape": ["batch"], "dtype": "float32", "unit": "years",
         "meaning": "expected age min_age + sum_j j * probs_j, not rounded"},
        {"name": "std", "shape": ["batch"], "dtype": "float32", "unit": "years",
         "meaning": "standard deviation of the predicted age distribution"},
    ]
    if probs:
        outputs.append({"name": "probs", "shape": ["batch", classes], "dtype": "float32",
                        "meaning": "softmax over ages min_age..max_age"})
    return {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "kind": kind,
        "artifact": artifact.name,
        "load": {"onnx": "onnxruntime.InferenceSession(path)", "torchscript": "torch.jit.load(path)",
                 "torch.export": "torch.export.load(path).module()"}[kind],
        **facts,
        "inputs": [{"name": INPUT_NAME, "shape": ["batch", 3, crop, crop], "dtype": "float32"}],
        "outputs": outputs,
        "min_age": int(info["min_age"]),
        "max_age": int(info["max_age"]),
        "preprocess": preprocessing(info),
        "checkpoint": {
            "path": info.get("path"),
            "arch": info["config"].get("model", {}).get("arch", "resnet18"),
            "epoch": info.get("epoch"),
            "step": info.get("step"),
        },
        "verification": check,
        "versions": {"agecl": __version__, "torch": str(torch.__version__)},
    }


def export(
    checkpoint: Path | str,
    outputs: dict[str, Path | str],
    *,
    probs: bool = False,
    check: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    log: Callable[[str], None] = lambda msg: None,
) -> dict[str, dict]:
    """Export a checkpoint to each `outputs` {kind: path} (kinds: onnx, torchscript, torch.export).

    Writes each artifact and its sidecar `<path>.json`; with `check`, loads the artifact back and
    compares it with the checkpoint (see `verify`). Returns {kind: sidecar dict}; a sidecar's
    "verification"["passed"] is False when a difference exceeds `tolerance` (years).
    """
    model, info = load_model(checkpoint, "cpu")
    module = ExportedAge(model, probs).eval()
    crop = int(info["config"].get("loader", {}).get("image_size", info["template"]["size"]))
    writers = {"onnx": export_onnx, "torchscript": export_torchscript, "torch.export": export_program}
    result = {}
    for kind, path in outputs.items():
        if kind not in writers:
            raise ValueError(f"unknown export kind {kind!r} (known: {', '.join(KINDS)})")
        path = Path(path)
        log(f"agecl-export: writing {kind} {path}")
        facts = writers[kind](module, path, crop)
        report = None
        if check:
            run, runtime = load_runner(kind, path)
            report = verify(module, run, crop)
            worst = max(v for k, v in report.items() if k in ("max_abs_diff_age", "max_abs_diff_std"))
            report.update(runtime=runtime, tolerance=tolerance, passed=bool(worst <= tolerance))
            log(f"agecl-export: {kind} vs checkpoint on batches {report['batch_sizes']} ({runtime}): max |diff| "
                f"age {report['max_abs_diff_age']:.2e}, std {report['max_abs_diff_std']:.2e} years"
                + ("" if report["passed"] else f" > tolerance {tolerance:g}: FAILED"))
        meta = sidecar(info, kind, path, probs, facts, report)
        write_json(sidecar_path(path), meta)
        result[kind] = meta
    return result


def sidecar_path(artifact: Path | str) -> Path:
    """`model.onnx` -> `model.onnx.json`."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".json")


# --- Command line --------------------------------------------------------------------------------


def _missing_onnx_packages() -> list[str]:
    """The packages torch's ONNX exporter needs that cannot be imported (checked before any work)."""
    missing = []
    for name in ("onnx", "onnxscript"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agecl-export",
        description="Export a trained checkpoint as ONNX, TorchScript and/or torch.export programs: input a "
        "normalised (N, 3, S, S) float32 batch (dynamic N), outputs the expected age (N,) and std (N,) in years. "
        "Each artifact gets a JSON sidecar <artifact>.json with the preprocessing, and is verified against "
        "the checkpoint.",
        epilog="exit status: 0 written and verified; 1 a verification exceeded the tolerance; 2 bad arguments "
        "or checkpoint; 75 out of disk space (the message names the file: free space and run the same command "
        "again); --debug shows tracebacks\n\nexample:\n"
        "  agecl-export --checkpoint runs/fgnet/checkpoint.pt --onnx age.onnx --export age.pt2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="trained model, e.g. runs/<name>/checkpoint.pt")
    p.add_argument("--onnx", metavar="PATH", help="write an ONNX file (weights inside)")
    p.add_argument("--torchscript", metavar="PATH", help="write a TorchScript file (torch.jit.load)")
    p.add_argument("--export", metavar="PATH", help="write a torch.export program (.pt2, torch.export.load)")
    p.add_argument("--probs", action="store_true", help="also output the age distribution (N, A)")
    p.add_argument("--no-verify", action="store_true", help="skip loading the artifacts back and comparing")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of its message")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="max abs difference allowed, years (default %(default)g)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (agecl-export)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    outputs = {k: v for k, v in (("onnx", args.onnx), ("torchscript", args.torchscript),
                                 ("torch.export", args.export)) if v}
    if not outputs:
        parser.error("give at least one of --onnx, --torchscript, --export")
    if len({Path(p).resolve() for p in outputs.values()}) < len(outputs):
        parser.error("each artifact needs its own path")
    if "onnx" in outputs and (missing := _missing_onnx_packages()):
        parser.error(f"--onnx needs the package(s) {', '.join(missing)}: pip install 'agecl[export]'")
    try:
        result = export(args.checkpoint, outputs, probs=args.probs, check=not args.no_verify,
                        tolerance=args.tolerance, log=lambda msg: print(msg, file=sys.stderr))
    except (CheckpointError, ValueError, OSError, RuntimeError) as e:
        message = disk_full_message(e, Path(next(iter(outputs.values()))).parent)
        if args.debug or (isinstance(e, RuntimeError) and message is None):
            raise
        print(f"agecl-export: error: {message or e}", file=sys.stderr)
        return EXIT_DISK_FULL if message else 2
    failed = [k for k, meta in result.items() if meta["verification"] and not meta["verification"]["passed"]]
    for kind, path in outputs.items():
        print(f"{kind}: {path} (+ {sidecar_path(path).name})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
