"""Synthetic nucleus images in the exact DSB2018 layout: the built-in default training data.

``generate_sample`` draws elliptical nuclei with irregular boundaries, random size and orientation,
some touching or slightly overlapping their neighbours (absorbance or fluorescence adds up where
they overlap; the label map keeps the nucleus drawn last), and renders them in one of three styles:

- ``fluorescence``: dark background, bright textured nuclei (grayscale, sometimes tinted);
- ``brightfield``: light background, darker nuclei (absorbance model);
- ``he``: H&E-like, pink eosin background with fibre texture, purple hematoxylin nuclei.

Every style adds a smooth illumination gradient, a slight blur and Gaussian noise.
``write_synthetic_dataset`` writes ``root/<id>/images/<id>.png`` (RGBA, like Kaggle's) and one
binary 0/255 PNG per nucleus in ``root/<id>/masks/``. Each sample depends only on (seed, index),
so the same seed gives identical bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from unet_ray.io.dsb import write_dsb_sample
from unet_ray.io.files import make_dirs

STYLES = ("fluorescence", "brightfield", "he")
STANDARD_TILE = 256  # the training tile side: the dataset holds images below and above it
MIN_NUCLEUS_AREA = 12  # nuclei (or border-cropped parts) smaller than this are dropped (pixels)
MAX_OCCLUDED_FRACTION = 0.3  # a new nucleus may cover at most this much of an older one
TOUCH_PROBABILITY = 0.4  # chance a nucleus is placed against an existing one
TOUCH_DISTANCE = (0.75, 0.95)  # centre distance / (sum of radii) for touching nuclei
COVERAGE = (0.12, 0.3)  # fraction of the image covered by nuclei
PLACEMENT_ATTEMPTS = 4  # tries per nucleus before giving it up
AXIS_RATIO = (0.55, 1.0)  # minor / major semi-axis
BOUNDARY_HARMONICS = (2, 3, 4, 5)  # Fourier modes that make the outline irregular
BOUNDARY_AMPLITUDE = 0.08  # relative amplitude of each boundary harmonic (at most)
MEAN_RADIUS = {"fluorescence": (5.0, 13.0), "brightfield": (6.0, 14.0), "he": (4.5, 9.0)}
MAX_RADIUS_FRACTION = 0.12  # mean nucleus radius at most this fraction of the shorter side
BLUR_SIGMA = (0.5, 1.1)
NOISE_SIGMA = (2.0, 6.0)  # Gaussian noise, in 0..255 grey levels
TEXTURE_SIGMA = 1.5  # chromatin texture scale (pixels)
FIBRE_SIGMA = 4.0  # eosin-stained stroma texture scale (pixels)
HEMATOXYLIN = np.array([0.65, 0.70, 0.29], dtype=np.float32)  # optical density per RGB channel
EOSIN = np.array([0.10, 0.60, 0.25], dtype=np.float32)
OPTICAL_DENSITY_SCALE = 2.3  # ln(10): optical density to natural absorbance
ID_NAMESPACE = "unet_ray.synth"


@dataclass(frozen=True)
class Nucleus:
    centre_y: float
    centre_x: float
    major: float  # semi-axes, pixels
    minor: float
    angle: float  # radians
    harmonics: tuple[tuple[float, float], ...]  # (amplitude, phase) per BOUNDARY_HARMONICS mode

    @property
    def radius(self) -> float:
        return float(np.sqrt(self.major * self.minor))


def write_synthetic_dataset(
    root, count: int = 24, seed: int = 0, min_side: int = 64, max_side: int = 320
) -> list[str]:
    """Write ``count`` samples in DSB2018 layout under ``root`` (local path or s3://); return ids."""
    if count < 1:
        raise ValueError(f"count={count} must be at least 1")
    if not 16 <= min_side <= max_side:
        raise ValueError(
            f"need 16 <= min_side <= max_side, got min_side={min_side}, max_side={max_side}"
        )
    root = str(root)
    make_dirs(root)
    sample_ids = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        height, width = draw_image_size(rng, index, min_side, max_side)
        style = STYLES[index % len(STYLES)]
        image, labels = generate_sample(rng, height, width, style)
        sample_id = make_hex_id(f"{ID_NAMESPACE}:{seed}:{index}")
        mask_count = int(labels.max())
        mask_ids = [make_hex_id(f"{sample_id}:mask:{label}") for label in range(1, mask_count + 1)]
        write_dsb_sample(root, sample_id, image, labels, mask_ids=mask_ids)
        sample_ids.append(sample_id)
    return sample_ids


def make_hex_id(text: str) -> str:
    """A 64-character hex id (like Kaggle's) derived from ``text``."""
    return hashlib.sha256(text.encode()).hexdigest()


def draw_image_size(
    rng: np.random.Generator, index: int, min_side: int, max_side: int
) -> tuple[int, int]:
    """Image (height, width): sample 0 below the training tile, sample 1 above it, when the range
    allows; otherwise uniform. Height and width differ whenever the range has two values."""
    low, high = min_side, max_side
    if index == 0 and min_side < STANDARD_TILE:
        high = min(max_side, STANDARD_TILE - 1)
    elif index == 1 and max_side > STANDARD_TILE:
        low = max(min_side, STANDARD_TILE + 1)
    height = int(rng.integers(low, high + 1))
    width = int(rng.integers(low, high + 1))
    if width == height and high > low:
        width = low if height == high else height + 1
    return height, width


def generate_sample(
    rng: np.random.Generator, height: int, width: int, style: str
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image (uint8 H x W x 3) and its int32 instance labels (0 = background)."""
    if style not in STYLES:
        raise ValueError(f"style '{style}' is not one of {STYLES}")
    labels, overlap = place_nuclei(rng, height, width, style)
    texture = smooth_noise(rng, (height, width), TEXTURE_SIGMA)
    profile = nucleus_profile(labels)
    illumination = illumination_field(rng, height, width)
    if style == "fluorescence":
        image = render_fluorescence(rng, labels, overlap, profile, texture, illumination)
    elif style == "brightfield":
        image = render_brightfield(rng, labels, overlap, profile, texture, illumination)
    else:
        image = render_he(rng, labels, overlap, profile, texture, illumination)
    image = finish_image(rng, image)
    return image, labels


# --------------------------------------------------------------------------------------------
# Geometry: nuclei and the label map
# --------------------------------------------------------------------------------------------


def draw_nucleus(
    rng: np.random.Generator, centre_y: float, centre_x: float, radius: float
) -> Nucleus:
    ratio = rng.uniform(*AXIS_RATIO)
    major = radius / np.sqrt(ratio)
    harmonics = tuple(
        (rng.uniform(0.0, BOUNDARY_AMPLITUDE), rng.uniform(0.0, 2 * np.pi))
        for _ in BOUNDARY_HARMONICS
    )
    return Nucleus(centre_y, centre_x, major, major * ratio, rng.uniform(0.0, np.pi), harmonics)


def rasterise_nucleus(
    nucleus: Nucleus, height: int, width: int
) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """(bounding-box slices, boolean mask within the box), or None when it misses the image."""
    reach = nucleus.major * (1 + BOUNDARY_AMPLITUDE * len(BOUNDARY_HARMONICS)) + 1
    top, bottom = (
        max(0, int(nucleus.centre_y - reach)),
        min(height, int(nucleus.centre_y + reach) + 1),
    )
    left, right = (
        max(0, int(nucleus.centre_x - reach)),
        min(width, int(nucleus.centre_x + reach) + 1),
    )
    if top >= bottom or left >= right:
        return None
    rows, columns = np.mgrid[top:bottom, left:right].astype(np.float32)
    offset_y, offset_x = rows - nucleus.centre_y, columns - nucleus.centre_x
    cosine, sine = np.cos(nucleus.angle), np.sin(nucleus.angle)
    along = (offset_x * cosine + offset_y * sine) / nucleus.major
    across = (-offset_x * sine + offset_y * cosine) / nucleus.minor
    polar_angle = np.arctan2(across, along)
    boundary = np.ones_like(polar_angle)
    for mode, (amplitude, phase) in zip(BOUNDARY_HARMONICS, nucleus.harmonics, strict=True):
        boundary += amplitude * np.cos(mode * polar_angle + phase)
    inside = np.hypot(along, across) <= boundary
    return (slice(top, bottom), slice(left, right)), inside


def place_nuclei(
    rng: np.random.Generator, height: int, width: int, style: str
) -> tuple[np.ndarray, np.ndarray]:
    """Label map (int32, later nuclei on top) and a map of pixels covered by two or more nuclei."""
    low, high = MEAN_RADIUS[style]
    mean_radius = min(rng.uniform(low, high), MAX_RADIUS_FRACTION * min(height, width))
    mean_radius = max(mean_radius, 3.0)
    target = int(rng.uniform(*COVERAGE) * height * width / (np.pi * mean_radius**2)) + 1
    labels = np.zeros((height, width), dtype=np.int32)
    coverage = np.zeros((height, width), dtype=np.uint8)
    areas = [0]  # full visible area of each label when it was drawn; index = label
    placed: list[Nucleus] = []
    for _ in range(target):
        radius = mean_radius * rng.uniform(0.7, 1.3)
        for _attempt in range(PLACEMENT_ATTEMPTS):
            nucleus = propose_nucleus(rng, placed, radius, height, width)
            drawn = rasterise_nucleus(nucleus, height, width)
            if drawn is None or drawn[1].sum() < MIN_NUCLEUS_AREA:
                continue
            box, inside = drawn
            if occludes_too_much(labels[box][inside], areas):
                continue
            label = len(areas)
            labels[box][inside] = label
            coverage[box][inside] += 1
            areas.append(int(inside.sum()))
            placed.append(nucleus)
            break
    labels = keep_largest_parts(labels)
    overlap = (coverage > 1) & (labels > 0)
    return labels, overlap


def propose_nucleus(
    rng: np.random.Generator, placed: list[Nucleus], radius: float, height: int, width: int
) -> Nucleus:
    """A nucleus against a random existing one (touching/overlapping) or anywhere in the image."""
    if placed and rng.random() < TOUCH_PROBABILITY:
        neighbour = placed[int(rng.integers(len(placed)))]
        direction = rng.uniform(0.0, 2 * np.pi)
        distance = (neighbour.radius + radius) * rng.uniform(*TOUCH_DISTANCE)
        centre_y = neighbour.centre_y + distance * np.sin(direction)
        centre_x = neighbour.centre_x + distance * np.cos(direction)
    else:
        margin = radius / 2
        centre_y = rng.uniform(-margin, height + margin)
        centre_x = rng.uniform(-margin, width + margin)
    return draw_nucleus(rng, centre_y, centre_x, radius)


def occludes_too_much(covered_labels: np.ndarray, areas: list[int]) -> bool:
    """True when a new nucleus would hide more than MAX_OCCLUDED_FRACTION of an existing one."""
    hidden_labels, hidden_counts = np.unique(covered_labels[covered_labels > 0], return_counts=True)
    return any(
        count > MAX_OCCLUDED_FRACTION * areas[label]
        for label, count in zip(hidden_labels, hidden_counts, strict=True)
    )


def keep_largest_parts(labels: np.ndarray) -> np.ndarray:
    """Keep each label's largest connected part; drop tiny labels; renumber 1..N in draw order."""
    cleaned = np.zeros_like(labels)
    next_label = 1
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        region = labels[box] == label
        parts, part_count = ndimage.label(region)
        if part_count > 1:
            sizes = ndimage.sum_labels(region, parts, index=range(1, part_count + 1))
            region = parts == int(np.argmax(sizes)) + 1
        if region.sum() < MIN_NUCLEUS_AREA:
            continue
        cleaned[box][region] = next_label
        next_label += 1
    return cleaned


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with zero mean and unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return (noise - noise.mean()) / max(float(noise.std()), 1e-6)


def nucleus_profile(labels: np.ndarray) -> np.ndarray:
    """0 outside nuclei; inside, rises from about 0.6 at a nucleus edge to 1 in its interior."""
    foreground = labels > 0
    edges = np.zeros_like(foreground)
    edges[:-1] |= labels[:-1] != labels[1:]
    edges[1:] |= labels[:-1] != labels[1:]
    edges[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edges[:, 1:] |= labels[:, :-1] != labels[:, 1:]
    interior = foreground & ~edges
    distance = ndimage.distance_transform_edt(interior).astype(np.float32)
    return np.where(foreground, 1.0 - 0.4 * np.exp(-distance / 2.0), 0.0).astype(np.float32)


def illumination_field(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth field around 0: a linear gradient in a random direction plus a broad bump."""
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    direction = rng.uniform(0.0, 2 * np.pi)
    ramp = (rows / height - 0.5) * np.sin(direction) + (columns / width - 0.5) * np.cos(direction)
    bump_y, bump_x = rng.uniform(0, height), rng.uniform(0, width)
    spread = 0.6 * max(height, width)
    bump = np.exp(-((rows - bump_y) ** 2 + (columns - bump_x) ** 2) / (2 * spread**2))
    return (ramp + 0.5 * (bump - bump.mean())).astype(np.float32)


def per_nucleus_values(
    rng: np.random.Generator, labels: np.ndarray, low: float, high: float
) -> np.ndarray:
    """A random level per nucleus, looked up per pixel (0 in the background)."""
    levels = np.concatenate([[0.0], rng.uniform(low, high, int(labels.max()))]).astype(np.float32)
    return levels[labels]


def render_fluorescence(rng, labels, overlap, profile, texture, illumination) -> np.ndarray:
    background = rng.uniform(4.0, 30.0) + rng.uniform(5.0, 25.0) * illumination
    level = per_nucleus_values(rng, labels, 70.0, 230.0)
    signal = level * profile * (1.0 + 0.15 * texture) * (1.0 + 0.35 * overlap)
    gray = np.maximum(background, 0.0) + signal
    tint = np.ones(3, dtype=np.float32)
    if rng.random() < 0.25:  # some DSB2018 fluorescence images are coloured
        tint = rng.uniform(0.4, 1.0, 3).astype(np.float32)
        tint /= tint.max()
    return gray[:, :, None] * tint


def render_brightfield(rng, labels, overlap, profile, texture, illumination) -> np.ndarray:
    light = rng.uniform(215.0, 250.0) * (1.0 + 0.12 * illumination)
    density = per_nucleus_values(rng, labels, 0.25, 0.6) * profile * (1.0 + 0.2 * texture)
    density = density * (1.0 + 0.5 * overlap) + rng.uniform(0.02, 0.08)
    channel_density = rng.uniform(0.85, 1.15, 3).astype(np.float32)  # slight colour cast
    absorbance = OPTICAL_DENSITY_SCALE * density[:, :, None] * channel_density
    return light[:, :, None] * np.exp(-absorbance)


def render_he(rng, labels, overlap, profile, texture, illumination) -> np.ndarray:
    fibres = smooth_noise(rng, labels.shape, FIBRE_SIGMA)
    eosin = rng.uniform(0.25, 0.5) * np.clip(1.0 + 0.35 * fibres, 0.2, None)
    hematoxylin = per_nucleus_values(rng, labels, 0.5, 1.0) * profile * (1.0 + 0.25 * texture)
    hematoxylin = hematoxylin * (1.0 + 0.4 * overlap) + rng.uniform(0.02, 0.06)
    density = eosin[:, :, None] * EOSIN + hematoxylin[:, :, None] * HEMATOXYLIN
    light = rng.uniform(225.0, 250.0) * (1.0 + 0.1 * illumination)
    return light[:, :, None] * np.exp(-OPTICAL_DENSITY_SCALE * density)


def finish_image(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Slight optical blur, Gaussian noise, then clip to uint8."""
    sigma = rng.uniform(*BLUR_SIGMA)
    blurred = ndimage.gaussian_filter(image.astype(np.float32), sigma=(sigma, sigma, 0))
    noisy = blurred + rng.normal(0.0, rng.uniform(*NOISE_SIGMA), blurred.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
