"""Synthetic widefield fluorescence images of nuclei, with exact instance masks.

A model trained on clean bright ellipses learns "brighter than background is nucleus"
and, on real widefield images, paints the glow around nuclei too. So every image here
is drawn from wide ranges (domain randomization) of what real DAPI/Hoechst images show:

* **in-focus nuclei** (the only foreground): ellipse-like outlines with random harmonic
  wobble, 7-60 px across (a per-image scale of 0.5x-2x), clustered and touching but
  not overlapping, a few small, irregular and very bright mitotic figures; mottled
  chromatin texture with bright foci and dark nucleoli; brightness spread over about
  two orders of magnitude within one image and three between images; blurred by a
  narrow PSF, so even **dim nuclei have sharp edges**;
* **out-of-focus light** (background): blurred discs of nuclei in other focal planes
  ("ghosts", some brighter than the dimmest in-focus nuclei) and a soft halo around
  every in-focus nucleus;
* **uneven background**: low-frequency autofluorescence and a multiplicative
  illumination gradient / vignetting;
* **camera**: Poisson shot noise, Gaussian read noise, a camera offset (the darkest
  pixel is not 0), gain, saturation and quantization to uint8 or uint16.

The mask is the instance label image of the in-focus nuclei (0 = background, uint16),
rasterized from the same outlines the image was drawn from (a pixel is inside when its
centre is). Everything is a pure function of the random generator, so a seed fixes the
image exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from .errors import UNetError

__all__ = ["PROFILES", "Style", "SynthSample", "synth_image", "synth_set"]

_MAX_TRIES = 40  # placement attempts per nucleus before giving up on it


@dataclass(frozen=True)
class Style:
    """What a profile draws besides the classic widefield image (all off: ``classic``).

    Every option that is off draws nothing from the generator, so ``classic`` images are
    bit-identical to those of the first generator (the held-out sets keep their pixels).
    """

    diameter: tuple[float, float] | None = None  # mean nucleus diameter (px), log-uniform; None: classic 7-60
    classic: float = 0.0  # probability that an image is drawn as classic (the rest as this style)
    textured: float = 0.0  # probability that an image's nuclei carry a strong stain texture
    confocal: float = 0.0  # probability of confocal optics: little haze, few ghosts, crisp edges
    saturated: float = 0.0  # per nucleus: a very bright compact (saturated, mitotic-like) nucleus


PROFILES: dict[str, Style] = {
    "classic": Style(),
    # the bundled model's training mix: 40 % classic, the rest from 8 to 120 px, textured,
    # confocal and saturated (see docs/model.md)
    "microscopes": Style(diameter=(9.0, 110.0), classic=0.4, textured=0.45, confocal=0.35, saturated=0.04),
    "large": Style(diameter=(60.0, 120.0), textured=0.3, confocal=0.35, saturated=0.03),  # a 40x-100x objective
    "textured": Style(diameter=(20.0, 90.0), textured=1.0, confocal=0.35, saturated=0.03),
}


@dataclass(frozen=True)
class SynthSample:
    image: npt.NDArray[Any]  # (H, W) uint8 or uint16 camera counts
    labels: npt.NDArray[np.uint16]  # (H, W) instance ids of in-focus nuclei, 0 = background
    params: dict[str, float]  # the drawn imaging parameters (for inspection and tests)


@dataclass
class _Nucleus:
    cy: float
    cx: float
    radius: float  # mean radius in px
    aspect: float  # >= 1
    angle: float
    harmonics: npt.NDArray[np.float64]  # (K, 2): amplitude, phase for k = 2..K+1

    def radius_at(self, theta: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Outline radius at polar angle ``theta`` (an ellipse with a harmonic wobble)."""
        a = self.radius * np.sqrt(self.aspect)
        b = self.radius / np.sqrt(self.aspect)
        t = theta - self.angle
        r = a * b / np.sqrt((b * np.cos(t)) ** 2 + (a * np.sin(t)) ** 2)
        wobble = np.ones_like(theta)
        for k, (amp, phase) in enumerate(self.harmonics, start=2):
            wobble += amp * np.cos(k * theta + phase)
        return np.asarray(r * np.clip(wobble, 0.6, 1.4))

    def extent(self) -> float:
        return float(self.radius * np.sqrt(self.aspect) * 1.4 + 2)


