"""WinCLIP mode (Jeong et al., CVPR 2023) on the same CLIP engine as KeAD: the paper's baseline.

Window embeddings: every k x k window of patches (k in ``winclip_windows``, default 2 and 3, stride 1)
is encoded by running the transformer on the CLS token plus that window's patch tokens only
(``surgery.window_embeddings``): all windows of all images of a batch form one batch of short sequences
per window size. This is equivalent to WinCLIP's masked attention and avoids the failure of anomalib 2.7
with open_clip 3.x, where every window silently got the same embedding (tested here: windows and images
must differ).

Scores (the WinCLIP paper, with the choices it leaves open marked *):

* zero-shot window score: softmax over (normal, anomalous) of cosine / temperature, with the same
  KeAD class text embeddings (knowledge prompts included, so KeAD vs WinCLIP compares the visual side);
* window scores -> patches by harmonic mean over the windows that contain the patch, vectorised as
  ``coverage.sum(0) / ((1 / s) @ coverage)`` with a (windows x patches) 0/1 coverage matrix;
* * zero-shot map = mean of the per-size maps and the full-image score (the whole image as the largest
  window, as anomalib does); zero-shot image score = the CLS score;
* few-shot (WinCLIP+): per window size, 0.5 * min over the reference windows of (1 - cosine), harmonic
  aggregation to patches; plus 0.5 * min (1 - cosine) of the last-layer patch tokens (ln_post + proj)
  against the reference patch tokens; few-shot map = mean of these maps;
* fusion: map = (zero-shot + few-shot) / 2; image score = (zero-shot image score + max few-shot map) / 2.
  Without references the map is the zero-shot map and the image score the CLS score.

Cost: one full forward per batch plus one batched forward of short window sequences per window size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from agssp_pipeline.kead.base import MapBatch, forget_category
from agssp_pipeline.kead.clip_encoder import ClipEngine, anomaly_probability, nearest_memory_distance
from agssp_pipeline.kead.surgery import dual_path_forward, embed_tokens, window_embeddings, window_indices


def coverage_matrix(indices: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(W, N) float 0/1: window w contains patch n (built by scatter, no loop)."""
    coverage = torch.zeros(indices.shape[0], num_patches, device=indices.device)
    return coverage.scatter_(1, indices, 1.0)


def harmonic_aggregation(window_scores: torch.Tensor, coverage: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch harmonic mean of the scores (B, W) of the windows covering it -> (B, N)."""
    inverse = 1.0 / window_scores.clamp_min(eps)
    return coverage.sum(dim=0) / (inverse @ coverage)


class WinClipEncoder:
    """WinCLIP / WinCLIP+ anomaly maps (AnomalyEncoder protocol) on a shared ``ClipEngine``."""

    name = "clip_winclip"

    def __init__(self, engine: ClipEngine, *, windows: tuple[int, ...] | list[int] = (2, 3)) -> None:
        self.engine = engine
        self.device = engine.device
        self.image_size = engine.image_size
        self.grid_size = engine.grid_size
        grid = self.grid_size
        self.windows = tuple(int(w) for w in windows)
        if not self.windows or any(w < 1 or w > grid for w in self.windows):
            raise ValueError(f"window sizes {self.windows} must lie in 1..{grid} (the patch grid)")
        self._indices = {w: window_indices(grid, w, device=self.device) for w in self.windows}
        self._coverage = {w: coverage_matrix(idx, grid * grid) for w, idx in self._indices.items()}
        self._window_memory: dict[str, dict[int, torch.Tensor]] = {}
        self._patch_memory: dict[str, torch.Tensor] = {}
        self.reference_counts: dict[str, int] = {}
        self.identity = engine.identity(self.name, "winclip", windows=list(self.windows))

    @classmethod
    def from_settings(cls, settings: Any, device: str | torch.device = "cpu") -> WinClipEncoder:
        return cls(ClipEngine.from_settings(settings, device), windows=settings.winclip_windows)

    def preprocess(self, image_rgb_uint8: np.ndarray) -> torch.Tensor:
        return self.engine.preprocess(image_rgb_uint8)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """Image embedding (B, D), last-layer patch tokens (B, N, D), window embeddings {k: (B, W, D)}."""
        engine = self.engine
        images = engine.check_batch(images)
        with engine.autocast():
            visual = engine.visual
            taps = dual_path_forward(visual, images, (engine.depth,), None)
            tokens = embed_tokens(visual, images)
            windows = {w: window_embeddings(visual, tokens, idx).float() for w, idx in self._indices.items()}
        return taps.image_embedding.float(), taps.original_tokens[0].float(), windows

    def set_references(self, category: str, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"set_references needs a non-empty (K, C, H, W) batch, got {tuple(images.shape)}")
        patches, windows = [], {w: [] for w in self.windows}
        for part in images.split(self.engine.batch_size):
            _, patch_tokens, window_tokens = self.encode(part)
            patches.append(F.normalize(patch_tokens, dim=-1).reshape(-1, patch_tokens.shape[-1]))
            for w, emb in window_tokens.items():
                windows[w].append(F.normalize(emb, dim=-1).reshape(-1, emb.shape[-1]))
        self._patch_memory[category] = torch.cat(patches)
        self._window_memory[category] = {w: torch.cat(chunks) for w, chunks in windows.items()}
        self.reference_counts[category] = int(images.shape[0])

    def has_references(self, category: str) -> bool:
        return category in self._patch_memory

    def clear_references(self, category: str | None = None) -> None:
        forget_category(category, self._patch_memory, self._window_memory, self.reference_counts)

    @torch.no_grad()
    def score(self, images: torch.Tensor, category: str) -> MapBatch:
        engine = self.engine
        text = engine.text_embeddings(category)
        image_embedding, patch_tokens, window_tokens = self.encode(images)
        batch, grid = images.shape[0], self.grid_size
        zero_shot_image = anomaly_probability(image_embedding, text, engine.temperature)
        zero_shot_maps = [zero_shot_image[:, None].expand(batch, grid * grid)]
        for w, emb in window_tokens.items():
            scores = anomaly_probability(emb, text, engine.temperature)
            zero_shot_maps.append(harmonic_aggregation(scores, self._coverage[w]))
        zero_shot_map = torch.stack(zero_shot_maps).mean(dim=0)
        fused, image_score = zero_shot_map, zero_shot_image
        if category in self._patch_memory:
            few_shot_maps = [nearest_memory_distance(F.normalize(patch_tokens, dim=-1), self._patch_memory[category])]
            for w, emb in window_tokens.items():
                distance = nearest_memory_distance(F.normalize(emb, dim=-1), self._window_memory[category][w])
                few_shot_maps.append(harmonic_aggregation(distance, self._coverage[w]))
            few_shot_map = torch.stack(few_shot_maps).mean(dim=0)
            fused = (zero_shot_map + few_shot_map) / 2
            image_score = (zero_shot_image + few_shot_map.amax(dim=1)) / 2
        return MapBatch(
            maps=fused.view(batch, grid, grid).float().cpu(),
            image_score=image_score.float().cpu(),
            zero_shot_score=zero_shot_image.float().cpu(),
        )
