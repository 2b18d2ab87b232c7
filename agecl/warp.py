"""The training warp for DALI's CPU backend: one compiled pass from decoded pixels to network input.

On a GPU the loader warps with DALI's `fn.warp_affine` and normalises with `crop_mirror_normalize`;
both are cheap there. On DALI's CPU backend (2.4) `warp_affine` is a generic per-pixel sampler: in
bilinear mode it costs about 1.8 ms an image at 224 x 224, four times the JPEG decode, and it was
what kept the CPU loader from doubling the torch baseline. `warp_normalise` does the same warp
with bilinear interpolation, the zero fill outside the image, the ImageNet normalisation and the
HWC -> CHW transpose in one Numba loop (about 0.55 ms an image), and runs inside the DALI graph
through `numba_function`, once per sample on DALI's worker threads (a Numba cfunc holds no GIL).
When the network takes less than the crop (64 px from a 224 crop, say), `box_shrink` first
averages f x f blocks of the decoded face, so the warp samples at about 1:1 and computes only
the small output: no aliasing, and 12x fewer pixels than warping 224 px for the model to shrink.

Convention, as DALI's warp (checked against it in tests/test_warp.py): `matrix` maps source to
output coordinates, pixel centres at (x + 0.5, y + 0.5).
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np

from .model import IMAGENET_MEAN, IMAGENET_STD

_MEAN = tuple(m * 255 for m in IMAGENET_MEAN)  # on 0-255 pixels; compile-time constants
_INV_STD = tuple(1 / (d * 255) for d in IMAGENET_STD)


@numba.njit(fastmath=True, cache=True)
def warp_normalise(out: np.ndarray, image: np.ndarray, matrix: np.ndarray) -> None:
    """out (3, S, S) float32 <- image (H, W, 3) uint8 warped by matrix (2, 3) and normalised.

    Inverts the source -> output map once, then for each output pixel samples the source
    bilinearly; neighbours outside the image count as 0 (DALI's fill_value=0).
    """
    a, b, c = matrix[0, 0], matrix[0, 1], matrix[0, 2]
    d, e, f = matrix[1, 0], matrix[1, 1], matrix[1, 2]
    det = a * e - b * d
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
    ic, if_ = -(ia * c + ib * f), -(id_ * c + ie * f)
    h, w = image.shape[0], image.shape[1]
    s = out.shape[1]
    for y in range(s):
        oy = y + 0.5
        for x in range(s):
            ox = x + 0.5
            sx = ia * ox + ib * oy + ic - 0.5  # source position on the pixel-index grid
            sy = id_ * ox + ie * oy + if_ - 0.5
            x0 = int(math.floor(sx))
            y0 = int(math.floor(sy))
            fx = sx - x0
            fy = sy - y0
            w00, w01 = (1 - fx) * (1 - fy), fx * (1 - fy)
            w10, w11 = (1 - fx) * fy, fx * fy
            if x0 >= 0 and y0 >= 0 and x0 + 1 < w and y0 + 1 < h:  # the common case: no bounds tests
                for ch in range(3):
                    v = (
                        w00 * image[y0, x0, ch]
                        + w01 * image[y0, x0 + 1, ch]
                        + w10 * image[y0 + 1, x0, ch]
                        + w11 * image[y0 + 1, x0 + 1, ch]
                    )
                    out[ch, y, x] = (v - _MEAN[ch]) * _INV_STD[ch]
            else:
                for ch in range(3):
                    v = 0.0
                    if 0 <= y0 < h:
                        if 0 <= x0 < w:
                            v += w00 * image[y0, x0, ch]
                        if 0 <= x0 + 1 < w:
                            v += w01 * image[y0, x0 + 1, ch]
                    if 0 <= y0 + 1 < h:
                        if 0 <= x0 < w:
                            v += w10 * image[y0 + 1, x0, ch]
                        if 0 <= x0 + 1 < w:
                            v += w11 * image[y0 + 1, x0 + 1, ch]
                    out[ch, y, x] = (v - _MEAN[ch]) * _INV_STD[ch]


@numba.njit(fastmath=True, cache=True)
def box_shrink(image: np.ndarray, factor: int) -> np.ndarray:
    """(H // f, W // f, 3) float32 means of f x f pixel blocks of image (H, W, 3) uint8.

    The antialiasing step before a warp that shrinks: each small pixel covers exactly f x f
    source pixels, so source coordinates scale by exactly 1 / f (pixel centres at +0.5); the
    last H % f rows and W % f columns are left out (at most f - 1 pixels of the border).
    """
    h, w = image.shape[0] // factor, image.shape[1] // factor
    out = np.zeros((h, w, 3), np.float32)
    inv = 1.0 / (factor * factor)
    for y in range(h):
        for dy in range(factor):
            row = image[y * factor + dy]
            for x in range(w):
                for dx in range(factor):
                    for ch in range(3):
                        out[y, x, ch] += row[x * factor + dx, ch]
    for y in range(h):
        for x in range(w):
            for ch in range(3):
                out[y, x, ch] *= inv
    return out


@numba.njit(cache=True)
def box_shrink_batch(images: np.ndarray, factor: int, out: np.ndarray) -> None:
    """out (n, H // f, W // f, 3) uint8 <- `box_shrink` of each of images (n, H, W, 3) uint8,
    rounded to the nearest grey level: the faces the loader holds decoded (`PresizedFaces`)."""
    for i in range(images.shape[0]):
        small = box_shrink(images[i], factor)
        for y in range(out.shape[1]):
            for x in range(out.shape[2]):
                for ch in range(3):
                    out[i, y, x, ch] = np.uint8(small[y, x, ch] + 0.5)


def dali_warp_normalise(images, matrices, size: int, shrink: int = 1):
    """The DALI op: decoded (H, W, 3) uint8 images and (2, 3) float32 matrices -> (3, size, size)
    float32 normalised, on DALI's CPU backend. Call inside a pipeline definition.

    shrink > 1: the image is first box-filtered by `shrink` (`box_shrink`) and the matrices map
    from that smaller image: the loader's path when the network input is smaller than the crop.
    """
    return _warp_op(size, shrink)(images, matrices)


@functools.lru_cache(maxsize=None)
def _warp_op(size: int, shrink: int = 1):
    """One compiled op per output size for the whole process: compiling DALI's wrapper costs
    about 1.5 s, which every pipeline build (every fold of a LOPO run) would pay again."""
    import nvidia.dali.types as types
    from nvidia.dali.plugin.numba.experimental import NumbaFunction

    def setup(outs, ins):  # every output sample is (3, size, size)
        for shape in outs[0]:
            shape[0], shape[1], shape[2] = 3, size, size

    if shrink > 1:

        def run(out, image, matrix):  # DALI compiles this wrapper; the kernels are cached on disk
            warp_normalise(out, box_shrink(image, shrink), matrix)

    else:

        def run(out, image, matrix):
            warp_normalise(out, image, matrix)

    return NumbaFunction(
        run_fn=run,
        setup_fn=setup,
        out_types=[types.FLOAT],
        in_types=[types.UINT8, types.FLOAT],
        outs_ndim=[3],
        ins_ndim=[3, 2],
        device="cpu",
    )
