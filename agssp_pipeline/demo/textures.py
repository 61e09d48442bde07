"""Synthetic metal surface textures (float32 grey levels, 0-255 scale, before lighting and sensor noise).

Each texture is built from a few vectorised noise fields (OpenCV blurs and resizes), so a 160x160
image costs well under a millisecond; the look matches the three product families the demo stands for.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

TextureFn = Callable[[np.random.Generator, int, int], np.ndarray]


def value_noise(
    rng: np.random.Generator, height: int, width: int, cell: float, stretch: float = 1.0
) -> np.ndarray:
    """Smooth zero-mean unit-variance noise, feature size ``cell`` px across and ``cell * stretch`` px down.

    A bicubic-upsampled random lattice: cheap, and ``stretch`` > 1 gives the streakiness of rolled
    products along the rolling direction.
    """
    cell_y = cell * stretch
    grid_h = max(2, int(np.ceil(height / cell_y)) + 2)
    grid_w = max(2, int(np.ceil(width / cell)) + 2)
    lattice = rng.standard_normal((grid_h, grid_w)).astype(np.float32)
    big = cv2.resize(lattice, (int(grid_w * cell), int(grid_h * cell_y)), interpolation=cv2.INTER_CUBIC)
    off_y = int(rng.integers(0, max(1, big.shape[0] - height)))
    off_x = int(rng.integers(0, max(1, big.shape[1] - width)))
    field = big[off_y : off_y + height, off_x : off_x + width]
    return _standardise(field)


def fractal_noise(
    rng: np.random.Generator,
    height: int,
    width: int,
    cells: tuple[float, ...],
    gains: tuple[float, ...],
    stretch: float = 1.0,
) -> np.ndarray:
    """Sum of value-noise octaves (feature sizes ``cells`` with weights ``gains``), standardised."""
    octaves = zip(cells, gains, strict=True)
    field = sum(g * value_noise(rng, height, width, c, stretch) for c, g in octaves)
    return _standardise(np.asarray(field, dtype=np.float32))


def _standardise(field: np.ndarray) -> np.ndarray:
    std = float(field.std())
    return ((field - field.mean()) / (std if std > 1e-6 else 1.0)).astype(np.float32)


def _rotate(image: np.ndarray, angle_deg: float, height: int, width: int) -> np.ndarray:
    """Rotate a larger canvas about its centre and crop the central ``height x width`` window."""
    rows, cols = image.shape
    matrix = cv2.getRotationMatrix2D((cols / 2, rows / 2), angle_deg, 1.0)
    rotated = cv2.warpAffine(
        image, matrix, (cols, rows), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )
    top, left = (rows - height) // 2, (cols - width) // 2
    return rotated[top : top + height, left : left + width]


def brushed_steel(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Brushed/ground steel: long anisotropic polishing streaks at a small angle plus fine grain."""
    pad = int(0.45 * max(height, width))
    canvas_h, canvas_w = height + 2 * pad, width + 2 * pad
    streak_len = int(rng.integers(31, 71)) | 1
    white = rng.standard_normal((canvas_h, canvas_w)).astype(np.float32)
    streaks = cv2.blur(white, (streak_len, 1))
    streaks = cv2.GaussianBlur(streaks, (0, 0), sigmaX=1.0, sigmaY=float(rng.uniform(0.5, 1.1)))
    streaks = _rotate(_standardise(streaks), float(rng.uniform(-6, 6)), height, width)
    grain = _standardise(
        cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), 0.7)
    )
    sheen = value_noise(rng, height, width, cell=float(rng.uniform(50, 90)))
    base = rng.uniform(125, 165)
    return (
        base
        + rng.uniform(6.0, 10.0) * streaks
        + rng.uniform(2.0, 3.5) * grain
        + rng.uniform(3.0, 7.0) * sheen
    ).astype(np.float32)


def rolled_strip(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Hot-rolled strip (rolling direction = image columns): mottled oxide scale, streaky along the roll,
    with soft darker scale blotches."""
    stretch = float(rng.uniform(2.0, 4.0))
    mottle = fractal_noise(
        rng, height, width, cells=(2.0, 5.0, 12.0, 30.0), gains=(0.5, 0.55, 0.5, 0.45), stretch=stretch
    )
    blotch_field = fractal_noise(
        rng, height, width, cells=(14.0, 35.0), gains=(0.6, 1.0), stretch=stretch / 1.5
    )
    level = float(rng.uniform(0.3, 0.9))
    blotches = 1.0 / (1.0 + np.exp(-(_standardise(blotch_field) - level) * 4.0))
    grain = _standardise(rng.standard_normal((height, width)).astype(np.float32))
    base = rng.uniform(110, 150)
    return (
        base
        + rng.uniform(7.0, 11.0) * mottle
        - rng.uniform(8.0, 16.0) * blotches
        + rng.uniform(2.5, 4.5) * grain
    ).astype(np.float32)


def cast_billet(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Continuously cast billet: coarse granular skin, periodic wavy oscillation marks across the strand."""
    coarse = _standardise(
        cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), 1.8)
    )
    granules = _standardise(
        cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), 0.8)
    )
    period = float(rng.uniform(18, 30))
    rows = np.arange(height, dtype=np.float32)[:, None]
    wobble = 0.25 * period * value_noise(rng, 1, width, cell=40.0)[0][None, :]
    phase = 2 * np.pi * (rows + wobble) / period + rng.uniform(0, 2 * np.pi)
    # sharp troughs: the marks are narrow depressions, not a sinusoid
    marks = np.exp(-((1 - np.cos(phase)) / 0.25)).astype(np.float32)
    large = value_noise(rng, height, width, cell=float(rng.uniform(40, 70)))
    base = rng.uniform(95, 130)
    return (
        base
        + rng.uniform(6.0, 9.0) * coarse
        + rng.uniform(2.5, 4.0) * granules
        - rng.uniform(8.0, 14.0) * marks
        + rng.uniform(4.0, 8.0) * large
    ).astype(np.float32)


TEXTURES: dict[str, TextureFn] = {
    "brushed_steel": brushed_steel,
    "rolled_strip": rolled_strip,
    "cast_billet": cast_billet,
}


def make_texture(name: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    try:
        texture = TEXTURES[name]
    except KeyError:
        raise KeyError(f"unknown texture '{name}' (known: {', '.join(TEXTURES)})") from None
    return texture(rng, height, width)
