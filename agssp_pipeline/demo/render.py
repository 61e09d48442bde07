"""One synthetic camera frame: texture, planted defects, then lighting and sensor effects.

Lighting is applied after the defects because it belongs to the camera, not the steel: a defect under
a dim corner is dimmer too, which is exactly what makes real anomaly maps need normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from agssp_pipeline.demo.defects import PlantedDefect, plant_defect
from agssp_pipeline.demo.textures import make_texture


@dataclass
class SyntheticImage:
    pixels: np.ndarray  # uint8 (H, W) grey
    category: str
    defects: list[PlantedDefect] = field(default_factory=list)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def is_normal(self) -> bool:
        return not self.defects

    def union_mask(self) -> np.ndarray:
        mask = np.zeros(self.pixels.shape, dtype=bool)
        for defect in self.defects:
            mask |= defect.mask
        return mask


def apply_camera(rng: np.random.Generator, surface: np.ndarray) -> np.ndarray:
    """Illumination gradient, vignetting, random gain/offset, signal-dependent sensor noise -> uint8."""
    h, w = surface.shape
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = (cols - w / 2) / (w / 2), (rows - h / 2) / (h / 2)
    tilt = rng.uniform(0, 2 * np.pi)
    gradient = 1.0 + rng.uniform(0.03, 0.12) * (u * np.cos(tilt) + v * np.sin(tilt))
    centre_u, centre_v = rng.uniform(-0.3, 0.3, 2)
    vignette = 1.0 - rng.uniform(0.04, 0.14) * ((u - centre_u) ** 2 + (v - centre_v) ** 2) / 2
    gain = rng.uniform(0.92, 1.08)
    lit = surface * gradient * vignette * gain + rng.uniform(-6, 6)
    noise_sigma = rng.uniform(1.5, 3.0) * np.sqrt(np.clip(lit, 1, None) / 128.0)
    noisy = lit + noise_sigma * rng.standard_normal((h, w)).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def synthesize(
    rng: np.random.Generator, category: str, height: int, width: int, defect_classes: list[str]
) -> SyntheticImage:
    """Render one frame of ``category`` with the listed defects (one that cannot be placed is dropped)."""
    surface = make_texture(category, rng, height, width)
    occupied = np.zeros((height, width), dtype=bool)
    planted: list[PlantedDefect] = []
    for class_name in defect_classes:
        result = plant_defect(rng, surface, class_name, occupied)
        if result is None:
            continue
        surface, defect = result
        occupied |= defect.mask
        planted.append(defect)
    return SyntheticImage(apply_camera(rng, surface), category, planted)
