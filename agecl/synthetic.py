"""Generated face-age data: the built-in dataset of the demo and the tests (nothing to download).

Each sample is a cartoon face, already aligned: the eye centres, the nose tip and the mouth
corners are drawn at `face_template(256, DEFAULT_COVERAGE)`, then the whole picture is moved by a
small random similarity (about a pixel or two, like the residue of a real five-point alignment),
and the five points returned are where the landmarks ended up.

Age is drawn with cues that do not depend on who the person is, so that a small network can learn
it and must learn to ignore identity:
  - childhood (0-20): a larger, rounder head around the same features (so the eyes sit low in the
    head and the forehead is tall), a short chin, big irises, a small button nose, full and pink
    cheeks, faint brows, sparse light hair in infancy; the jaw and cheekbones form in adolescence;
  - adulthood (16-80): nasolabial folds, forehead lines, crow's feet, under-eye bags, glabella and
    marionette lines, each fading in at its own age and deepening after; hair greying to white and
    (for some people) receding; hooded eyelids, thinner lips, paler and less saturated skin,
    sagging jowls and a lower chin, larger ears and nose, age spots.
Identity is the nuisance: skin tone, face width and length, jaw shape, hair colour and style,
fringe, eye colour, brow weight, lip colour, nose width, wrinkle depth, greying onset, balding,
background, glasses, beard; per photo: lighting, white balance, expression, clothing, blur, noise
and the alignment residue.

Everything is a function of (seed, sample number) or (seed, identity number) through its own
random stream, never of the order in which samples are generated: chunks, resumes and parallel
workers produce the same bytes as one pass (with the same numpy and OpenCV builds: their
rasterisers and blurs are not promised to match across versions).

About 140 faces a second of one core (vectorised numpy and cv2 primitives, no pixel loops).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, NamedTuple

import cv2
import numpy as np

from agecl.format import DEFAULT_COVERAGE, IMAGE_SIZE, face_template

SIZE = IMAGE_SIZE  # side of a generated face, pixels
TEMPLATE = face_template(SIZE, DEFAULT_COVERAGE)  # (5, 2) float32: where the landmarks are drawn
AGE_RANGE = (0, 79)  # default [lo, hi] years, inclusive
MAX_SPAN = 30.0  # most years between one person's youngest and oldest photo (FG-NET, MORPH-like)
MIN_SPAN = 5.0  # fewest years between them: every person is seen at more than one age

# Random streams: the first word of every SeedSequence, so that sample i, identity i and the
# label draw never share a stream even when their numbers coincide.
_LABEL_STREAM = 1
_IDENTITY_STREAM = 2
_SAMPLE_STREAM = 3

# cv2 draws at 1/16 pixel precision with `shift=4`: sub-pixel landmark positions stay sub-pixel.
_SHIFT = 4
_ONE = 1 << _SHIFT

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)  # (H, W) pixel centres, for masks and ramps

# Canonical landmark geometry (pixels at 256): everything else is placed relative to it.
_EYE_L, _EYE_R, _NOSE, _MOUTH_L, _MOUTH_R = (TEMPLATE[k].astype(np.float64) for k in range(5))
_CX = float((_EYE_L[0] + _EYE_R[0]) / 2)  # face midline
_EYE_Y = float((_EYE_L[1] + _EYE_R[1]) / 2)
_IPD = float(_EYE_R[0] - _EYE_L[0])  # distance between the eye centres: the unit of the face
_MOUTH_Y = float((_MOUTH_L[1] + _MOUTH_R[1]) / 2)

# Palettes (RGB). Skin runs from light to dark through the middle colour.
_SKIN_LIGHT = np.array([236, 204, 182], np.float64)
_SKIN_MID = np.array([198, 150, 112], np.float64)
_SKIN_DARK = np.array([96, 62, 42], np.float64)
_HAIR = np.array(
    [[28, 22, 20], [58, 40, 30], [96, 66, 42], [138, 100, 64], [196, 160, 104], [150, 72, 36], [112, 52, 32]],
    np.float64,
)  # black, dark brown, brown, light brown, blond, red, auburn
_HAIR_P = np.array([0.26, 0.24, 0.18, 0.12, 0.1, 0.05, 0.05])
_GREY = np.array([214, 212, 206], np.float64)  # fully white-grey hair
_EYES = np.array([[70, 44, 26], [110, 72, 40], [64, 110, 160], [80, 120, 80], [120, 100, 60]], np.float64)
_EYES_P = np.array([0.45, 0.2, 0.15, 0.1, 0.1])  # dark brown, brown, blue, green, hazel
_HAIR_STYLES = ("short", "crop", "bob", "long", "curly")


@dataclass(frozen=True)
class Traits:
    """The fixed appearance of one synthetic person (colours RGB 0-255; units beside each field)."""

    skin: tuple[float, float, float]
    face_width: float  # multiplies the head's half-width
    face_length: float  # multiplies the chin's drop below the mouth
    jaw: float  # superellipse exponent of the lower face: < 2 pointed, 2 round, > 2 square
    hair: tuple[float, float, float]
    hair_style: str  # one of _HAIR_STYLES
    hair_volume: float  # hair thickness over the skull, pixels
    fringe: bool  # bangs over the forehead
    balding: float  # 0: keeps a full hairline .. 1: bald on top by 70
    grey_onset: float  # age at which greying starts, years
    eye: tuple[float, float, float]
    brow: float  # eyebrow thickness, pixels
    lips: tuple[float, float, float]
    lip_size: float  # multiplies lip thickness
    nose_width: float  # multiplies the nose's size
    forehead: float  # multiplies the forehead's height (eye line to hairline)
    wrinkle_depth: float  # multiplies the contrast of the lines (not their onset)
    beard: bool  # grows a beard after adolescence
    glasses: bool  # wears glasses in most photos
    glasses_colour: tuple[float, float, float]
    background: str  # "solid" | "vgrad" | "hgrad" | "stripes"
    bg_a: tuple[float, float, float]
    bg_b: tuple[float, float, float]
    bg_period: float  # stripe period, pixels
    bg_slant: float  # stripe slant, x per y


class SyntheticSample(NamedTuple):
    """One generated photo, already aligned, with its labels."""

    source: str  # virtual relative path, e.g. "synthetic/p0012/000123.png"
    identity: str  # e.g. "p0012"
    age: int  # years
    image: np.ndarray  # (256, 256, 3) uint8 RGB
    points: np.ndarray  # (5, 2) float32 landmarks (x, y) in the image: eyes, nose, mouth corners


def _tup(c) -> tuple[float, float, float]:
    """A colour as cv2 takes it: three floats clipped to 0..255."""
    return tuple(min(255.0, max(0.0, float(v))) for v in c)


def identity_traits(identity: int, seed: int = 0) -> Traits:
    """The traits of person number `identity` in dataset `seed` (same arguments, same person)."""
    rng = np.random.default_rng([_IDENTITY_STREAM, int(seed), int(identity)])
    tone = rng.beta(1.3, 1.6)  # 0 light .. 1 dark, lighter tones a bit more common
    skin = (
        _SKIN_LIGHT + (_SKIN_MID - _SKIN_LIGHT) * tone * 2
        if tone < 0.5
        else _SKIN_MID + (_SKIN_DARK - _SKIN_MID) * (tone - 0.5) * 2
    )
    skin = skin * rng.uniform(0.96, 1.04, 3)  # undertone: redder, yellower, olive
    masc = rng.random() < 0.5
    hair = _HAIR[rng.choice(len(_HAIR), p=_HAIR_P)] * rng.uniform(0.9, 1.1)
    if tone > 0.55:  # dark skin with blond hair is rare: darken
        hair = hair * 0.5
    style_p = [0.4, 0.25, 0.1, 0.05, 0.2] if masc else [0.1, 0.05, 0.3, 0.4, 0.15]
    style = _HAIR_STYLES[rng.choice(len(_HAIR_STYLES), p=style_p)]
    balding = float(rng.beta(1.2, 1.0)) if masc and rng.random() < 0.55 else float(rng.uniform(0, 0.15))
    bg_a = rng.uniform(30, 230, 3)
    bg_b = np.clip(bg_a + rng.normal(0, 60, 3), 0, 255)
    return Traits(
        skin=_tup(skin),
        face_width=float(rng.uniform(0.92, 1.08)),
        face_length=float(rng.uniform(0.9, 1.12)),
        jaw=float(rng.uniform(2.2, 3.2) if masc else rng.uniform(1.7, 2.5)),
        hair=_tup(hair),
        hair_style=style,
        hair_volume=float({"crop": 3.0, "curly": 16.0}.get(style, 8.0) * rng.uniform(0.8, 1.3)),
        fringe=bool(style in ("bob", "long", "short") and balding < 0.3 and rng.random() < 0.35),
        balding=balding,
        grey_onset=float(rng.uniform(30, 42)),
        eye=_tup(_EYES[rng.choice(len(_EYES), p=_EYES_P)] * rng.uniform(0.85, 1.15)),
        brow=float(rng.uniform(3.0, 5.5) if masc else rng.uniform(2.0, 4.0)),
        lips=_tup(skin * np.array([0.85, 0.6, 0.6]) * rng.uniform(0.9, 1.1) + np.array([30, 0, 5])),
        lip_size=float(rng.uniform(0.8, 1.25)),
        nose_width=float(rng.uniform(0.85, 1.2)),
        forehead=float(rng.uniform(0.95, 1.15)),
        wrinkle_depth=float(rng.uniform(0.8, 1.2)),
        beard=bool(masc and rng.random() < 0.3),
        glasses=bool(rng.random() < 0.2),
        glasses_colour=_tup(rng.choice([20.0, 60.0, 120.0, 180.0]) * rng.uniform(0.7, 1.3, 3)),
        background=str(rng.choice(["solid", "vgrad", "hgrad", "stripes"], p=[0.35, 0.25, 0.2, 0.2])),
        bg_a=_tup(bg_a),
        bg_b=_tup(bg_b),
        bg_period=float(rng.uniform(12, 40)),
        bg_slant=float(rng.uniform(-1, 1)),
    )


# --- labels -----------------------------------------------------------------------------------


def _check_args(n: int, seed: int, identities: int | None, age_range: tuple[int, int]) -> tuple[int, int, int]:
    n, seed = int(n), int(seed)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    lo, hi = (int(a) for a in age_range)
    if not 0 <= lo < hi:
        raise ValueError(f"age_range must be (lo, hi) with 0 <= lo < hi, got {age_range}")
    most = max(1, n // 2)  # at least two photos a person
    if identities is None:
        identities = min(max(1, n // 10), most)
    identities = int(identities)
    if not 1 <= identities <= most:
        raise ValueError(f"identities must be in 1..{most} for n={n} (two photos a person), got {identities}")
    return n, seed, identities


@lru_cache(maxsize=8)
def _labels(n: int, seed: int, identities: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Cached (ages, identities), read-only: the shard builder asks for one sample at a time."""
    rng = np.random.default_rng([_LABEL_STREAM, seed, n, identities, lo, hi])
    width = float(hi - lo)
    # A person's photos cover a window of 5-30 years around a uniform centre, clipped to the range
    # (so the ends of the range are not thinner than the middle) but never narrower than MIN_SPAN.
    span = rng.uniform(MIN_SPAN, MAX_SPAN, identities)  # years
    centre = lo + rng.random(identities) * width
    min_span = min(MIN_SPAN, width)
    start = np.clip(centre - span / 2, lo, hi - min_span)
    span = np.clip(centre + span / 2, lo + min_span, hi) - start
    # Every person gets a photo at the start and at the end of their span (so each spans at least
    # MIN_SPAN years), the other photos go to random people at random points of their span.
    extra = max(n - 2 * identities, 0)
    who = np.concatenate([np.arange(identities), np.arange(identities), rng.integers(0, identities, extra)])[:n]
    where = np.concatenate([np.zeros(identities), np.ones(identities), rng.random(extra)])[:n]
    order = rng.permutation(n)
    who, where = who[order], where[order]
    ages = np.clip(np.rint(start[who] + where * span[who]), lo, hi).astype(np.int64)
    who = who.astype(np.int64)
    ages.flags.writeable = False
    who.flags.writeable = False
    return ages, who


