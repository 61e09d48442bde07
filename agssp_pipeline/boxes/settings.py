"""Thresholds and pseudo-box section of the pipeline config (``boxes:`` in agssp.yaml).

Each field says what it controls and why its default is what it is; the README of the boxes stage
(``agssp_pipeline/boxes/__init__.py``) has the measurements behind the defaults.

Three rules make a box method, each a name from a registry: ``threshold_rule`` (how T_c is set:
``thresholds.THRESHOLD_RULES``), ``image_split`` (which images get boxes: ``thresholds.IMAGE_SPLIT_RULES``)
and ``binarisation`` (how a map becomes components: ``extract.BINARISATIONS``). ``method`` names a
preset of the three (``METHODS``); a rule set explicitly overrides its preset. Unset rules stay ``None``
in the settings (so that a per-run ``method`` override still selects its preset after a round trip
through ``model_dump``); ``rules()`` resolves them, and the resolved names are what tables record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ThresholdRuleName = Literal["paper", "normal_mad"]
ImageSplitName = Literal["fixed", "quantile", "otsu", "gmm", "map_max"]
BinarisationName = Literal["single", "hysteresis", "rethreshold"]
MethodName = Literal["paper", "measured"]


@dataclass(frozen=True)
class BoxRules:
    """The resolved rule names of a box method."""

    threshold_rule: str
    image_split: str
    binarisation: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


METHODS: dict[str, BoxRules] = {
    # the paper: T_c = mean of the category's map maxima - delta, every image binarised at T_c (so an image
    # gets boxes exactly when its map reaches T_c: the split this implies is map_max), one threshold
    "paper": BoxRules(threshold_rule="paper", image_split="map_max", binarisation="single"),
    # the measured best over demo, magnetic tile and NEU-DET (boxes/__init__.py has the table): the paper's
    # T_c and implied split, each component shrunk to the region around its peak
    "measured": BoxRules(threshold_rule="paper", image_split="map_max", binarisation="rethreshold"),
}


class BoxesSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # a preset of the three rules below (METHODS); "paper" is the paper's exact rule
    method: MethodName = "measured"
    # rules; None = the method's
    threshold_rule: ThresholdRuleName | None = None
    image_split: ImageSplitName | None = None
    binarisation: BinarisationName | None = None
    # threshold rule "paper": T_c = mean over the category's images of max(anomaly map) - delta
    delta: float = 0.1
    # threshold rule "normal_mad": T_c = median + threshold_k * 1.4826 * MAD of the maxima of the images the
    # split judges normal (the noise ceiling of normal images), over all images when fewer than
    # min_normal_images are judged normal (or the split is map_max, which needs T_c first)
    threshold_k: float = Field(3.0, ge=0.0)
    min_normal_images: int = Field(8, ge=1)
    # image splits: "fixed": score > image_score_threshold; "quantile": score > per-category quantile;
    # "otsu" / "gmm": the gap of a two-class split of the category's scores, the quantile rule when the
    # scores show no two classes (Otsu separability below split_min_separation, or a 2-Gaussian mixture
    # whose BIC is not better than one Gaussian's); "map_max": map maximum > T_c (the paper's implied split)
    image_score_threshold: float = 0.5
    image_score_quantile: float = Field(0.5, ge=0.0, le=1.0)
    split_min_separation: float = Field(0.75, ge=0.0, le=1.0)
    # binarisation "hysteresis": components seeded at T_c grown down to level + hysteresis_fraction *
    # (T_c - level), level = the image's map median (its normal level); "rethreshold": each component at T_c
    # keeps its pixels above level + rethreshold_fraction * (component peak - level), then is relabelled
    hysteresis_fraction: float = Field(0.5, ge=0.0, le=1.0)
    rethreshold_fraction: float = Field(0.5, ge=0.0, le=1.0)
    # boxes kept per image after NMS, highest score first
    top_k: int = Field(10, ge=1)
    nms_iou: float = Field(0.5, gt=0.0, le=1.0)
    # components smaller than max(min_area_pixels, min_area_fraction * H * W) are dropped: the fraction keeps
    # the rule meaningful across image sizes, the floor removes bilinear-interpolation specks on small images
    min_area_fraction: float = Field(0.0005, ge=0.0, lt=1.0)
    min_area_pixels: int = Field(16, ge=1)
    connectivity: Literal[4, 8] = 8
    # the asset check WARNs when the fraction of images with boxes leaves this band (degenerate maps)
    flagged_fraction_band: tuple[float, float] = (0.02, 0.98)
    # images processed per vectorised chunk (memory ~ chunk * H * W * 8 bytes)
    chunk_size: int = Field(256, ge=1)
    # exports: include images judged normal as negatives (empty label files / COCO images without boxes)
    export_negatives: bool = True
    # quality evaluation: delta sweep and the grid of global fixed thresholds compared with T_c
    quality_deltas: list[float] = Field(default_factory=lambda: [round(0.025 * i, 3) for i in range(13)])
    quality_fixed_grid: int = Field(41, ge=2)

    @model_validator(mode="after")
    def _band_is_ordered(self) -> BoxesSettings:
        low, high = self.flagged_fraction_band
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError("flagged_fraction_band must be (low, high) with 0 <= low <= high <= 1")
        return self

    def rules(self) -> BoxRules:
        """The rules in force: the method's preset, overridden by the rules set explicitly."""
        preset = METHODS[self.method]
        return BoxRules(
            threshold_rule=self.threshold_rule or preset.threshold_rule,
            image_split=self.image_split or preset.image_split,
            binarisation=self.binarisation or preset.binarisation,
        )
