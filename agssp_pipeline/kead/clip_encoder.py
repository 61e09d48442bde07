"""KeAD: knowledge-enhanced zero-/few-shot anomaly maps from an OpenCLIP ViT (AGSSP paper).

``ClipEngine`` holds what the CLIP-based encoders share (model loaded once, preprocessing, precision,
text embeddings); ``ClipKeadEncoder`` (KeAD) and ``agssp_pipeline.kead.winclip.WinClipEncoder`` (WinCLIP)
are two scoring heads on it, so both can run on the same loaded model (see benchmarks/bench_kead.py).

KeAD scoring for a batch (one forward pass, ``surgery.dual_path_forward``):

* zero-shot image score: softmax over (normal, anomalous) of cosine(image embedding, class text
  embedding) / temperature (0.07), anomalous probability; the image embedding is the original CLS path;
* zero-shot patch score per tapped layer: the same softmax on the V-V (surgery) tokens after ln_post +
  proj; zero-shot map = mean over the tapped layers;
* few-shot (after ``set_references``): per layer, patch score = 0.5 * min over the memory of
  (1 - cosine) against the category's reference tokens of the same layer; mean over layers;
* fusion: map = zero-shot map + few-shot map; image score = (zero-shot image score + max(map)) / 2.

Choices where the paper is silent (documented here because they change numbers):

* Without references the map is the zero-shot map and the image score uses the same formula with it,
  so scores of a category keep one meaning whether or not it has references yet.
* The few-shot memory holds ORIGINAL-path tokens (``fewshot_tokens: original``, ln_post + proj like the
  V-V taps): V-V attention mixes each token with similar tokens, which helps text alignment but blurs the
  local detail that image-to-image matching needs. ``fewshot_tokens: vv`` switches to the V-V tokens.
* Preprocessing squashes the whole image to the model's square input (no centre crop), so the map covers
  every pixel the box extraction will look at; normalisation uses the model's own mean/std.
* Precision: bf16 autocast on CUDA for the vision tower (``precision: auto``), fp32 on CPU; text
  embeddings are always computed in fp32 and cached; all scores are computed in fp32.
* The V-V start block and taps come from the encoder preset (B-16+: V-V on blocks 4..12, taps 3/6/9/12);
  both can be overridden in the config (``vv_start_block`` is 0-based, ``tap_layers`` 1-based).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from agssp_pipeline.kead.base import EncoderIdentity, MapBatch, forget_category
from agssp_pipeline.kead.open_clip_models import RANDOM_INIT, LoadedClip, default_tap_layers, load_clip_model
from agssp_pipeline.kead.prompts import (
    KnowledgeBase,
    TextEmbeddingCache,
    class_text_embeddings,
    load_knowledge_base,
    warn_truncated,
)
from agssp_pipeline.kead.surgery import VisualTaps, check_visual, dual_path_forward

logger = logging.getLogger(__name__)

_SHARED_TEXT_CACHES: dict[str, TextEmbeddingCache] = {}
TEXT_BATCH = 128
MEMORY_CHUNK = 4096


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_text_cache_dir() -> Path:
    return Path(os.environ.get("AGSSP_CACHE_DIR", Path.home() / ".cache" / "agssp")) / "kead_text"


def shared_text_cache(cache_dir: str | Path | None) -> TextEmbeddingCache:
    """One cache object per folder per process, so every encoder on the same model reuses embeddings."""
    key = str(cache_dir or "")
    if key not in _SHARED_TEXT_CACHES:
        _SHARED_TEXT_CACHES[key] = TextEmbeddingCache(cache_dir)
    return _SHARED_TEXT_CACHES[key]


def anomaly_probability(features: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """P(anomalous) = softmax over (normal, anomalous) of cosine / temperature; features (..., D)."""
    logits = F.normalize(features.float(), dim=-1) @ text.T / temperature
    return logits.softmax(dim=-1)[..., 1]


def nearest_memory_distance(tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """0.5 * min over memory of (1 - cosine); tokens (B, N, D) and memory (M, D), both unit-norm."""
    best = torch.full(tokens.shape[:-1], -1.0, device=tokens.device)
    for part in memory.split(MEMORY_CHUNK):
        best = torch.maximum(best, (tokens @ part.T).amax(dim=-1))
    return 0.5 * (1.0 - best)


def squash_preprocess(
    image_rgb_uint8: np.ndarray, side: int, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """HWC (or HW) uint8 -> normalised CHW float32 of ``side`` x ``side`` (whole image, no crop).

    ``mean``/``std`` are (3, 1, 1) tensors in [0, 1] units. Area interpolation when shrinking, cubic when
    growing. Pure CPU work: the map runner calls it in DataLoader workers.
    """
    image = np.asarray(image_rgb_uint8)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    image = image[:, :, :3]
    shrinking = image.shape[0] > side or image.shape[1] > side
    resized = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
    tensor = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).float().div_(255.0)
    return (tensor - mean) / std


class ClipEngine:
    """An OpenCLIP model loaded once, with preprocessing, precision and cached class text embeddings."""

    def __init__(
        self,
        loaded: LoadedClip,
        device: str | torch.device = "cpu",
        *,
        knowledge: KnowledgeBase | None = None,
        temperature: float = 0.07,
        precision: str = "auto",
        text_cache: TextEmbeddingCache | None = None,
        batch_size: int = 16,
    ) -> None:
        check_visual(loaded.model.visual)
        self.loaded = loaded
        self.device = resolve_device(device)
        self.model = loaded.model.to(self.device)
        self.visual = self.model.visual
        self.knowledge = knowledge or load_knowledge_base()
        self.temperature = float(temperature)
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        if loaded.weights.identity == RANDOM_INIT:
            if text_cache is None or text_cache.cache_dir is not None:  # random towers: never on disk
                text_cache = shared_text_cache(None)
        self.text_cache = text_cache or shared_text_cache(default_text_cache_dir())
        self.batch_size = int(batch_size)
        self.image_size = loaded.image_size
        patch = self.visual.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.grid_size = self.image_size // self.patch_size
        self.depth = len(self.visual.transformer.resblocks)
        self.truncated_prompts: dict[str, list[str]] = {}
        self._mean = torch.tensor(loaded.mean).view(3, 1, 1)
        self._std = torch.tensor(loaded.std).view(3, 1, 1)

    @classmethod
    def from_settings(cls, settings: Any, device: str | torch.device = "cpu") -> ClipEngine:
        device = resolve_device(getattr(settings, "device", None) if device is None else device)
        loaded = load_clip_model(
            settings.clip_model,
            settings.weights,
            device=device,
            allow_random_weights=settings.allow_random_weights,
            image_size=settings.image_size,
        )
        cache = None
        if settings.text_cache_dir:
            cache = shared_text_cache(settings.text_cache_dir)
        return cls(
            loaded,
            device,
            knowledge=load_knowledge_base(settings.prompts_file),
            temperature=settings.temperature,
            precision=settings.precision,
            text_cache=cache,
            batch_size=settings.batch_size,
        )

    # -- images --------------------------------------------------------------------------------------
    def preprocess(self, image_rgb_uint8: np.ndarray) -> torch.Tensor:
        """HWC (or HW) uint8 -> normalised CHW float32 at the model's input size (squash resize)."""
        return squash_preprocess(image_rgb_uint8, self.image_size, self._mean, self._std)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16" and self.device.type in ("cuda", "cpu"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def check_batch(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected preprocessed images (B, 3, {self.image_size}, {self.image_size}), got {tuple(images.shape)}"
            )
        return images.to(self.device, non_blocking=True)

    # -- text ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokenizer = self.loaded.tokenizer
        parts = []
        for start in range(0, len(prompts), TEXT_BATCH):
            tokens = tokenizer(prompts[start : start + TEXT_BATCH]).to(self.device)
            parts.append(self.model.encode_text(tokens).float())
        return torch.cat(parts)

    def text_embeddings(self, category: str) -> torch.Tensor:
        """(2, D) unit rows (normal, anomalous) for ``category``; computed once per model and prompt set."""
        prompt_set = self.knowledge.prompt_set(category)
        if category not in self.truncated_prompts:
            self.truncated_prompts[category] = warn_truncated(prompt_set, self.loaded.tokenizer)
        embeddings = self.text_cache.get_or_compute(
            self.loaded.identity_key, prompt_set, lambda: class_text_embeddings(self.encode_text, prompt_set)
        )
        return embeddings.to(self.device)

    def identity(self, encoder: str, mode: str, **extra: Any) -> EncoderIdentity:
        """What identifies maps of this model (weights, prompts, precision) plus the encoder's own knobs."""
        return EncoderIdentity(
            encoder=encoder,
            model=self.loaded.model_name,
            weights=self.loaded.weights.identity,
            mode=mode,
            prompt_hash=self.prompt_hash,
            extra={"image_size": self.image_size, **extra, "temperature": self.temperature,
                   "precision": self.precision},
        )

    @property
    def prompt_hash(self) -> str:
        return self.knowledge.hash

    # -- vision --------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward_taps(self, images: torch.Tensor, tap_layers: tuple[int, ...], vv_start_block: int | None) -> VisualTaps:
        with self.autocast():
            taps = dual_path_forward(self.visual, self.check_batch(images), tap_layers, vv_start_block)
        return VisualTaps(
            image_embedding=taps.image_embedding.float(),
            vv_tokens=[t.float() for t in taps.vv_tokens],
            original_tokens=[t.float() for t in taps.original_tokens],
            original_tokens_raw=[],
        )