def synthetic_labels(
    n: int, seed: int = 0, identities: int | None = None, age_range: tuple[int, int] = AGE_RANGE
) -> tuple[np.ndarray, np.ndarray]:
    """Ages (n,) int64 years and identity numbers (n,) int64 of the dataset, without drawing it.

    `identities` defaults to n // 10 (at least 1, at most n // 2: everyone has two photos or more).
    Each person's photos spread over 5-30 years inside `age_range` (inclusive).
    """
    n, seed, identities = _check_args(n, seed, identities, age_range)
    ages, who = _labels(n, seed, identities, int(age_range[0]), int(age_range[1]))
    return ages.copy(), who.copy()


# --- drawing helpers --------------------------------------------------------------------------


def _ramp(a: float, lo: float, hi: float) -> float:
    """0 before lo, 1 after hi, linear between: a cue that fades in over [lo, hi] years."""
    return float(np.clip((a - lo) / (hi - lo), 0.0, 1.0))


def _p(x: float, y: float) -> tuple[int, int]:
    return int(round(x * _ONE)), int(round(y * _ONE))


def _pts(xy: np.ndarray) -> np.ndarray:
    """(k, 2) float pixel coordinates -> (k, 1, 2) int32 fixed point, for cv2's poly functions."""
    return np.rint(np.asarray(xy) * _ONE).astype(np.int32).reshape(-1, 1, 2)


