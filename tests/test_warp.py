"""agecl.warp: the compiled bilinear warp + normalise that DALI's CPU backend runs in training.

Checked by hand on maps whose result is known (identity, whole-pixel shift, half-pixel shift, the
zero fill outside the image), and against DALI's own `warp_affine` + `crop_mirror_normalize` (the
ops the GPU path runs) on the training augmentation's matrices, flips and borders included.
"""

import io

import numpy as np
import pytest
from PIL import Image

from agecl.config import LoaderConfig
from agecl.loader import augmentation_matrices
from agecl.model import IMAGENET_MEAN, IMAGENET_STD
from agecl.warp import warp_normalise

MEAN = np.array(IMAGENET_MEAN, np.float32).reshape(3, 1, 1) * 255
STD = np.array(IMAGENET_STD, np.float32).reshape(3, 1, 1) * 255


def _image(h=40, w=48, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _normalised(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) 0-255 -> (3, H, W) normalised, as the network sees it."""
    return (pixels.transpose(2, 0, 1).astype(np.float64) - MEAN) / STD


def _warp(image, matrix, size) -> np.ndarray:
    out = np.empty((3, size, size), np.float32)
    warp_normalise(out, image, np.asarray(matrix, np.float32))
    return out


def test_identity_is_a_crop():
    image = _image()
    out = _warp(image, [[1, 0, 0], [0, 1, 0]], 32)
    np.testing.assert_allclose(out, _normalised(image[:32, :32]), atol=1e-4)


def test_whole_pixel_shift_moves_the_image():
    image = _image()
    out = _warp(image, [[1, 0, -5], [0, 1, -3]], 30)  # source (x, y) lands at (x - 5, y - 3)
    np.testing.assert_allclose(out, _normalised(image[3:33, 5:35]), atol=1e-4)


def test_half_pixel_shift_averages_neighbours():
    image = _image()
    out = _warp(image, [[1, 0, -0.5], [0, 1, 0]], 30)
    expected = (image[:30, :30].astype(np.float64) + image[:30, 1:31]) / 2
    np.testing.assert_allclose(out, _normalised(expected), atol=1e-4)


def test_outside_the_image_is_zero_before_normalising():
    image = _image()
    out = _warp(image, [[1, 0, 10], [0, 1, 0]], 30)  # the first 10 columns come from x < 0
    np.testing.assert_allclose(out[:, :, :10], np.broadcast_to(-MEAN / STD, (3, 30, 10)), atol=1e-4)
    np.testing.assert_allclose(out[:, :, 10:], _normalised(image[:30, :20]), atol=1e-4)
    # Half a pixel in: the edge column is half the image's first column, half fill.
    out = _warp(image, [[1, 0, 0.5], [0, 1, 0]], 30)
    np.testing.assert_allclose(out[:, :, 0], _normalised(image[:30, :1] / 2)[:, :, 0], atol=1e-4)


@pytest.mark.parametrize("flip", ["horizontal", "vertical"])
def test_matches_dalis_warp_on_training_matrices(flip):
    """The CPU op and the GPU path's ops (run here on DALI's CPU backend) agree on real JPEGs."""
    dali = pytest.importorskip("nvidia.dali")
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    from agecl.warp import dali_warp_normalise

    side, size, n = 256, 224, 12
    y, x = np.mgrid[0:side, 0:side]
    jpegs = []
    for k in range(n):
        face = 60 + np.stack([x * 0.6 + k, y * 0.6, (x + y) * 0.3], -1) + _image(side, side, k) * 0.15  # >= 60: darker is fill
        buf = io.BytesIO()
        Image.fromarray(face.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
        jpegs.append(np.frombuffer(buf.getvalue(), np.uint8))
    # A wider affine than the default, so that some outputs reach past the image's edge.
    cfg = LoaderConfig(flip=flip, rotate_degrees=15, translate=0.08, scale=0.15, image_size=size)
    matrices = augmentation_matrices(n, cfg, side, (1, 0, 2, 3))

    @dali.pipeline_def(batch_size=n, num_threads=2, device_id=None)
    def graph():
        images = fn.decoders.image(fn.external_source(lambda: jpegs, batch=True), device="cpu")
        m = fn.external_source(lambda: list(matrices), batch=True, dtype=types.FLOAT)
        ours = dali_warp_normalise(images, m, size)
        theirs = fn.warp_affine(images, matrix=m, size=(size, size), inverse_map=False, fill_value=0, dtype=types.FLOAT)
        theirs = fn.crop_mirror_normalize(
            theirs, dtype=types.FLOAT, output_layout="CHW", mean=list(MEAN.ravel()), std=list(STD.ravel())
        )
        return ours, theirs

    pipe = graph()
    pipe.build()
    ours, theirs = (np.stack([np.asarray(t) for t in out]) for out in pipe.run())
    assert ours.shape == theirs.shape == (n, 3, size, size)
    diff = np.abs(ours - theirs)
    assert (ours < -1.5).any(), "no output pixel reached past the image's edge: the test lost its border case"
    print(f"max |diff| {diff.max():.4f}, mean {diff.mean():.2e}")
    assert diff.max() < 0.02, diff.max()  # 0.02 of a std is about 1 grey level
    assert diff.mean() < 1e-3, diff.mean()


def test_box_shrink_is_the_mean_of_each_block():
    from agecl.warp import box_shrink

    image = _image(41, 50)  # not multiples of 4: the last 1 row and 2 columns are left out
    out = box_shrink(image, 4)
    assert out.shape == (10, 12, 3) and out.dtype == np.float32
    expected = image[:40, :48].astype(np.float64).reshape(10, 4, 12, 4, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(out, expected, atol=1e-4)
    np.testing.assert_array_equal(box_shrink(image, 1), image.astype(np.float32))


def test_shrunk_warp_maps_coordinates_by_exactly_one_over_the_factor():
    """A warp of the box-shrunk image by matrix / f equals the warp of the block means: shrinking
    scales continuous coordinates (pixel centres at +0.5) by exactly 1 / f."""
    from agecl.warp import box_shrink

    image = _image(64, 64)
    small = box_shrink(image, 4)  # (16, 16, 3)
    out = np.empty((3, 16, 16), np.float32)
    warp_normalise(out, small, np.array([[1, 0, 0], [0, 1, 0]], np.float32))
    np.testing.assert_allclose(out, _normalised(small), atol=1e-4)