def _loguniform(rng: np.random.Generator, low: float, high: float, size: Any = None) -> Any:
    return np.exp(rng.uniform(np.log(low), np.log(high), size))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> npt.NDArray[np.float64]:
    """Zero-mean, unit-std Gaussian-smoothed white noise."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return np.asarray((n - n.mean()) / max(float(n.std()), 1e-12))


def _random_nucleus(rng: np.random.Generator, cy: float, cx: float, radius: float, irregular: float) -> _Nucleus:
    k = 4
    harmonics = np.stack([rng.normal(0, irregular / np.arange(1, k + 1)), rng.uniform(0, 2 * np.pi, k)], axis=1)
    return _Nucleus(cy, cx, radius, float(rng.uniform(1.0, 1.9)), float(rng.uniform(0, np.pi)), harmonics)


def _footprint(
    nucleus: _Nucleus, shape: tuple[int, int]
) -> tuple[tuple[slice, slice], npt.NDArray[np.bool_], npt.NDArray[np.float64], npt.NDArray[np.float64]] | None:
    """Bounding box, inside mask (pixel centres), partial-volume coverage and r/R in the box."""
    e = nucleus.extent()
    y0, y1 = max(0, int(nucleus.cy - e)), min(shape[0], int(np.ceil(nucleus.cy + e)) + 1)
    x0, x1 = max(0, int(nucleus.cx - e)), min(shape[1], int(np.ceil(nucleus.cx + e)) + 1)
    if y1 <= y0 or x1 <= x0:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dy, dx = yy - nucleus.cy, xx - nucleus.cx
    dist = np.hypot(dy, dx)
    outline = nucleus.radius_at(np.arctan2(dy, dx))
    inside = dist < outline
    if not inside.any():
        return None
    coverage = np.clip(outline - dist + 0.5, 0.0, 1.0)  # ~1 px anti-aliased edge, > 0.5 exactly inside
    return (slice(y0, y1), slice(x0, x1)), inside, coverage, dist / outline


def _texture(
    rng: np.random.Generator, box_shape: tuple[int, int], rel: npt.NDArray[np.float64], radius: float
) -> npt.NDArray[np.float64]:
    """Multiplicative chromatin texture in a nucleus's box: mottling, foci, nucleoli, dome/rim."""
    grain = _smooth_noise(rng, box_shape, float(rng.uniform(0.7, 2.5)))
    tex = 1.0 + float(rng.uniform(0.05, 0.45)) * grain
    coarse = _smooth_noise(rng, box_shape, max(1.5, radius / 2.5))
    tex *= 1.0 + float(rng.uniform(0.0, 0.3)) * coarse
    dome = float(rng.uniform(-0.25, 0.45))  # > 0: brighter centre (thick nucleus), < 0: brighter rim
    tex *= np.clip(1.0 - dome * rel**2, 0.3, 2.0)
    h, w = box_shape
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(0, 3 if radius < 8 else 6))):  # foci bright, nucleoli dark
        py, px = rng.uniform(0, h), rng.uniform(0, w)
        s = rng.uniform(0.6, 0.18 * radius + 0.7)
        spot = np.exp(-((yy - py) ** 2 + (xx - px) ** 2) / (2 * s * s))
        tex *= 1.0 + float(rng.choice([-0.5, 0.8]) * rng.uniform(0.3, 1.0)) * spot
    return np.asarray(np.clip(tex, 0.25, None))