def _ellipse(img, c, axes, angle, a0, a1, colour, thickness=-1):
    cv2.ellipse(img, _p(*c), _p(max(axes[0], 0.1), max(axes[1], 0.1)), angle, a0, a1, colour, thickness,
                cv2.LINE_AA, _SHIFT)


def _poly(img, xy, colour, thickness=-1, closed=False):
    if thickness < 0:
        cv2.fillPoly(img, [_pts(xy)], colour, cv2.LINE_AA, _SHIFT)
    else:
        cv2.polylines(img, [_pts(xy)], closed, colour, int(thickness), cv2.LINE_AA, _SHIFT)


def _line(img, p0, p1, colour, thickness=1):
    cv2.line(img, _p(*p0), _p(*p1), colour, int(thickness), cv2.LINE_AA, _SHIFT)


def _mix(a, b, t: float) -> tuple[float, float, float]:
    return _tup(np.asarray(a, np.float64) * (1 - t) + np.asarray(b, np.float64) * t)


def _shade(c, f: float) -> tuple[float, float, float]:
    return _tup(np.asarray(c, np.float64) * f)


def _blend(img: np.ndarray, layer, alpha: np.ndarray) -> None:
    """img = img * (1 - alpha) + layer * alpha, in place, where alpha > 0.

    img (H, W, 3) float32; layer an image like img or one colour; alpha (H, W) float32 in [0, 1].
    Only alpha's bounding box is blended: a full frame costs as much as drawing a face.
    """
    x, y, w, h = cv2.boundingRect((alpha > 0).view(np.uint8))
    if w == 0:
        return
    box = (slice(y, y + h), slice(x, x + w))
    a = np.ascontiguousarray(alpha[box])
    top = layer[box] if isinstance(layer, np.ndarray) else np.full((h, w, 3), layer, np.float32)
    img[box] = cv2.blendLinear(np.ascontiguousarray(top), np.ascontiguousarray(img[box]), a, 1 - a)


def _arc(c, ax, ay, t0, t1, k=12) -> np.ndarray:
    t = np.radians(np.linspace(t0, t1, k))
    return np.stack([c[0] + ax * np.cos(t), c[1] + ay * np.sin(t)], 1)


@lru_cache(maxsize=1)
def _noise_table() -> np.ndarray:
    """(2H, 2W, 3) float32 unit Gaussian noise, fixed: drawing fresh noise costs more than a face."""
    return np.random.default_rng([_SAMPLE_STREAM, 2**31]).standard_normal((2 * SIZE, 2 * SIZE, 3), np.float32)


