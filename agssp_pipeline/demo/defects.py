"""Planted defects: each one changes the surface inside a known mask, so the ground truth is exact.

A defect function takes the surface (float32 grey levels) and returns the changed surface plus the
boolean mask of the pixels it changed visibly. Amplitudes are chosen so that defects stand out by a
few background standard deviations, like NEU-DET, without saturating the sensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from agssp_pipeline.demo.textures import value_noise

DefectFn = Callable[[np.random.Generator, np.ndarray], tuple[np.ndarray, np.ndarray]]
SUBPIXEL_SHIFT = 3  # cv2 drawing with 1/8-pixel precision: smooth anti-aliased thin lines
MIN_MASK_PIXELS = 6


@dataclass(frozen=True)
class PlantedDefect:
    class_name: str
    mask: np.ndarray  # bool (H, W)
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, x2/y2 exclusive (bounding box of mask)

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight box of a non-empty mask, ``(x1, y1, x2, y2)`` with exclusive ends (continuous pixel edges)."""
    x, y, w, h = cv2.boundingRect(mask.astype(np.uint8))
    return x, y, x + w, y + h


def _draw_profile(shape: tuple[int, int], polylines: list[np.ndarray], thickness: int) -> np.ndarray:
    """Anti-aliased stroke coverage in [0, 1] of the given float polylines."""
    canvas = np.zeros(shape, dtype=np.uint8)
    scaled = [np.round(p * (1 << SUBPIXEL_SHIFT)).astype(np.int32).reshape(-1, 1, 2) for p in polylines]
    cv2.polylines(canvas, scaled, False, 255, thickness, cv2.LINE_AA, SUBPIXEL_SHIFT)
    return canvas.astype(np.float32) / 255.0


def _stroke_mask(profile: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels well covered by a stroke, with one-pixel gaps (thin diagonals) closed inside its footprint."""
    core = (profile > threshold).astype(np.uint8)
    closed = cv2.morphologyEx(core, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    return closed.astype(bool) & (profile > 0.02)


def _component_count(mask: np.ndarray) -> int:
    count, _ = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return count - 1


def _largest_component(mask: np.ndarray) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 2:
        return mask.astype(bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == largest


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(x, -40, 40)))).astype(np.float32)


def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    return cols, rows


def _random_point(rng: np.random.Generator, shape: tuple[int, int], margin: float) -> np.ndarray:
    h, w = shape
    return np.array([rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)], dtype=np.float32)


def scratch(rng: np.random.Generator, surface: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Thin long bright or dark line, straight or gently curved (quadratic Bezier), fading along it."""
    h, w = surface.shape
    length = rng.uniform(0.35, 0.85) * min(h, w)
    start = _random_point(rng, surface.shape, 4)
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)], dtype=np.float32)
    end = start + direction * length
    normal = np.array([-direction[1], direction[0]], dtype=np.float32)
    control = (start + end) / 2 + normal * rng.uniform(-0.25, 0.25) * length
    t = np.linspace(0, 1, 48, dtype=np.float32)[:, None]
    curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
    profile = _draw_profile(surface.shape, [curve], thickness=int(rng.choice([1, 1, 2])))
    fade = 0.75 + 0.25 * np.tanh(value_noise(rng, h, w, cell=25.0))
    sign = 1.0 if rng.random() < 0.4 else -1.0
    amplitude = rng.uniform(20, 46)
    changed = surface + sign * amplitude * profile * fade
    return changed, _stroke_mask(profile, 0.35)