def _stain(rng: np.random.Generator, box_shape: tuple[int, int], radius: float) -> npt.NDArray[np.float64]:
    """A strong stain texture on top of the chromatin: PCNA-like speckles, bright foci
    (chromocentres), dark nucleoli and a bright envelope rim; dark gaps are still nucleus."""
    h, w = box_shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    tex = np.full(box_shape, float(rng.uniform(0.25, 0.7)))  # the dim base between the spots
    kinds = rng.random(4) < (0.6, 0.5, 0.5, 0.25)
    if not kinds.any():
        kinds[int(rng.integers(4))] = True
    area = np.pi * radius * radius
    if kinds[0]:  # speckles: many small bright dots
        n = int(np.clip(area / rng.uniform(15.0, 60.0), 5, 400))
        size = rng.uniform(0.7, max(0.8, min(2.5, 0.06 * radius)))
        dots = np.zeros(box_shape)
        iy, ix = rng.integers(0, h, n), rng.integers(0, w, n)
        np.add.at(dots, (iy, ix), rng.uniform(0.5, 1.5, n))
        tex += float(rng.uniform(1.0, 3.0)) * ndimage.gaussian_filter(dots, size) * (2 * np.pi * size * size)
    if kinds[1]:  # foci: a few large bright chromocentres
        for _ in range(int(rng.integers(2, 12))):
            py, px, sg = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.14) * radius + 0.8
            tex += float(rng.uniform(0.8, 3.0)) * np.exp(-((yy - py) ** 2 + (xx - px) ** 2) / (2 * sg * sg))
    if kinds[2]:  # nucleoli: large dark holes in the stain
        for _ in range(int(rng.integers(1, 5))):
            py, px = h / 2 + rng.uniform(-0.5, 0.5) * h / 2, w / 2 + rng.uniform(-0.5, 0.5) * w / 2
            sg = rng.uniform(0.1, 0.25) * radius + 0.8
            tex *= 1.0 - float(rng.uniform(0.6, 0.95)) * np.exp(-((yy - py) ** 2 + (xx - px) ** 2) / (2 * sg * sg))
    if kinds[3]:  # a bright rim (nuclear envelope, lamina-like)
        d = np.hypot(yy - h / 2, xx - w / 2) / max(h / 2, 1.0)
        tex += float(rng.uniform(0.5, 1.5)) * np.exp(-(((d - 0.6) / 0.12) ** 2))
    return np.asarray(np.clip(tex / max(float(tex.mean()), 1e-9), 0.03, None))


def _place(
    rng: np.random.Generator,
    shape: tuple[int, int],
    labels: npt.NDArray[np.uint16],
    placed: list[_Nucleus],
    mean_radius: float,
    cluster_prob: float,
    irregular: float,
) -> (
    tuple[_Nucleus, tuple[slice, slice], npt.NDArray[np.bool_], npt.NDArray[np.float64], npt.NDArray[np.float64]] | None
):
    """A new nucleus that overlaps the existing ones by at most a sliver (it then yields to them)."""
    for _ in range(_MAX_TRIES):
        radius = float(mean_radius * rng.lognormal(0.0, 0.18))
        if placed and rng.random() < cluster_prob:  # touch a neighbour: clusters
            other = placed[int(rng.integers(len(placed)))]
            theta = rng.uniform(0, 2 * np.pi)
            reach = (other.radius + radius) * rng.uniform(0.8, 1.05)
            cy, cx = other.cy + reach * np.sin(theta), other.cx + reach * np.cos(theta)
        else:
            cy, cx = rng.uniform(-radius, shape[0] + radius), rng.uniform(-radius, shape[1] + radius)
        nucleus = _random_nucleus(rng, float(cy), float(cx), radius, irregular)
        fp = _footprint(nucleus, shape)
        if fp is None:
            continue
        box, inside, coverage, rel = fp
        clash = inside & (labels[box] > 0)
        if clash.sum() <= 0.08 * inside.sum():
            return nucleus, box, inside & ~clash, coverage * (labels[box] == 0), rel
    return None


