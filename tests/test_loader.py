"""The loaders ("dali" on DALI's CPU backend, and "torch") on small shard sets written to tmp.

Every test runs both implementations through the public factories: shapes, dtypes, ranges,
labels against the index, epoch coverage, determinism, the flip axis, evaluation against a PIL
reference, and decode errors that name the shard and the sample.
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from agecl import format as fmt
from agecl.config import LoaderConfig
from agecl.loader import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalBatch,
    TripletBatch,
    _batch_bounds,
    _TrainEpochs,
    build_eval_loader,
    build_train_loader,
    grey_draws,
)
from agecl.reader import ShardSet
from agecl.shards import Sample, write_manifest, write_samples, write_split

N = 50  # samples; the kfold split makes 40 training and 10 test samples per fold
SIDE = fmt.IMAGE_SIZE
LOADERS = ["dali", "torch"]
MEAN = np.array(IMAGENET_MEAN, np.float32).reshape(3, 1, 1)
STD = np.array(IMAGENET_STD, np.float32).reshape(3, 1, 1)


def _face(i: int) -> np.ndarray:
    """(256, 256, 3) uint8: smooth ramps (JPEG keeps them well) and a bright block in the top-left
    quadrant, so that a horizontal flip moves it right and a vertical one moves it down."""
    y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    img = np.stack([40 + 0.5 * x, 40 + 0.5 * y, np.full_like(x, 20 + 4 * (i % 40))], axis=-1)
    img[40:110, 40:110] = 250
    return img.astype(np.uint8)


def _jpeg(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _samples(n=N):
    # 5 identities over 6 ages: every age has several identities, so no anchor falls back.
    return [Sample(age=20 + i % 6, identity=f"p{i % 5}", source=f"p{i % 5}/{i:03d}.jpg", jpeg=_jpeg(_face(i))) for i in range(n)]


def _write(root, samples, shard_size=16):
    w = write_samples(root, samples, shard_size=shard_size)
    write_split(root, "kfold", np.arange(len(samples)) % 5, {"protocol": "kfold"})
    write_manifest(root, w, dataset="test")
    return w


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    _write(root, _samples())
    return ShardSet(root)


def _cfg(loader, **kw):
    # Small crops and batches keep the tests light on a shared 2-core machine.
    base = dict(loader=loader, batch_size=6, image_size=96, workers=1, prefetch=2, seed=3)
    base.update(kw)
    return LoaderConfig(**base)


def _reference(shards, i: int, size: int) -> np.ndarray:
    """(3, size, size) float32: PIL decode, centre crop, ImageNet normalisation."""
    img = np.asarray(Image.open(io.BytesIO(shards.jpeg(i).tobytes())).convert("RGB"), np.float32)
    o = (SIDE - size) // 2
    crop = img[o : o + size, o : o + size].transpose(2, 0, 1) / 255.0
    return (crop - MEAN) / STD


def _blue(shards, i: int) -> int:
    """The blue level `_face` drew for sample id i (its number is the end of its key)."""
    return 20 + 4 * (int(shards.key(i).rsplit("-", 1)[1]) % 40)


def _blue_peak(image: torch.Tensor) -> int:
    """The commonest blue level of a normalised (3, S, S) image, block and fill left out."""
    b = np.round(image[2].numpy() * IMAGENET_STD[2] * 255 + IMAGENET_MEAN[2] * 255).astype(int)
    return int(np.bincount(b[(b > 8) & (b < 240)]).argmax())


def _epoch(loader, e):
    return [
        TripletBatch(b.images.clone(), b.ages.clone(), b.identities.clone(), b.ids.clone(), b.size, b.parts)
        for b in loader.epoch(e)
    ]


@pytest.mark.parametrize("kind", LOADERS)
def test_train_epoch_shapes_labels_coverage(shards, kind):
    ids = shards.split_ids("kfold", 0)  # 40 samples
    loader = build_train_loader(shards, ids, _cfg(kind))
    assert len(loader) == 7  # 6 batches of 6 triplets, then 4
    lo, hi = (-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)), ((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    lo, hi = min(lo) - 1e-4, max(hi) + 1e-4
    anchors = []
    batches = _epoch(loader, 0)
    assert [b.size for b in batches] == [6] * 6 + [4]  # the last partial batch is there
    assert isinstance(loader.fallback_count, int) and loader.fallback_count == 0
    for b in batches:
        n = 3 * b.size
        assert b.images.shape == (n, 3, 96, 96) and b.images.dtype == torch.float32
        assert b.ages.shape == b.identities.shape == b.ids.shape == (n,)
        assert b.ages.dtype == b.identities.dtype == b.ids.dtype == torch.int64
        assert lo <= float(b.images.min()) and float(b.images.max()) <= hi
        assert float(b.images.std()) > 0.3  # real pictures, not zeros
        i = b.ids.numpy()
        assert (b.ages.numpy() == shards.ages[i]).all() and (b.identities.numpy() == shards.identities[i]).all()
        # every row's picture is the picture of its id (each face has its own blue level)
        assert all(abs(_blue_peak(img) - _blue(shards, k)) <= 3 for img, k in zip(b.images, i.tolist()))
        a, p, ng = np.split(i, 3)
        assert (shards.ages[p] == shards.ages[a]).all() and (shards.identities[p] != shards.identities[a]).all()
        assert (shards.ages[ng] != shards.ages[a]).all() and (shards.identities[ng] != shards.identities[a]).all()
        assert set(i) <= set(ids)
        anchors.extend(a)
    assert sorted(anchors) == sorted(ids)  # every training sample is an anchor exactly once


@pytest.mark.parametrize("kind", LOADERS)
def test_fewer_parts_deliver_the_same_triplets_first_parts(shards, kind):
    # An MV loss reads the anchors alone (parts 1), a binary one the anchors and positives (2): the
    # loader decodes and augments only those, from the same triplets a whole-triplet loader draws.
    ids = shards.split_ids("kfold", 0)
    whole = _epoch(build_train_loader(shards, ids, _cfg(kind)), 0)
    for parts in (1, 2):
        part = _epoch(build_train_loader(shards, ids, _cfg(kind, parts=parts)), 0)
        assert [b.size for b in part] == [b.size for b in whole] and {b.parts for b in part} == {parts}
        for x, y in zip(part, whole):
            n = parts * x.size
            assert x.images.shape == (n, 3, 96, 96) and x.ages.shape == x.ids.shape == (n,)
            assert torch.equal(x.ids, y.ids[:n]) and torch.equal(x.ages, y.ages[:n])
            assert all(abs(_blue_peak(img) - _blue(shards, k)) <= 3 for img, k in zip(x.images, x.ids.tolist()))
    with pytest.raises(ValueError, match="parts"):
        build_train_loader(shards, ids, _cfg(kind, parts=4))


@pytest.mark.parametrize("kind", LOADERS)
def test_same_seed_same_batches_other_epoch_other_order(shards, kind):
    ids = shards.split_ids("kfold", 1)
    cfg = _cfg(kind, batch_size=20)  # 2 steps an epoch
    first = _epoch(build_train_loader(shards, ids, cfg), 0)
    again = _epoch(build_train_loader(shards, ids, cfg), 0)
    for x, y in zip(first, again):
        assert torch.equal(x.ids, y.ids) and torch.equal(x.images, y.images)
    loader = build_train_loader(shards, ids, cfg)
    loader.set_epoch(1)
    other = [b.ids.clone() for b in loader]  # set_epoch + iter, as a DDP trainer calls it
    assert not torch.equal(other[0], first[0].ids)
    assert sorted(torch.cat([o[: len(o) // 3] for o in other]).tolist()) == sorted(ids)
    # a fresh loader starting at epoch 1 (a resumed run) sees what the uninterrupted one saw
    resumed = _epoch(build_train_loader(shards, ids, cfg), 1)
    uninterrupted = build_train_loader(shards, ids, cfg)
    _epoch(uninterrupted, 0)
    for x, y in zip(resumed, _epoch(uninterrupted, 1)):
        assert torch.equal(x.ids, y.ids) and torch.equal(x.images, y.images)
    # and a reseeded loader draws another order
    reseeded = _epoch(build_train_loader(shards, ids, _cfg(kind, batch_size=20, seed=4)), 0)
    assert not torch.equal(reseeded[0].ids, first[0].ids)


@pytest.mark.parametrize("kind", LOADERS)
def test_eval_equals_reference_decode_crop_normalise(shards, kind):
    ids = np.arange(N)[::-1].copy()  # any order: kept as given
    loader = build_eval_loader(shards, ids, _cfg(kind, image_size=224), batch_size=16)
    assert len(loader) == 4
    for _ in range(2):  # the same loader evaluates again (DALI: the same pipeline)
        batches = list(loader)
        assert [b.size for b in batches] == [16, 16, 16, 2]  # last partial batch included
        assert all(isinstance(b, EvalBatch) for b in batches)
        got = torch.cat([b.images for b in batches]).numpy()
        assert got.shape == (N, 3, 224, 224) and got.dtype == np.float32
        assert torch.cat([b.ids for b in batches]).tolist() == ids.tolist()
        assert torch.cat([b.ages for b in batches]).tolist() == shards.ages[ids].tolist()
        assert torch.cat([b.identities for b in batches]).tolist() == shards.identities[ids].tolist()
        for k in (0, 17, 49):
            diff = np.abs(got[k] - _reference(shards, int(ids[k]), 224)) * 0.226 * 255  # back to 8-bit levels
            # libjpeg-turbo with the same settings in all three decoders: equal, up to a level of rounding
            assert diff.mean() < 0.1 and diff.max() <= 1.5, (kind, k, diff.mean(), diff.max())


def _locate(out: np.ndarray, ref: np.ndarray):
    """The (flip, oy, ox) for which `out` (3, S, S) is ref (3, 256, 256) flipped then cropped at
    (oy, ox), by brute force on a subsample; returns the match and its mean abs difference."""
    s = out.shape[-1]
    best = None
    for flip in ("none", "horizontal", "vertical"):
        r = ref[:, :, ::-1] if flip == "horizontal" else ref[:, ::-1, :] if flip == "vertical" else ref
        for oy in range(SIDE - s + 1):
            for ox in range(SIDE - s + 1):
                d = float(np.abs(r[:, oy : oy + s : 8, ox : ox + s : 8] - out[:, ::8, ::8]).mean())
                if best is None or d < best[-1]:
                    best = (flip, oy, ox, d)
    flip, oy, ox, _ = best
    r = ref[:, :, ::-1] if flip == "horizontal" else ref[:, ::-1, :] if flip == "vertical" else ref
    return flip, oy, ox, float(np.abs(r[:, oy : oy + s, ox : ox + s] - out).mean())


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("flip", ["horizontal", "vertical", "none"])
def test_flip_axis_with_affine_off(shards, kind, flip):
    ids = shards.split_ids("kfold", 2)
    cfg = _cfg(kind, flip=flip, rotate_degrees=0.0, translate=0.0, scale=0.0, image_size=224, batch_size=20)
    seen = set()
    images, sample_ids = [], []
    for b in build_train_loader(shards, ids, cfg).epoch(0):
        images.append(b.images.numpy().copy())
        sample_ids.append(b.ids.numpy().copy())
    images, sample_ids = np.concatenate(images), np.concatenate(sample_ids)
    for img in images:
        bright = img.mean(0) > 2.0  # the block (level 250) stands out of the ramps
        ys, xs = np.nonzero(bright)
        seen.add((ys.mean() > 112, xs.mean() > 112))  # (bottom half?, right half?)
    expected = {"horizontal": {(False, False), (False, True)}, "vertical": {(False, False), (True, False)}, "none": {(False, False)}}
    assert seen == expected[flip]
    # With the affine off the crop is exact: the output is the decoded face, flipped, cropped at whole pixels.
    for k in range(3):
        ref = _reference(shards, int(sample_ids[k]), SIDE)
        got_flip, oy, ox, err = _locate(images[k], ref)
        assert err * 0.226 * 255 < 1.0, (kind, flip, got_flip, oy, ox, err)
        assert got_flip in ("none", flip)


@pytest.mark.parametrize("kind", LOADERS)
def test_epoch_boundaries_survive_a_break(shards, kind):
    ids = shards.split_ids("kfold", 3)
    loader = build_train_loader(shards, ids, _cfg(kind, batch_size=4))  # 10 steps
    for k, _ in enumerate(loader.epoch(0)):
        if k == 1:
            break  # abandon the epoch with batches prefetched (inside DALI, or in the workers)
    runner = loader._runner.pipe if kind == "dali" else loader._runner.loader
    full = [b.ids[: b.size].clone() for b in loader.epoch(1)]
    assert sorted(torch.cat(full).tolist()) == sorted(ids)
    if kind == "dali":
        assert loader._runner.pipe is runner  # drained and reset, not rebuilt
    # the order is a function of (seed, epoch) only, not of what ran before
    reference = build_train_loader(shards, ids, _cfg(kind, batch_size=4))
    assert torch.equal(torch.cat([b.ids[: b.size].clone() for b in reference.epoch(1)]), torch.cat(full))
    if kind == "dali":
        stale = loader.epoch(2)
        fresh = loader.epoch(3)
        with pytest.raises(RuntimeError, match="superseded"):
            next(stale)
        assert sum(b.size for b in fresh) == len(ids)


def test_epoch_layout_across_ranks():
    # 129 anchors on 2 ranks: slices of 64 and 65. Batches of 64 would give the ranks 1 and 2
    # steps (a DDP hang): the shorter rank splits its last batch instead.
    assert _batch_bounds(64, 64, 2).tolist() == [0, 32, 64]
    assert _batch_bounds(65, 64, 2).tolist() == [0, 64, 65]
    assert _batch_bounds(10, 4, 3).tolist() == [0, 4, 8, 10]
    assert _batch_bounds(10, 4, 2).tolist() == [0, 4, 8]  # drop_last: the tail goes


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_share_an_epoch(shards, world_size):
    ids = shards.split_ids("kfold", 4)
    cfg = _cfg("dali", batch_size=7)
    epochs = [_TrainEpochs(shards, ids, cfg, r, world_size, drop_last=False) for r in range(world_size)]
    assert len({e.steps for e in epochs}) == 1
    anchors = []
    for e in epochs:
        batches = e.batches(5)
        assert len(batches) == e.steps and all(len(b) % 3 == 0 and len(b) for b in batches)
        anchors.extend(np.concatenate([np.split(b, 3)[0] for b in batches]).tolist())
    assert sorted(anchors) == sorted(ids)


@pytest.mark.parametrize("kind", LOADERS)
def test_undecodable_jpeg_names_shard_and_sample(tmp_path, kind):
    samples = _samples(12)
    good = samples[5].jpeg
    samples[5].jpeg = good[:2] + bytes(200) + good[-2:]  # SOI, garbage, EOI: passes the marker check
    w = _write(tmp_path, samples, shard_size=5)
    bad = w.sources.index(samples[5].source)
    ss = ShardSet(tmp_path)
    loader = build_eval_loader(ss, np.arange(12), _cfg(kind), batch_size=4)
    with pytest.raises(fmt.FormatError, match=rf"shard-{bad // 5:05d}\.tar: sample {bad} \(key {w.keys[bad]}\): cannot decode"):
        list(loader)


def test_undecodable_jpeg_is_named_when_the_faces_are_held_decoded(tmp_path):
    """The faces a CPU run holds decoded are decoded when the loader is built: a bad JPEG is
    named there, as the epoch that met it would name it."""
    samples = _samples(12)
    good = samples[5].jpeg
    samples[5].jpeg = good[:2] + bytes(200) + good[-2:]
    w = _write(tmp_path, samples, shard_size=5)
    bad = w.sources.index(samples[5].source)
    with pytest.raises(fmt.FormatError, match=rf"shard-{bad // 5:05d}\.tar: sample {bad} \(key {w.keys[bad]}\): cannot decode"):
        build_train_loader(ShardSet(tmp_path), np.arange(12), _cfg("dali", image_size=224, output_size=64))


@pytest.mark.parametrize("loader", LOADERS)
def test_grey_shows_the_drawn_images_as_their_luma_and_leaves_the_rest(shards, loader):
    ids = shards.split_ids("kfold", 0)
    colour, half, every = (list(build_train_loader(shards, ids, _cfg(loader, grey=p)).epoch(0)) for p in (0.0, 0.5, 1.0))
    mean, std = torch.from_numpy(MEAN), torch.from_numpy(STD)
    drawn = []
    for step, (c, h, e) in enumerate(zip(colour, half, every)):
        assert (h.ids == c.ids).all() and (e.ids == c.ids).all()  # the same triplets and warps
        rgb = c.images * std + mean  # (n, 3, S, S), 0-1
        luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
        grey = e.images * std + mean
        for ch in range(3):  # every image grey: its colour twin's luma in each channel
            torch.testing.assert_close(grey[:, ch], luma, atol=1e-5, rtol=0)
        assert (rgb[:, 0] - rgb[:, 2]).abs().amax() > 0.05  # (the faces themselves have colour)
        kept = (h.images == c.images).flatten(1).all(1)
        greyed = (h.images == e.images).flatten(1).all(1)
        assert (kept ^ greyed).all()  # each image either as it was or its greyscale twin
        expected = torch.from_numpy(grey_draws(len(greyed), 0.5, (3, 0, 0, step)))  # seed 3, rank 0, epoch 0
        assert (greyed == expected).all()
        drawn.append(greyed)
    assert 0.3 < torch.cat(drawn).float().mean() < 0.7  # p = 0.5 over about 120 images


def test_bad_config_is_refused(shards):
    with pytest.raises(ValueError, match="flip"):
        build_train_loader(shards, np.arange(10), _cfg("torch", flip="diagonal"))
    with pytest.raises(ValueError, match="grey"):
        build_train_loader(shards, np.arange(10), _cfg("torch", grey=1.5))
    with pytest.raises(ValueError, match="loader"):
        build_eval_loader(shards, np.arange(10), _cfg("ffcv"))
    with pytest.raises(ValueError, match="image_size"):
        build_eval_loader(shards, np.arange(10), _cfg("torch", image_size=300))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dali_gpu_matches_cpu(shards):
    ids = np.arange(N)
    cpu = torch.cat([b.images for b in build_eval_loader(shards, ids, _cfg("dali", image_size=224), batch_size=16)])
    gpu_loader = build_eval_loader(shards, ids, _cfg("dali", image_size=224), device="cuda", batch_size=16)
    batches = list(gpu_loader)
    assert batches[0].images.is_cuda and batches[0].ages.is_cuda
    got = torch.cat([b.images for b in batches]).cpu()
    assert (got - cpu).abs().mean() * 0.226 * 255 < 2.0  # nvJPEG vs libjpeg-turbo
    train = build_train_loader(shards, shards.split_ids("kfold", 0), _cfg("dali"), device="cuda")
    b = next(iter(train.epoch(0)))
    assert b.images.is_cuda and b.images.shape == (18, 3, 96, 96)
    assert (b.ages.cpu().numpy() == shards.ages[b.ids.cpu().numpy()]).all()
    # The same triplets and augmentation as on the CPU, where agecl.warp replaces warp_affine.
    c = next(iter(build_train_loader(shards, shards.split_ids("kfold", 0), _cfg("dali")).epoch(0)))
    assert (c.ids.numpy() == b.ids.cpu().numpy()).all()
    assert (b.images.cpu() - c.images).abs().mean() * 0.226 * 255 < 2.0  # nvJPEG vs libjpeg-turbo


# --- Delivering less than the crop (the network's input size) -----------------------------------


def _textured_shards(root, n=24):
    """Faces with detail at every scale (noise on ramps): where a loader that aliases or blurs
    differs from an antialiased resize."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    samples = []
    for i in range(n):
        img = np.stack([60 + 0.5 * x, 60 + 0.5 * y, 60 + 0.25 * (x + y)], -1) + rng.normal(0, 25, (SIDE, SIDE, 3))
        img[80:150, 90:170] = 230
        jpeg = _jpeg(np.clip(img, 0, 255).astype(np.uint8))
        samples.append(Sample(age=20 + i % 6, identity=f"p{i % 5}", source=f"p{i % 5}/{i:03d}.jpg", jpeg=jpeg))
    _write(root, samples)
    return ShardSet(root)