def pit(rng: np.random.Generator, surface: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Small dark round spot with a bright raised rim (corrosion/roll pitting)."""
    radius = rng.uniform(2.2, 5.0)
    centre = _random_point(rng, surface.shape, radius + 3)
    cols, rows = _grid(surface.shape)
    distance = np.hypot(cols - centre[0], rows - centre[1])
    core = _sigmoid((radius - distance) / 0.6)
    rim = np.exp(-(((distance - radius - 1.2) / 0.9) ** 2))
    changed = surface - rng.uniform(26, 56) * core + rng.uniform(8, 22) * rim
    return changed, distance <= radius + 1.5


def inclusion(rng: np.random.Generator, surface: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dark elongated irregular blob (non-metallic inclusion rolled into the surface)."""
    h, w = surface.shape
    semi_major, semi_minor = rng.uniform(6, 18), rng.uniform(1.8, 4.5)
    centre = _random_point(rng, surface.shape, semi_major * 0.6 + 2)
    # mostly drawn out along the rolling direction (image columns), like rolled-in inclusions
    angle = np.pi / 2 + rng.uniform(-0.4, 0.4) if rng.random() < 0.7 else rng.uniform(0, np.pi)
    cols, rows = _grid(surface.shape)
    dx, dy = cols - centre[0], rows - centre[1]
    along = dx * np.cos(angle) + dy * np.sin(angle)
    across = -dx * np.sin(angle) + dy * np.cos(angle)
    rho = np.sqrt((along / semi_major) ** 2 + (across / semi_minor) ** 2)
    shape_field = 1.0 - rho + 0.3 * value_noise(rng, h, w, cell=float(rng.uniform(3, 6)))
    mask = _largest_component(shape_field > 0)
    depth = np.clip(shape_field * 3.0, 0, 1) * mask
    changed = surface - rng.uniform(22, 50) * cv2.GaussianBlur(depth.astype(np.float32), (0, 0), 0.6)
    return changed, mask


def crack(rng: np.random.Generator, surface: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Thin dark branching polyline: a random-walk trunk with one or two shorter branches."""

    def walk(start: np.ndarray, heading: float, steps: int) -> np.ndarray:
        turns = np.cumsum(rng.normal(0, 0.3, steps)) + heading
        step_len = rng.uniform(2.5, 4.0, steps)
        offsets = np.stack([np.cos(turns) * step_len, np.sin(turns) * step_len], axis=1)
        return np.vstack([start, start + np.cumsum(offsets, axis=0)]).astype(np.float32)

    trunk = walk(_random_point(rng, surface.shape, 10), rng.uniform(0, 2 * np.pi), int(rng.integers(10, 22)))
    branches = [trunk]
    for _ in range(int(rng.integers(1, 3))):
        fork = trunk[int(rng.integers(2, len(trunk) - 2))]
        heading = rng.uniform(0, 2 * np.pi)
        branches.append(walk(fork, heading, int(rng.integers(4, 9))))
    profile = _draw_profile(surface.shape, branches, thickness=1)
    halo = cv2.GaussianBlur(profile, (0, 0), 1.5)
    amplitude = rng.uniform(24, 48)
    changed = surface - amplitude * profile - 0.25 * amplitude * halo
    return changed, _stroke_mask(profile, 0.3)


def patch(rng: np.random.Generator, surface: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Larger irregular region with different brightness and texture (scale patch, stain, polishing spot)."""
    h, w = surface.shape
    radius = rng.uniform(12, 28)
    aspect = rng.uniform(0.5, 1.0)
    centre = _random_point(rng, surface.shape, radius * 0.5)
    angle = rng.uniform(0, np.pi)
    cols, rows = _grid(surface.shape)
    dx, dy = cols - centre[0], rows - centre[1]
    along = dx * np.cos(angle) + dy * np.sin(angle)
    across = -dx * np.sin(angle) + dy * np.cos(angle)
    rho = np.sqrt((along / radius) ** 2 + (across / (radius * aspect)) ** 2)
    field = 1.0 - rho + 0.35 * value_noise(rng, h, w, cell=float(rng.uniform(6, 10)))
    weight = _sigmoid(field * 8.0)
    mask = _largest_component(weight > 0.5)
    weight = weight * cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8))
    smooth = cv2.GaussianBlur(surface, (0, 0), 1.5)
    detail_gain = rng.choice([rng.uniform(0.2, 0.5), rng.uniform(1.6, 2.2)])
    shift = rng.uniform(12, 30) * (1.0 if rng.random() < 0.65 else -1.0)
    patched = smooth + detail_gain * (surface - smooth) + shift
    changed = surface * (1 - weight) + patched * weight
    return changed, mask


DEFECTS: dict[str, DefectFn] = {
    "scratch": scratch,
    "pit": pit,
    "inclusion": inclusion,
    "crack": crack,
    "patch": patch,
}


def plant_defect(
    rng: np.random.Generator, surface: np.ndarray, class_name: str, occupied: np.ndarray, tries: int = 25
) -> tuple[np.ndarray, PlantedDefect] | None:
    """Plant one defect that keeps clear of those already planted; ``None`` when no placement fits."""
    try:
        defect_fn = DEFECTS[class_name]
    except KeyError:
        raise KeyError(f"unknown defect '{class_name}' (known: {', '.join(DEFECTS)})") from None
    keep_out = cv2.dilate(occupied.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    for _ in range(tries):
        changed, mask = defect_fn(rng, surface)
        area = int(mask.sum())
        # one connected region per defect, so boxes derived from masks (mask_folder ingestion) match ours
        if area < MIN_MASK_PIXELS or (mask & keep_out).any() or _component_count(mask) != 1:
            continue
        box = mask_box(mask)
        if box[2] - box[0] < 2 or box[3] - box[1] < 2:
            continue
        return changed.astype(np.float32), PlantedDefect(class_name, mask, box)
    return None