def synth_image(
    rng: np.random.Generator,
    shape: tuple[int, int] = (384, 384),
    *,
    dtype: str | None = None,
    profile: str | Style = "classic",
) -> SynthSample:
    """One synthetic widefield fluorescence image of nuclei and its instance mask.

    ``dtype``: ``"uint8"`` or ``"uint16"``; drawn at random (half each) when None.
    ``profile``: a name in :data:`PROFILES` or a :class:`Style`; ``"classic"`` is the first
    generator, bit for bit.

    >>> s = synth_image(np.random.default_rng(0), (64, 96), dtype="uint16")
    >>> s.image.shape, s.image.dtype.name, s.labels.dtype.name
    ((64, 96), 'uint16', 'uint16')
    """
    if len(shape) != 2 or min(shape) < 8:
        raise UNetError(f"synthetic image shape must be (H, W) with both >= 8, got {shape}")
    if dtype is None:
        dtype = "uint8" if rng.random() < 0.5 else "uint16"
    if dtype not in ("uint8", "uint16"):
        raise UNetError(f"dtype must be 'uint8' or 'uint16', got {dtype!r}")
    style = _style(profile)
    if style.diameter is not None and style.classic > 0 and rng.random() < style.classic:
        style = PROFILES["classic"]
    h, w = shape
    if style.diameter is None:
        scale = float(_loguniform(rng, 0.5, 2.0))  # microscope magnification / binning
        mean_radius = float(rng.uniform(7.0, 15.0) * scale)
    else:
        mean_radius = float(_loguniform(rng, *style.diameter)) / 2.0
        scale = mean_radius / 11.0
    textured = style.textured > 0 and rng.random() < style.textured
    confocal = style.confocal > 0 and rng.random() < style.confocal
    coverage_target = float(rng.uniform(0.02, 0.45))
    cluster_prob = float(rng.uniform(0.0, 0.85))
    irregular = float(_loguniform(rng, 0.01, 0.12))
    n_target = int(coverage_target * h * w / (np.pi * mean_radius**2)) + int(rng.integers(0, 3))

    # --- in-focus nuclei, relative brightness (photons are set by the camera below)
    labels = np.zeros(shape, np.uint16)
    signal = np.zeros(shape)
    placed: list[_Nucleus] = []
    # camera and background levels first: they bound how dim an in-focus nucleus may be
    photons_peak = float(_loguniform(rng, 25.0, 4000.0))  # photons at relative brightness 1
    read_noise_e = float(_loguniform(rng, 0.5, 6.0))
    bg_level = float(_loguniform(rng, 0.003, 0.08))
    dark_corner = float(rng.uniform(0.45, 1.0))  # illumination at the darkest spot
    noise = np.sqrt(bg_level * photons_peak + read_noise_e**2)
    # dimmest nucleus >= ~2.5x the background noise per pixel: dim but visible, never invisible
    spread_max = photons_peak * dark_corner / (4.0 * noise)
    spread = float(_loguniform(rng, 1.2, float(np.clip(spread_max, 1.5, 40.0))))  # within-image range
    for _ in range(n_target):
        mitotic = rng.random() < 0.05
        saturated = style.saturated > 0 and rng.random() < style.saturated
        r_mean = mean_radius * (rng.uniform(0.35, 0.6) if mitotic else rng.uniform(0.4, 0.75) if saturated else 1.0)
        found = _place(rng, shape, labels, placed, r_mean, cluster_prob, 0.25 if mitotic else irregular)
        if found is None:
            continue
        nucleus, box, inside, coverage, rel = found
        if not inside.any() or len(placed) >= 65534:
            continue
        placed.append(nucleus)
        labels[box][inside] = len(placed)
        brightness = float(_loguniform(rng, 1.0 / spread, 1.0)) * (rng.uniform(2.0, 6.0) if mitotic else 1.0)
        tex = _texture(rng, inside.shape, rel, nucleus.radius)
        if saturated:  # compact and far brighter than the rest: clipped by the camera, sharp-edged
            brightness = float(rng.uniform(3.0, 25.0))
            tex = 0.5 + 0.5 * tex
        elif textured and nucleus.radius >= 6:
            tex = tex**0.5 * _stain(rng, inside.shape, nucleus.radius)
        signal[box] += brightness * coverage * tex

    # --- optics: narrow in-focus PSF; halo around in-focus nuclei; out-of-focus ghosts
    # in focus: edges blurred by at most ~a fifth of the radius, however soft the optics
    psf = float(min(rng.uniform(0.5, 2.0) * max(1.0, scale**0.5), 0.2 * mean_radius + 0.3))
    if confocal:  # an optical section: a tight PSF
        psf = float(min(psf, rng.uniform(0.5, 1.3)))
    image = ndimage.gaussian_filter(signal, psf)
    halo_sigma = float(rng.uniform(3.0, 12.0) * max(1.0, scale**0.5))
    image += float(rng.uniform(0.0, 0.05 if confocal else 0.35)) * ndimage.gaussian_filter(signal, halo_sigma)
    ghosts = np.zeros(shape)
    n_ghosts = int(n_target * rng.uniform(0.0, 1.0) ** 2 * (0.25 if confocal else 1.2)) + int(rng.integers(0, 3))
    for _ in range(n_ghosts):
        r = float(mean_radius * rng.lognormal(0.0, 0.25))
        g = _random_nucleus(rng, rng.uniform(0, h), rng.uniform(0, w), r, irregular)
        fp = _footprint(g, shape)
        if fp is None:
            continue
        box, _inside, coverage, rel = fp
        ghosts[box] += float(_loguniform(rng, 1.0 / spread, 1.5)) * coverage * _texture(rng, coverage.shape, rel, r)
    # out of focus: clearly softer than the in-focus PSF, whatever the brightness
    ghost_sigma = float(max(3.0, 2.5 * psf, rng.uniform(0.35, 0.8) * mean_radius))
    image += ndimage.gaussian_filter(ghosts, ghost_sigma)

    # --- background and illumination
    auto = _smooth_noise(rng, shape, float(rng.uniform(20.0, 80.0)))
    background = bg_level * (1.0 + float(rng.uniform(0.0, 0.6)) * auto)
    image += np.clip(background, 0.0, None)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    tilt = rng.uniform(-1, 1, 2)
    cy, cx = rng.uniform(0.0, 1.0, 2)
    vignette = float(rng.uniform(0.0, 1.5)) * ((yy - cy) ** 2 + (xx - cx) ** 2)
    illumination = 1.0 + tilt[0] * (yy - 0.5) + tilt[1] * (xx - 0.5) - vignette
    lo, hi = float(illumination.min()), float(illumination.max())
    illumination = dark_corner + (1.0 - dark_corner) * (illumination - lo) / max(hi - lo, 1e-9)
    image *= illumination

    # --- camera: photons -> Poisson -> gain -> read noise -> offset -> saturation, quantization
    expected = image * photons_peak
    full = 255.0 if dtype == "uint8" else float(rng.choice([4095.0, 65535.0]))
    offset = float(rng.uniform(0.0, 0.08) * full) if rng.random() < 0.8 else 0.0
    headroom = float(rng.uniform(0.35, 1.3))  # < 1: the brightest pixels saturate
    bright = float(np.percentile(expected, 99.9)) + 1e-9
    gain = (full - offset) * headroom / bright  # counts per photon
    counts = gain * (rng.poisson(expected) + rng.normal(0.0, read_noise_e, shape)) + offset
    out = np.clip(np.rint(counts), 0, full).astype(dtype)
    params = {
        "scale": scale,
        "mean_radius": mean_radius,
        "psf_sigma": psf,
        "ghost_sigma": ghost_sigma,
        "photons_peak": photons_peak,
        "gain": gain,
        "offset": offset,
        "read_noise_e": read_noise_e,
        "nuclei": float(len(placed)),
        "ghosts": float(n_ghosts),
    }
    if style.diameter is not None:
        params.update(textured=float(textured), confocal=float(confocal))
    return SynthSample(out, labels, params)


def _style(profile: str | Style) -> Style:
    if isinstance(profile, Style):
        return profile
    if profile not in PROFILES:
        raise UNetError(f"unknown synthetic profile {profile!r}; choose from {sorted(PROFILES)}")
    return PROFILES[profile]


def synth_set(
    n: int,
    *,
    seed: int = 0,
    shape: tuple[int, int] = (384, 384),
    dtype: str | None = None,
    profile: str | Style = "classic",
) -> list[SynthSample]:
    """``n`` images, each from its own stream ``default_rng([seed, i])`` (so image i of a
    seed is the same whatever ``n`` is)."""
    if n < 0:
        raise UNetError(f"n must be >= 0, got {n}")
    return [synth_image(np.random.default_rng([seed, i]), shape, dtype=dtype, profile=profile) for i in range(n)]