def _reduced_against_full(shards, kind, out, monkeypatch=None):
    """(mean, 99th percentile) of |loader at `out` px - (loader at the 224 crop, then the model's
    antialiased resize to `out`)| in standard deviations, on the same triplets and draws."""
    import torch.nn.functional as F

    ids = np.arange(len(shards))
    full = build_train_loader(shards, ids, _cfg(kind, image_size=224, batch_size=8))
    small = build_train_loader(shards, ids, _cfg(kind, image_size=224, output_size=out, batch_size=8))
    diffs = []
    for a, b in zip(_epoch(full, 0), _epoch(small, 0)):
        assert torch.equal(a.ids, b.ids)
        assert b.images.shape == (a.images.shape[0], 3, out, out) and b.images.dtype == torch.float32
        ref = F.interpolate(a.images, size=(out, out), mode="bilinear", antialias=True, align_corners=False)
        diffs.append((ref - b.images).abs().flatten())
    d = torch.cat(diffs)
    return d.mean().item(), torch.quantile(d[:: max(1, len(d) // 1_000_000)], 0.99).item()


# Tolerances, in standard deviations of the normalised input (1 grey level = 0.017): the reduced
# path (box filter by f = round(224 / 64) = 4, then the bilinear warp at 0.8-1.33x) against the
# 224 px warp followed by the model's triangle-filter resize. Measured on these textured faces:
# mean 0.03-0.04, 99th percentile 0.15-0.2 (fill edges and the block's borders, where two
# different low-pass filters differ most); an aliasing warp (no shrink first) gives about 3x that.
REDUCED_MEAN_TOL, REDUCED_P99_TOL = 0.06, 0.3


@pytest.mark.parametrize("kind", LOADERS)
def test_reduced_output_matches_the_full_crop_resized(tmp_path, kind):
    shards = _textured_shards(tmp_path / "tex")
    mean, p99 = _reduced_against_full(shards, kind, 64)
    assert mean < REDUCED_MEAN_TOL and p99 < REDUCED_P99_TOL, (mean, p99)


def test_reduced_output_on_the_gpu_graph_run_on_the_cpu(tmp_path, monkeypatch):
    """The GPU's reduced path (DALI's antialiased resize, then warp_affine) checked on DALI's CPU
    backend: the same graph with `warp_op` pointing at DALI's ops."""
    import agecl.loader as loader_module

    monkeypatch.setattr(loader_module, "warp_op", lambda cfg, gpu: "warp_affine")
    shards = _textured_shards(tmp_path / "tex")
    mean, p99 = _reduced_against_full(shards, "dali", 64)
    assert mean < REDUCED_MEAN_TOL and p99 < REDUCED_P99_TOL, (mean, p99)


def test_reduced_output_without_the_box_filter_would_alias(tmp_path, monkeypatch):
    """The tolerance above has teeth: warping straight to 64 px (no shrink first) misses it."""
    import agecl.loader as loader_module

    monkeypatch.setattr(loader_module, "shrink_factor", lambda cfg: 1)
    shards = _textured_shards(tmp_path / "tex")
    mean, p99 = _reduced_against_full(shards, "dali", 64)
    assert mean > REDUCED_MEAN_TOL or p99 > REDUCED_P99_TOL, (mean, p99)


def test_faces_held_decoded_match_decoding_every_batch(tmp_path):
    """On DALI's CPU backend a 64 px loader holds the training faces decoded and box-shrunk
    (`PresizedFaces`): the same triplets and draws as decoding every batch, the pixels within the
    rounding to whole grey levels (half a level: 0.5 / (255 * 0.224) = 0.0088 standard deviations)."""
    shards = _textured_shards(tmp_path / "tex")
    ids = np.arange(len(shards))
    held = build_train_loader(shards, ids, _cfg("dali", image_size=224, output_size=64, batch_size=8))
    every = build_train_loader(shards, ids, _cfg("dali", image_size=224, output_size=64, batch_size=8, cache_mb=0))
    assert "held decoded at 64 x 64 px" in held.note and every.note is None
    assert held._runner.feed.presized and not every._runner.feed.presized  # DALI copies each gathered batch
    for epoch in (0, 1):
        for a, b in zip(_epoch(held, epoch), _epoch(every, epoch), strict=True):
            assert torch.equal(a.ids, b.ids)
            d = (a.images - b.images).abs()
            assert d.max() <= 0.5 / (255 * min(IMAGENET_STD)) + 1e-5 and d.mean() < 0.004, (d.max(), d.mean())
        assert not held._runner.feed.kept  # nothing of an epoch is kept alive for DALI
    # A budget too small for the set: every batch decodes, and the run is told why.
    small = build_train_loader(shards, ids, _cfg("dali", image_size=224, output_size=64, batch_size=8, cache_mb=0.1))
    assert "over loader.cache_mb" in small.note


def test_shrink_geometry():
    from agecl.loader import presize_scale, shrink_factor, to_output

    assert shrink_factor(LoaderConfig(image_size=224)) == 1
    assert shrink_factor(LoaderConfig(image_size=224, output_size=224)) == 1
    assert shrink_factor(LoaderConfig(image_size=224, output_size=64)) == 4
    assert shrink_factor(LoaderConfig(image_size=224, output_size=112)) == 2
    assert shrink_factor(LoaderConfig(image_size=224, output_size=160)) == 1
    cfg = LoaderConfig(image_size=224, output_size=64)
    assert presize_scale(cfg, 256, box=True) == 4.0 and presize_scale(cfg, 256, box=False) == 256 / 64
    # A pure crop at (16, 16) of the stored face: the small output's pixel (x, y) must sample the
    # stored face at 224 / 64 times it, plus the crop's corner, whatever the presize.
    m = np.array([[[1, 0, -16], [0, 1, -16]]], np.float64)
    for q in (4.0, 256 / 63):
        t = to_output(m.copy(), cfg, q)[0]
        src_small = np.array([10.0, 20.0])  # a point of the presized face
        out = t[:, :2] @ src_small + t[:, 2]
        np.testing.assert_allclose(out, (src_small * q - 16) * 64 / 224)


def test_output_size_larger_than_the_crop_is_refused(shards):
    with pytest.raises(ValueError, match="output_size"):
        build_train_loader(shards, np.arange(10), _cfg("dali", output_size=200))