def _noise(rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float32 unit noise for one photo: a random window of the table, random sign."""
    y, x = rng.integers(0, SIZE, 2)
    window = _noise_table()[y : y + SIZE, x : x + SIZE]
    return window if rng.random() < 0.5 else -window


# --- the face ---------------------------------------------------------------------------------


def _head_outline(a: float, tr: Traits, child: float, old: float) -> tuple[np.ndarray, float, float, float]:
    """(k, 2) polygon of the head; its half-width at the cheekbones, skull height above the eyes, chin y."""
    hw = _IPD * (1.16 + 0.45 * child) * tr.face_width  # half-width at the cheekbones
    crown = _IPD * (1.72 + 0.5 * child)  # skull height above the eye line
    cheek_y = _NOSE[1] - 4  # the lower face narrows from here
    chin = _MOUTH_Y + _IPD * (0.72 - 0.32 * child + 0.1 * old) * tr.face_length
    jaw = 2.1 + (tr.jaw - 2.1) * _ramp(a, 8, 22)  # children's faces are round, the jaw forms in adolescence
    top = _arc((_CX, _EYE_Y), hw * 1.02, crown, 180, 360, 40)
    s = np.linspace(0, 1, 30)  # 0 at the cheekbones .. 1 at the chin
    w = hw * (1 - s**jaw) ** (1 / jaw)
    w = w + hw * 0.1 * child * np.exp(-(((s - 0.45) / 0.25) ** 2))  # baby cheeks
    w = w + hw * 0.07 * old * np.exp(-(((s - 0.78) / 0.12) ** 2))  # jowls
    y = cheek_y + (chin - cheek_y) * s
    right = np.stack([_CX + w, y], 1)
    left = np.stack([_CX - w, y], 1)[::-1]
    outline = np.concatenate([top, [[_CX + hw * 1.02, _EYE_Y]], right, left, [[_CX - hw * 1.02, _EYE_Y]]])
    return outline, hw, crown, chin


def _background(tr: Traits, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float32 backdrop: the person's colours and pattern, its colours varying by photo."""
    a = np.asarray(tr.bg_a, np.float32) * rng.uniform(0.92, 1.08, 3).astype(np.float32)
    b = np.asarray(tr.bg_b, np.float32) * rng.uniform(0.92, 1.08, 3).astype(np.float32)
    if tr.background == "solid":
        return np.broadcast_to(a, (SIZE, SIZE, 3)).copy()
    ramp = np.linspace(0, 1, SIZE, dtype=np.float32)[:, None]
    if tr.background == "vgrad":
        return np.broadcast_to(a + (b - a) * ramp[:, None], (SIZE, SIZE, 3)).copy()
    if tr.background == "hgrad":
        return np.broadcast_to(a + (b - a) * ramp[None, :, 0, None], (SIZE, SIZE, 3)).copy()
    # Stripes: 0/1 by the parity of (x + slant y) / half-period, softened by a blur.
    v = (_XX + (tr.bg_slant * _YY + (rng.uniform(0, tr.bg_period) + 2 * SIZE))) * np.float32(2 / tr.bg_period)
    t = cv2.GaussianBlur((v.astype(np.int32) & 1).astype(np.float32), (0, 0), 1.0)
    return cv2.blendLinear(np.full((SIZE, SIZE, 3), b, np.float32), np.full((SIZE, SIZE, 3), a, np.float32), t, 1 - t)


@dataclass
class _Face:
    """What the drawing steps of one photo share: age curves, colours (RGB) and measures (pixels)."""

    a: float  # age, years
    child: float  # 1 at birth .. 0 from 20: head proportions, fastest change in infancy
    young: float  # 1 at 2 .. 0 from 20: features that mature through childhood (brows, nose)
    old: float  # 0 until 45 .. 1 at 80: sagging
    skin: tuple[float, float, float]
    line: tuple[float, float, float]  # a wrinkle at full depth
    depth: float  # the person's wrinkle contrast
    hair: tuple[float, float, float]
    grey: float  # 0 .. 1: how white the hair is
    hair_amount: float  # 0.25 .. 1: sparse infant hair to full
    outline: np.ndarray  # (k, 2) head polygon
    hw: float  # head half-width at the cheekbones
    crown: float  # skull height above the eye line
    chin: float  # y of the chin
    eyes: tuple[np.ndarray, np.ndarray]  # (2,) image-left and image-right eye centres
    nose: np.ndarray  # (2,) nose tip
    mouth: tuple[np.ndarray, np.ndarray]  # (2,) image-left and image-right mouth corners
    brow_y: float
    ear_y: float


def _lines_colour(f: _Face, strength: float) -> tuple[float, float, float]:
    """A line on the skin, `strength` 0 (invisible) .. 1 (full depth)."""
    return _mix(f.skin, f.line, min(1.0, strength))


def _draw_body(img: np.ndarray, f: _Face, rng: np.random.Generator) -> None:
    """Clothes, neck, and neck bands in old age."""
    _ellipse(img, (_CX, SIZE + 30), (f.hw * 1.9, 62 - 18 * f.child), 0, 0, 360, _tup(rng.uniform(20, 235, 3)))
    neck_w = f.hw * (0.6 - 0.12 * f.child)
    neck_c = _shade(f.skin, 0.8)
    y0 = f.chin - 30
    bottom = SIZE + 1
    neck = [[_CX - neck_w, y0], [_CX + neck_w, y0], [_CX + neck_w * 1.1, bottom], [_CX - neck_w * 1.1, bottom]]
    _poly(img, neck, neck_c)
    for k in range(2 if f.old > 0 else 0):
        band = _mix(neck_c, f.line, 0.6 * f.old * f.depth)
        _ellipse(img, (_CX, f.chin + 8 + 9 * k), (neck_w * 0.7, 4), 0, 20, 160, band, 1)


def _hair_layer(f: _Face, tr: Traits, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The hair as an image (one colour with strands) and its coverage (H, W) float32 in [0, 1].

    The coverage is the whole hair volume; it is laid behind the head, and again in front of the
    skull above the hairline (`_hairline_alpha`).
    """
    layer = np.empty((SIZE, SIZE, 3), np.float32)
    layer[:] = np.asarray(f.hair, np.float32)
    for _ in range(28):
        x0, y0 = rng.uniform(_CX - f.hw - 20, _CX + f.hw + 20), rng.uniform(0, SIZE)
        c = _GREY if rng.random() < f.grey else np.asarray(f.hair) * rng.choice([0.75, 1.2])  # salt and pepper
        _line(layer, (x0, y0), (x0 + rng.normal(0, 8), y0 + rng.uniform(10, 40)), _tup(c), 1)
    vol = tr.hair_volume * (0.3 + 0.7 * f.hair_amount)  # thickness over the skull
    bottom = {"short": _EYE_Y + 12, "crop": _EYE_Y, "curly": _EYE_Y + 25, "bob": f.chin - 10, "long": SIZE + 1}
    hb = bottom[tr.hair_style] if f.a >= 4 else _EYE_Y  # small children: short hair
    flare = 1.4 if hb > f.chin - 20 else 1.0  # long hair widens over the shoulders
    outer = np.zeros((SIZE, SIZE), np.uint8)
    rx, ry = f.hw * 1.02 + vol, f.crown + vol
    _poly(outer, np.concatenate([_arc((_CX, _EYE_Y), rx, ry, 180, 360, 40),
                                 [[_CX + rx + vol * (flare - 1), hb], [_CX - rx - vol * (flare - 1), hb]]]), 255)
    if tr.hair_style == "curly":
        for t in np.radians(np.linspace(180, 360, 15)):
            c = (_CX + (rx - vol * 0.3) * np.cos(t), _EYE_Y + (ry - vol * 0.3) * np.sin(t))
            _ellipse(outer, c, (vol * 0.8, vol * 0.8), 0, 0, 360, 255)
    return layer, outer.astype(np.float32) * (f.hair_amount / 255)


def _draw_head(img: np.ndarray, f: _Face) -> None:
    """Ears, the head with a darker rim for some roundness, pink cheeks, cheekbones."""
    ear_h = _IPD * (0.26 + 0.1 * _ramp(f.a, 0, 80))  # ears grow all life
    for sgn in (-1, 1):
        ex = _CX + sgn * (f.hw - 3)
        _ellipse(img, (ex, f.ear_y), (_IPD * 0.17, ear_h), sgn * 8, 0, 360, _shade(f.skin, 0.9))
        a0 = -90 if sgn > 0 else 90  # the inner fold opens towards the face
        fold = _shade(f.skin, 0.72)
        _ellipse(img, (ex + sgn * 3, f.ear_y), (_IPD * 0.08, ear_h * 0.6), sgn * 8, a0, a0 + 180, fold, 2)
    centre = np.array([_CX, _EYE_Y + 10])
    for k, shade in enumerate((0.86, 0.9, 0.94, 0.97, 1.0)):  # shading steps towards the centre
        _poly(img, (f.outline - centre) * (1 - 0.025 * k) + centre, _shade(f.skin, shade))
    if f.child > 0.05:  # pink cheeks
        for sgn in (-1, 1):
            _ellipse(img, (_CX + sgn * _IPD * 0.72, _NOSE[1] + 6), (_IPD * 0.2, _IPD * 0.13), 0, 0, 360,
                     _mix(f.skin, (235, 120, 120), 0.3 * f.child))
    bone = _ramp(f.a, 10, 35)  # cheekbones show as the baby fat goes
    for sgn in (-1, 1) if bone > 0 else ():
        p = [[_CX + sgn * f.hw * 0.86, _NOSE[1] - 6], [_CX + sgn * f.hw * 0.72, _NOSE[1] + 10],
             [_CX + sgn * f.hw * 0.6, _NOSE[1] + 22]]
        _poly(img, p, _lines_colour(f, 0.3 * bone), 3)


def _draw_lines(img: np.ndarray, f: _Face, rng: np.random.Generator) -> None:
    """Forehead and glabella lines, nasolabial folds, marionette lines, age spots."""
    a, depth = f.a, f.depth
    # Forehead: one more line every 9 years from 22, each fading in; all deepen with age.
    n_lines = float(np.clip((a - 22) / 9, 0, 5))
    x = np.linspace(-1, 1, 9)
    for k in range(int(np.ceil(n_lines))):
        strength = min(1.0, n_lines - k) * (0.45 + 0.55 * _ramp(a, 30, 80)) * depth
        half = _IPD * (0.55 - 0.04 * k + rng.uniform(-0.05, 0.05))
        y = f.brow_y - _IPD * 0.16 - 7.0 * k + 3.0 * x**2 + rng.normal(0, 0.5, 9)  # bowed, a little irregular
        xs = _CX + rng.normal(0, 2) + half * x
        _poly(img, np.stack([xs, y], 1), _lines_colour(f, strength), 2 if a > 60 else 1)
    glabella = _ramp(a, 38, 75) * depth
    for sgn in (-1, 1) if glabella > 0 else ():
        _line(img, (_CX + sgn * 4, f.brow_y - 2), (_CX + sgn * 5, f.brow_y - 16), _lines_colour(f, glabella), 1)
    fold = _ramp(a, 16, 70) ** 0.7 * depth  # nasolabial: visible early, then deepening
    for sgn, mc in zip((-1, 1), f.mouth) if fold > 0 else ():
        p = [[f.nose[0] + sgn * _IPD * 0.3, f.nose[1] - 2], [f.nose[0] + sgn * _IPD * 0.42, f.nose[1] + 14],
             [mc[0] + sgn * 9, mc[1] - 2], [mc[0] + sgn * 8, mc[1] + 10 * fold]]
        _poly(img, p, _lines_colour(f, fold), 1 if a < 55 else 2)
    marionette = _ramp(a, 50, 80) * depth
    for sgn, mc in zip((-1, 1), f.mouth) if marionette > 0 else ():
        end = (mc[0] + sgn * 4, min(f.chin - 6, mc[1] + 26))
        _line(img, (mc[0] + sgn, mc[1] + 4), end, _lines_colour(f, marionette), 1)
    for _ in range(int(14 * _ramp(a, 55, 80))):  # age spots
        c = (rng.uniform(_CX - f.hw * 0.8, _CX + f.hw * 0.8), rng.uniform(_EYE_Y - f.crown * 0.5, _NOSE[1] + 10))
        r = rng.uniform(1.0, 2.5)
        _ellipse(img, c, (r, r * 0.8), 0, 0, 360, _mix(f.skin, (120, 80, 50), 0.35))


def _draw_eyes(img: np.ndarray, f: _Face, tr: Traits, rng: np.random.Generator) -> None:
    """Eyes centred on their landmarks: big irises in children; hooded lids, bags, crow's feet with age."""
    a = f.a
    eye_w = _IPD * (0.23 + 0.03 * f.child)
    eye_h = _IPD * (0.11 + 0.06 * f.child) * (1 - 0.25 * _ramp(a, 40, 80)) * rng.uniform(0.9, 1.05)
    iris = _IPD * (0.095 + 0.045 * f.child)
    droop = eye_h * 0.35 * _ramp(a, 35, 80)  # the upper lid sinks over the eye
    bags, crow = _ramp(a, 32, 75) * f.depth, _ramp(a, 30, 72) * f.depth
    brow_c = _mix(_mix(tr.hair, _GREY, f.grey * 0.6), f.skin, 0.6 * f.young)  # faint in children, greying
    for sgn, e in zip((-1, 1), f.eyes):
        if bags > 0:
            c = _lines_colour(f, 0.8 * bags)
            _ellipse(img, (e[0], e[1] + eye_h * 0.9), (eye_w * 0.9, eye_h * 0.9), 0, 20, 160, c, 1)
        if a > 58:
            c = _lines_colour(f, 0.7 * bags)
            _ellipse(img, (e[0], e[1] + eye_h * 1.6), (eye_w * 0.8, eye_h * 1.1), 0, 30, 150, c, 1)
        for t in np.radians((-25, 0, 25)) if crow > 0 else ():
            x0, ln = e[0] + sgn * (eye_w + 3), 6 + 8 * crow
            _line(img, (x0, e[1]), (x0 + sgn * ln * np.cos(t), e[1] + ln * np.sin(t)), _lines_colour(f, crow), 1)
        _ellipse(img, e, (eye_w, eye_h), 0, 0, 360, (242, 240, 236))
        _ellipse(img, e, (iris, iris), 0, 0, 360, tr.eye)
        _ellipse(img, e, (iris * 0.5, iris * 0.5), 0, 0, 360, (15, 12, 12))
        _ellipse(img, (e[0] + iris * 0.5, e[1] - iris * 0.5), (1.5, 1.5), 0, 0, 360, (250, 250, 250))  # catch light
        _ellipse(img, (e[0], e[1] - eye_h - 2 + droop), (eye_w * 1.15, eye_h * 0.8), 0, 0, 360, f.skin)  # upper lid
        _ellipse(img, (e[0], e[1] + eye_h * 1.75), (eye_w * 1.15, eye_h * 0.85), 0, 0, 360, f.skin)  # lower lid
        _ellipse(img, e, (eye_w, eye_h), 0, 0, 360, (40, 30, 28), 1)
        _ellipse(img, (e[0], e[1] - droop * 0.6), (eye_w * 1.02, eye_h * 1.05), 0, 190, 350, (30, 22, 20), 2)
        brow = _arc((e[0] + sgn * 3, f.brow_y + 12), eye_w * 1.3, 14, 220, 320, 9)
        _poly(img, brow, brow_c, max(1, round(tr.brow * (1 - 0.6 * f.young))))


def _draw_nose(img: np.ndarray, f: _Face, tr: Traits) -> None:
    """A nose with its tip on the landmark: a small button in children, larger with age."""
    n = f.nose
    ns = (0.7 + 0.3 * (1 - f.young) + 0.12 * _ramp(f.a, 25, 80)) * tr.nose_width
    _ellipse(img, (n[0], n[1] + 1), (_IPD * 0.12 * ns, _IPD * 0.09 * ns), 0, 0, 360, _shade(f.skin, 0.93))
    for sgn in (-1, 1):
        nostril = (n[0] + sgn * _IPD * 0.1 * ns, n[1] + 4)
        _ellipse(img, nostril, (3.0 * ns, 2.0 * ns), sgn * 20, 0, 360, _shade(f.skin, 0.45))
        a0 = -70 if sgn > 0 else 110  # the wing's crease opens away from the tip
        wing = (n[0] + sgn * _IPD * 0.15 * ns, n[1] + 1)
        _ellipse(img, wing, (5 * ns, 6 * ns), 0, a0, a0 + 140, _shade(f.skin, 0.72), 1)
        bridge = (n[0] + sgn * _IPD * 0.1 * ns, n[1] - 8)
        _line(img, (_CX + sgn * _IPD * 0.1, _EYE_Y + 6), bridge, _shade(f.skin, 0.9), 1)
    _ellipse(img, (n[0], n[1] - 2), (2.2, 1.8), 0, 0, 360, _mix(f.skin, (255, 255, 255), 0.35))


def _draw_mouth(img: np.ndarray, f: _Face, tr: Traits, rng: np.random.Generator) -> None:
    """Beard (after adolescence, greying with the hair), lips with their corners on the landmarks
    (thinning with age, a per-photo smile), moustache."""
    a = f.a
    m_l, m_r = f.mouth
    density = _ramp(a, 15, 22) if tr.beard else 0.0
    beard_c = _tup(np.asarray(tr.hair) * (1 - f.grey) + _GREY * f.grey)
    if density > 0:
        mask = np.zeros((SIZE, SIZE), np.uint8)
        _poly(mask, f.outline[f.outline[:, 1] > _NOSE[1] + 4], 255)  # the jaw
        # Bare above the mouth line (the moustache is drawn with the lips) and around the lower lip.
        _ellipse(mask, ((m_l[0] + m_r[0]) / 2, _MOUTH_Y), (_IPD * 0.75, _IPD * 0.5), 0, 180, 360, 0)
        _ellipse(mask, ((m_l[0] + m_r[0]) / 2, _MOUTH_Y + 2), (_IPD * 0.46, 7), 0, 0, 360, 0)
        _blend(img, beard_c, mask.astype(np.float32) * np.float32(0.85 * density / 255))
    smile = rng.uniform(-0.15, 1.0)
    lip = _IPD * 0.09 * tr.lip_size * (1 - 0.45 * _ramp(a, 35, 80) + 0.15 * f.child)
    t = np.linspace(0, 1, 15)
    bow = np.sin(np.pi * t)
    zero = np.zeros_like(t)
    mid = m_l[None] * (1 - t[:, None]) + m_r[None] * t[:, None] + np.stack([zero, bow * 3 * smile], 1)  # lips meet
    cupid = np.exp(-(((t - 0.4) / 0.09) ** 2)) + np.exp(-(((t - 0.6) / 0.09) ** 2))  # the bow's two peaks
    upper = mid - np.stack([zero, bow * lip * (0.75 + 0.3 * cupid)], 1)
    lower = mid + np.stack([zero, bow * lip * 1.2], 1)
    lip_c = _mix(tr.lips, f.skin, 0.3 * _ramp(a, 40, 80))
    _poly(img, np.concatenate([upper, lower[::-1]]), lip_c)
    _poly(img, mid, _shade(lip_c, 0.5), 1)
    if density > 0:  # moustache: from below the nose to the upper lip, past the corners
        tt = np.linspace(-0.1, 1.1, 15)
        edge = m_l[None] * (1 - tt[:, None]) + m_r[None] * tt[:, None]
        arch = np.sin(np.pi * np.clip(tt, 0, 1))
        low = edge + np.stack([np.zeros_like(tt), 2 - arch * (lip * 0.9 - 3 * smile)], 1)
        high = edge - np.stack([np.zeros_like(tt), 3 + arch * (lip + 6 * density)], 1)
        _poly(img, np.concatenate([low, high[::-1]]), _mix(beard_c, f.skin, 1 - 0.9 * density))


def _hairline_alpha(f: _Face, tr: Traits, outer: np.ndarray) -> np.ndarray:
    """Coverage of the hair in front of the skull: the hair volume above a hairline that recedes
    with age (for some people until the top is bald) and keeps the sides."""
    forehead = _IPD * tr.forehead * (1.0 + 0.45 * f.child)  # eye line to hairline
    recede = tr.balding * _ramp(f.a, 22, 70)
    if tr.fringe and f.a >= 4:
        centre = f.brow_y - _IPD * 0.22 - recede * _IPD * 0.8
    else:
        centre = _EYE_Y - forehead - recede * _IPD * 1.6
    side = _EYE_Y - _IPD * (0.05 + 0.5 * recede)  # sideburns shorten as the temples recede
    u = np.abs(_XX[0] - _CX) / (f.hw * 0.9)  # (W,) 0 at the midline, 1 near the temples
    temple = 1 / (1 + np.exp(-(u - (0.92 - 0.15 * recede)) / 0.05))
    hairline = centre + 10 * u**2 - 32 * recede * (u**2 - u**4) + (side - centre) * temple  # (W,) y
    rows = int(np.clip(np.ceil(hairline.max()) + 2, 1, SIZE))  # no hair in front below this row
    alpha = np.zeros_like(outer)
    alpha[:rows] = outer[:rows] * np.clip((hairline[None, :] - _YY[:rows]) / 1.5, 0, 1)
    return alpha


def _draw_glasses(img: np.ndarray, f: _Face, tr: Traits) -> None:
    c, r = tr.glasses_colour, _IPD * 0.34
    eye_l, eye_r = f.eyes
    for e in f.eyes:
        _ellipse(img, (e[0], e[1] + 1), (r, _IPD * 0.25), 0, 0, 360, c, 2)
    _line(img, (eye_l[0] + r, eye_l[1]), (eye_r[0] - r, eye_r[1]), c, 2)
    for sgn, e in zip((-1, 1), f.eyes):
        _line(img, (e[0] + sgn * r, e[1] - 2), (_CX + sgn * (f.hw - 2), f.ear_y - 10), c, 2)


def _photograph(img: np.ndarray, points: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The camera and the aligner: residual similarity, blur, lighting, white balance, noise.

    img (H, W, 3) float32 drawing, points (5, 2) where its landmarks were drawn. Returns the
    uint8 photo and the landmarks moved with it.
    """
    warp = cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), rng.uniform(-1.5, 1.5), rng.uniform(0.985, 1.015))
    warp[:, 2] += rng.uniform(-1.2, 1.2, 2)  # pixels
    img = cv2.warpAffine(img, warp, (SIZE, SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.6, 1.3))
    phi = rng.uniform(0, 2 * np.pi)  # direction the light comes from
    k = rng.uniform(0, 0.25) / (SIZE / 2)  # brightness slope across the frame, per pixel
    ramp = np.arange(SIZE, dtype=np.float32) - SIZE / 2
    light = rng.uniform(0.8, 1.15) * (1 + (k * np.sin(phi)) * ramp[:, None] + (k * np.cos(phi)) * ramp[None, :])
    cast = rng.uniform(0.94, 1.06, 3)  # white balance
    cv2.multiply(img, cv2.merge([(light * c).astype(np.float32) for c in cast]), dst=img)
    cv2.scaleAdd(_noise(rng), rng.uniform(1.5, 5.0), img, dst=img)
    np.clip(img + 0.5, 0, 255, out=img)
    return img.astype(np.uint8), (points @ warp[:, :2].T + warp[:, 2]).astype(np.float32)


def render_face(age: float, traits: Traits, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw `traits`'s person at `age` years, aligned, with per-photo nuisances from `rng`.

    Returns the image, (256, 256, 3) uint8 RGB, and its five landmarks, (5, 2) float32 (x, y):
    the template of `agecl.format` moved by this photo's alignment residue (a pixel or two).
    """
    a = float(age)
    child = (1 - min(a, 20.0) / 20.0) ** 1.25
    old = _ramp(a, 45, 80)
    # The features themselves sit a fraction of a pixel off the template.
    drawn = TEMPLATE.astype(np.float64) + rng.normal(0, 0.35, (5, 2)).clip(-0.8, 0.8)  # (5, 2)

    # Skin: children pinker, age pales and desaturates it.
    skin = np.asarray(traits.skin, np.float64) + child * np.array([10, 2, 4])
    lum = skin @ np.array([0.3, 0.59, 0.11])
    skin = skin + (lum - skin) * 0.4 * _ramp(a, 10, 80) + np.array([6, 4, -4]) * _ramp(a, 40, 80)
    # Hair: children's is lighter and darkens as they grow; greys from the person's onset to white
    # some 35 years later.
    grey = _ramp(a, traits.grey_onset, traits.grey_onset + 35)
    hair = np.asarray(traits.hair, np.float64) * (1 - grey) + _GREY * grey
    hair = hair + (np.array([190.0, 150, 100]) - hair) * 0.35 * child
    outline, hw, crown, chin = _head_outline(a, traits, child, old)
    f = _Face(
        a=a, child=child, young=1 - _ramp(a, 2, 20), old=old,
        skin=_tup(skin), line=_tup(skin * 0.55 + np.array([12, 0, 0])), depth=traits.wrinkle_depth,
        hair=_tup(hair), grey=grey, hair_amount=float(np.clip(0.25 + a / 4, 0.25, 1.0)),
        outline=outline, hw=hw, crown=crown, chin=chin,
        eyes=(drawn[0], drawn[1]), nose=drawn[2], mouth=(drawn[3], drawn[4]),
        brow_y=_EYE_Y - _IPD * 0.36, ear_y=(_EYE_Y + _NOSE[1]) / 2 + 2,
    )  # fmt: skip

    img = _background(traits, rng)  # (H, W, 3) float32, drawn on in place
    _draw_body(img, f, rng)
    layer, hair_alpha = _hair_layer(f, traits, rng)
    _blend(img, layer, hair_alpha)  # behind the head
    _draw_head(img, f)
    _draw_lines(img, f, rng)
    _draw_eyes(img, f, traits, rng)
    _draw_nose(img, f, traits)
    _draw_mouth(img, f, traits, rng)
    _blend(img, layer, _hairline_alpha(f, traits, hair_alpha))  # over the top of the skull
    if traits.glasses and a >= 6 and rng.random() < 0.85:  # most photos of those who wear them
        _draw_glasses(img, f, traits)
    return _photograph(img, drawn, rng)


# --- samples ----------------------------------------------------------------------------------


def identity_name(identity: int) -> str:
    """The identity string of person number `identity`: "p0012"."""
    return f"p{int(identity):04d}"


def synthetic_sample(
    i: int, n: int, seed: int = 0, *, identities: int | None = None, age_range: tuple[int, int] = AGE_RANGE
) -> SyntheticSample:
    """Sample `i` of the n-sample dataset `seed`: the same bytes however and whenever it is made."""
    n, seed, identities = _check_args(n, seed, identities, age_range)
    i = int(i)
    if not 0 <= i < n:
        raise IndexError(f"sample {i} out of range for n={n}")
    ages, who = _labels(n, seed, identities, int(age_range[0]), int(age_range[1]))
    age, pid = int(ages[i]), int(who[i])
    image, points = render_face(age, identity_traits(pid, seed), np.random.default_rng([_SAMPLE_STREAM, seed, i]))
    name = identity_name(pid)
    return SyntheticSample(f"synthetic/{name}/{i:06d}.png", name, age, image, points)


def synthetic_samples(
    n: int,
    seed: int = 0,
    start: int = 0,
    stop: int | None = None,
    *,
    identities: int | None = None,
    age_range: tuple[int, int] = AGE_RANGE,
) -> Iterator[SyntheticSample]:
    """Samples start..stop-1 (stop defaults to n) of the n-sample dataset `seed`, in order."""
    if int(start) < 0:
        raise IndexError(f"start must be non-negative, got {start}")
    stop = n if stop is None else min(int(stop), n)
    for i in range(int(start), stop):
        yield synthetic_sample(i, n, seed, identities=identities, age_range=age_range)
