"""Synthetic anomalies on normal images (DRAEM / CutPaste style), for training the feature adaptor.

Why: ADPretrain learns from anomaly masks, and most pretraining sources have few or none. Pasting
foreign structure onto normal images gives unlimited (image, mask) pairs with known pixels, and every
recipe is general (no dataset-specific constants):

- ``perlin_texture``: a thresholded Perlin-noise mask filled with a foreign texture (another image of
  the pool, rotated and rescaled, or generated noise when there is none), blended with opacity ``beta``;
- ``perlin_intensity``: the same kind of mask, inside which brightness / contrast / colour change;
- ``cutpaste``: a rectangle of the image itself, jittered in brightness, pasted elsewhere (CutPaste).

The input image is never modified (a copy is returned). ``SyntheticRecipe.as_dict`` is written to the
adaptor checkpoint's lineage so a trained adaptor says how its anomalies were made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

KINDS = ("perlin_texture", "perlin_intensity", "cutpaste")


@dataclass(frozen=True)
class SyntheticRecipe:
    """Which anomaly kinds, how likely, and the knobs of each; ``seed`` makes a run reproducible."""

    kinds: tuple[str, ...] = KINDS
    weights: tuple[float, ...] = (0.4, 0.3, 0.3)
    perlin_scales: tuple[int, ...] = (2, 4, 8)  # lattice cells per image side
    perlin_threshold: float = 0.5  # noise (in [-1, 1] roughly) above this is anomalous
    beta: tuple[float, float] = (0.3, 0.9)  # opacity of the foreign texture
    cut_fraction: tuple[float, float] = (0.05, 0.25)  # side of a CutPaste patch, fraction of the image side
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(KINDS)
        if unknown or len(self.kinds) != len(self.weights) or not self.kinds:
            raise ValueError(f"recipe kinds must be among {KINDS} with one weight each; got {self.kinds}, "
                             f"{self.weights}")

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def perlin_noise(height: int, width: int, scale: int, rng: np.random.Generator) -> np.ndarray:
    """2D Perlin gradient noise (roughly [-1, 1]) with ``scale`` lattice cells along each side."""
    cells = max(1, int(scale))
    angles = rng.uniform(0, 2 * np.pi, (cells + 1, cells + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    ys = np.linspace(0, cells, height, endpoint=False)
    xs = np.linspace(0, cells, width, endpoint=False)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    y0, x0 = grid_y.astype(int), grid_x.astype(int)
    fy, fx = grid_y - y0, grid_x - x0

    def corner(dy: int, dx: int) -> np.ndarray:
        g = gradients[y0 + dy, x0 + dx]
        return g[..., 0] * (fx - dx) + g[..., 1] * (fy - dy)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    u, v = fade(fx), fade(fy)
    top = corner(0, 0) * (1 - u) + corner(0, 1) * u
    bottom = corner(1, 0) * (1 - u) + corner(1, 1) * u
    return (top * (1 - v) + bottom * v) * np.sqrt(2)


def perlin_mask(height: int, width: int, recipe: SyntheticRecipe, rng: np.random.Generator) -> np.ndarray:
    """A non-empty boolean blob mask from thresholded Perlin noise, randomly rotated."""
    for _ in range(8):
        scale = int(rng.choice(recipe.perlin_scales))
        noise = perlin_noise(height, width, scale, rng)
        mask = noise > recipe.perlin_threshold
        if mask.any():
            return mask
    # smooth noise rarely stays below the threshold everywhere; then one ellipse stands in
    mask = np.zeros((height, width), np.uint8)
    centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
    axes = (max(1, width // 8), max(1, height // 8))
    cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return mask.astype(bool)


def _foreign_texture(shape: tuple[int, int, int], rng: np.random.Generator,
                     textures: list[np.ndarray] | None) -> np.ndarray:
    """Another image, rotated by a multiple of 90 degrees and resized, or coloured noise when none is given."""
    height, width = shape[:2]
    if textures:
        texture = textures[int(rng.integers(len(textures)))]
        texture = np.rot90(texture, int(rng.integers(4))).copy()
        texture = cv2.resize(texture, (width, height), interpolation=cv2.INTER_LINEAR)
        if texture.ndim == 2:
            texture = np.repeat(texture[:, :, None], 3, axis=2)
        return texture.astype(np.float32)
    cells = int(rng.choice([4, 8, 16]))
    coarse = rng.uniform(0, 255, (cells, cells, 3)).astype(np.float32)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


def _intensity_change(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gain = rng.choice([rng.uniform(0.4, 0.75), rng.uniform(1.3, 1.8)])
    shift = rng.uniform(-40, 40, 3) if rng.random() < 0.5 else np.zeros(3)
    return np.clip(image * gain + shift, 0, 255)


def _cutpaste(image: np.ndarray, recipe: SyntheticRecipe, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    height, width = image.shape[:2]
    side = rng.uniform(*recipe.cut_fraction)
    ph, pw = max(2, int(side * height * rng.uniform(0.5, 1.5))), max(2, int(side * width * rng.uniform(0.5, 1.5)))
    ph, pw = min(ph, height - 1), min(pw, width - 1)
    sy, sx = int(rng.integers(0, height - ph + 1)), int(rng.integers(0, width - pw + 1))
    ty, tx = int(rng.integers(0, height - ph + 1)), int(rng.integers(0, width - pw + 1))
    patch = image[sy : sy + ph, sx : sx + pw].astype(np.float32)
    patch = np.clip(patch * rng.uniform(0.7, 1.3) + rng.uniform(-25, 25), 0, 255)
    if rng.random() < 0.5:
        patch = patch[::-1]
    out = image.astype(np.float32).copy()
    out[ty : ty + ph, tx : tx + pw] = patch
    mask = np.zeros((height, width), bool)
    mask[ty : ty + ph, tx : tx + pw] = np.abs(patch - image[ty : ty + ph, tx : tx + pw]).max(axis=-1) > 0
    return out, mask


def synthesize(image: np.ndarray, recipe: SyntheticRecipe, rng: np.random.Generator,
               textures: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(anomalous copy as uint8 HWC RGB, boolean mask, kind) of a normal HWC RGB uint8 image."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"synthesize needs an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
    if min(image.shape[:2]) < 4:
        raise ValueError(f"image {image.shape[:2]} is too small for a synthetic anomaly")
    probabilities = np.asarray(recipe.weights, float) / float(np.sum(recipe.weights))
    kind = str(rng.choice(recipe.kinds, p=probabilities))
    if kind == "cutpaste":
        out, mask = _cutpaste(image, recipe, rng)
    else:
        mask = perlin_mask(image.shape[0], image.shape[1], recipe, rng)
        base = image.astype(np.float32)
        if kind == "perlin_texture":
            beta = rng.uniform(*recipe.beta)
            fill = (1 - beta) * base + beta * _foreign_texture(image.shape, rng, textures)
        else:
            fill = _intensity_change(base, rng)
        out = np.where(mask[:, :, None], fill, base)
    changed = mask & (np.abs(out - image).max(axis=-1) >= 1.0)
    return np.clip(out, 0, 255).astype(np.uint8), changed if changed.any() else mask, kind