class ClipKeadEncoder:
    """KeAD anomaly maps (AnomalyEncoder protocol): V-V zero-shot + few-shot memory, fused."""

    name = "clip_kead"

    def __init__(
        self,
        engine: ClipEngine,
        *,
        vv_start_block: int | None = None,
        tap_layers: tuple[int, ...] | list[int] | None = None,
        fewshot_tokens: str = "original",
    ) -> None:
        self.engine = engine
        preset = engine.loaded.preset
        depth = engine.depth
        self.vv_start_block = preset.vv_start_block if vv_start_block is None else int(vv_start_block)
        if not 0 <= self.vv_start_block < depth:
            raise ValueError(f"vv_start_block {self.vv_start_block} outside 0..{depth - 1} for {preset.model_name}")
        if tap_layers is None:
            tap_layers = default_tap_layers(depth)
        self.tap_layers = tuple(sorted({int(t) for t in tap_layers}))
        if not self.tap_layers or self.tap_layers[0] < 1 or self.tap_layers[-1] > depth:
            raise ValueError(f"tap_layers {list(tap_layers)} must be 1-based block numbers in 1..{depth}")
        if fewshot_tokens not in ("original", "vv"):
            raise ValueError(f"fewshot_tokens must be 'original' or 'vv', got {fewshot_tokens!r}")
        self.fewshot_tokens = fewshot_tokens
        self.device = engine.device
        self.image_size = engine.image_size
        self.grid_size = engine.grid_size
        self._memory: dict[str, list[torch.Tensor]] = {}
        self.reference_counts: dict[str, int] = {}
        self.identity = engine.identity(self.name, "kead", vv_start_block=self.vv_start_block,
                                        tap_layers=list(self.tap_layers), fewshot_tokens=fewshot_tokens,
                                        vv_path="fused-qkv")  # numerics of surgery.fused_dual_block

    @classmethod
    def from_settings(cls, settings: Any, device: str | torch.device = "cpu") -> ClipKeadEncoder:
        engine = ClipEngine.from_settings(settings, device)
        return cls(
            engine,
            vv_start_block=settings.vv_start_block,
            tap_layers=settings.tap_layers,
            fewshot_tokens=settings.fewshot_tokens,
        )

    def preprocess(self, image_rgb_uint8: np.ndarray) -> torch.Tensor:
        return self.engine.preprocess(image_rgb_uint8)

    @property
    def truncated_prompts(self) -> dict[str, list[str]]:
        return self.engine.truncated_prompts

    def _memory_tokens(self, taps: VisualTaps) -> list[torch.Tensor]:
        tokens = taps.original_tokens if self.fewshot_tokens == "original" else taps.vv_tokens
        return [F.normalize(t, dim=-1) for t in tokens]

    def set_references(self, category: str, images: torch.Tensor) -> None:
        """Memory per tapped layer: every patch token of the K normal references (K*N, D), unit norm."""
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"set_references needs a non-empty (K, C, H, W) batch, got {tuple(images.shape)}")
        per_layer: list[list[torch.Tensor]] = [[] for _ in self.tap_layers]
        for part in images.split(self.engine.batch_size):
            taps = self.engine.forward_taps(part, self.tap_layers, self.vv_start_block)
            for layer, tokens in enumerate(self._memory_tokens(taps)):
                per_layer[layer].append(tokens.reshape(-1, tokens.shape[-1]))
        self._memory[category] = [torch.cat(chunks) for chunks in per_layer]
        self.reference_counts[category] = int(images.shape[0])

    def clear_references(self, category: str | None = None) -> None:
        forget_category(category, self._memory, self.reference_counts)

    def has_references(self, category: str) -> bool:
        return category in self._memory

    @torch.no_grad()
    def score(self, images: torch.Tensor, category: str) -> MapBatch:
        engine = self.engine
        text = engine.text_embeddings(category)
        taps = engine.forward_taps(images, self.tap_layers, self.vv_start_block)
        batch, grid = images.shape[0], self.grid_size
        zero_shot_image = anomaly_probability(taps.image_embedding, text, engine.temperature)
        zero_shot_map = torch.stack(
            [anomaly_probability(tokens, text, engine.temperature) for tokens in taps.vv_tokens]
        ).mean(dim=0)
        fused = zero_shot_map
        memory = self._memory.get(category)
        if memory is not None:
            few_shot_map = torch.stack(
                [nearest_memory_distance(tokens, mem) for tokens, mem in zip(self._memory_tokens(taps), memory, strict=True)]
            ).mean(dim=0)
            fused = zero_shot_map + few_shot_map
        image_score = (zero_shot_image + fused.amax(dim=1)) / 2
        return MapBatch(
            maps=fused.view(batch, grid, grid).float().cpu(),
            image_score=image_score.float().cpu(),
            zero_shot_score=zero_shot_image.float().cpu(),
        )
