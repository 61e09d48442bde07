"""OpenCLIP models for KeAD: the package's tiny config, the paper's encoder presets, weight loading.

Weights come from one of three places, decided by ``resolve_weights`` BEFORE open_clip is called:

* an open_clip pretrained tag (``laion400m_e32``): used from the local hub / URL cache when present;
  downloaded by open_clip only when the process is online (``HF_HUB_OFFLINE`` unset or 0);
* a local checkpoint file (``.pt``/``.pth``/``.bin``/``.safetensors``, a state_dict or ``{"state_dict": ...}``);
* a local directory: ``open_clip_config.json`` + weights (the HF-hub layout, loaded with ``local-dir:``),
  or just a weights file, in which case the named architecture is used.

Why the pre-check: offline, open_clip would try the hub and fail only after its retries, and a missing
local-dir checkpoint only logs a warning and returns a random model. Plants run offline, so a missing
weight file must fail at once with a message that says how to provide it.

``weights=None`` builds a randomly initialised model (seeded, so "random-init" is reproducible); it is
refused unless the caller passes ``allow_random_weights=True`` (tests, benchmarks, the demo).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

logger = logging.getLogger(__name__)

TINY_MODEL_NAME = "agssp-tiny-clip"
_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
RANDOM_INIT = "random-init"
RANDOM_INIT_SEED = 0
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


class WeightsUnavailableError(RuntimeError):
    """The configured CLIP weights cannot be found locally (and cannot be downloaded)."""


def register_tiny_config() -> None:
    """Make ``agssp-tiny-clip`` (and any json in model_configs/) known to open_clip; idempotent."""
    if TINY_MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


register_tiny_config()


@dataclass(frozen=True)
class ClipPreset:
    """What the paper used per encoder. ``vv_start_block`` is 0-based: blocks >= it get the V-V path."""

    model_name: str
    pretrained_tag: str | None
    depth: int
    vv_start_block: int
    force_quick_gelu: bool = False

    @property
    def tap_layers(self) -> tuple[int, ...]:
        return default_tap_layers(self.depth)


def default_tap_layers(depth: int) -> tuple[int, ...]:
    """1-based block outputs tapped for patch tokens: depth*i/4 (B: 3/6/9/12, L: 6/12/18/24, H: 8/16/24/32)."""
    taps = sorted({max(1, round(depth * i / 4)) for i in range(1, 5)})
    return tuple(taps)


def default_vv_start_block(depth: int) -> int:
    """Released KeAD setting for B-16+: V-V on the last 9 of 12 blocks; other depths keep that 3/4 share."""
    return depth // 4


# The paper's encoders. ViT-L-14-336 'openai' was trained with QuickGELU: the plain config would
# silently run GELU on those weights (open_clip only warns), so the preset forces it.
PRESETS: dict[str, ClipPreset] = {
    "ViT-B-16-plus-240": ClipPreset("ViT-B-16-plus-240", "laion400m_e32", 12, 3),
    "ViT-L-14-336": ClipPreset("ViT-L-14-336", "openai", 24, 6, force_quick_gelu=True),
    "ViT-H-14-378-quickgelu": ClipPreset("ViT-H-14-378-quickgelu", "dfn5b", 32, 8),
    TINY_MODEL_NAME: ClipPreset(TINY_MODEL_NAME, None, 4, 1),
}


def preset_for(model_name: str) -> ClipPreset:
    """The preset for a model name; unknown open_clip architectures get depth-derived defaults."""
    if model_name in PRESETS:
        return PRESETS[model_name]
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(
            f"unknown CLIP architecture '{model_name}': use one of {sorted(PRESETS)} "
            f"or any name from open_clip.list_models()"
        )
    depth = int(config["vision_cfg"]["layers"])
    return ClipPreset(model_name, None, depth, default_vv_start_block(depth))


@dataclass(frozen=True)
class WeightSource:
    """Where the weights of one model come from, and how the store identity names them."""

    kind: str  # "tag" | "file" | "dir" | "random"
    location: str  # tag name, checkpoint file, or directory
    identity: str  # tag name, "sha256:<16 hex>" of the checkpoint file, or "random-init"
    checkpoint: str | None = None  # local file to load (None: random, or a tag open_clip downloads)


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def file_identity(path: Path) -> str:
    """sha256 prefix of a checkpoint: two stores built from the same bytes are comparable."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


def _how_to_provide(model_name: str) -> str:
    tags = open_clip.list_pretrained_tags_by_model(model_name) if model_name in open_clip.list_models() else []
    preset = PRESETS.get(model_name)
    suggested = preset.pretrained_tag if preset and preset.pretrained_tag else (tags[0] if tags else None)
    lines = [
        "Provide CLIP weights in the config (kead.weights) as one of:",
        "  - a local checkpoint file (.pt/.pth/.bin/.safetensors with the open_clip state_dict),",
        "  - a local directory with open_clip_config.json + open_clip_model.safetensors (the HF-hub layout),",
    ]
    if suggested:
        lines.append(
            f"  - the pretrained tag '{suggested}' (known tags: {', '.join(tags) or 'none'}), which needs the "
            "weights in the local cache: on a machine with internet run "
            f"`python -c \"import open_clip; open_clip.create_model('{model_name}', pretrained='{suggested}')\"` "
            "and copy ~/.cache/huggingface (or ~/.cache/clip) here, or set HF_HUB_OFFLINE=0 where online."
        )
    lines.append("  (tests and benchmarks only: weights null with allow_random_weights: true.)")
    return "\n".join(lines)


def _cached_tag_checkpoint(pretrained_cfg: dict[str, Any], cache_dir: str | None) -> str | None:
    """The local file open_clip would use for a tag, without touching the network."""
    if pretrained_cfg.get("file"):
        return pretrained_cfg["file"] if Path(pretrained_cfg["file"]).is_file() else None
    hub = pretrained_cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        candidates = [filename]
        if filename == "open_clip_pytorch_model.bin":
            candidates.insert(0, "open_clip_model.safetensors")
        elif filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        for candidate in candidates:
            found = try_to_load_from_cache(repo_id, candidate, cache_dir=cache_dir)
            if isinstance(found, str) and Path(found).is_file():
                return found
    url = pretrained_cfg.get("url", "")
    if url:
        target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if target.is_file():
            return str(target)
    return None


def _find_weights_file(directory: Path) -> Path | None:
    preferred = (
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.safetensors",
        "open_clip_pytorch_model.bin",
        "model.safetensors",
        "pytorch_model.bin",
    )
    for name in preferred:
        if (directory / name).is_file():
            return directory / name
    found = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    return found[0] if found else None


def resolve_weights(
    model_name: str,
    weights: str | None,
    *,
    allow_random_weights: bool = False,
    cache_dir: str | None = None,
) -> WeightSource:
    """Decide, without network access, where weights come from; raise at once when they cannot be had."""
    if weights is None or str(weights).strip() == "":
        if not allow_random_weights:
            raise WeightsUnavailableError(
                f"no weights configured for CLIP model '{model_name}'.\n{_how_to_provide(model_name)}"
            )
        return WeightSource("random", "", RANDOM_INIT)
    weights = str(weights)
    path = Path(os.path.expandvars(weights)).expanduser()
    if path.is_file():
        resolved = path.resolve()
        return WeightSource("file", str(resolved), file_identity(resolved), str(resolved))
    if path.is_dir():
        resolved = path.resolve()
        checkpoint = _find_weights_file(resolved)
        if checkpoint is None:
            raise WeightsUnavailableError(
                f"weights directory {resolved} holds no checkpoint ({', '.join(_WEIGHT_SUFFIXES)}).\n"
                f"{_how_to_provide(model_name)}"
            )
        return WeightSource("dir", str(resolved), file_identity(checkpoint), str(checkpoint))
    pretrained_cfg = open_clip.get_pretrained_cfg(model_name, weights) if model_name in open_clip.list_models() else {}
    if not pretrained_cfg:
        looks_like_path = any(sep in weights for sep in ("/", "\\")) or weights.endswith(_WEIGHT_SUFFIXES)
        what = "weights path does not exist" if looks_like_path else "unknown pretrained tag"
        raise WeightsUnavailableError(
            f"{what} '{weights}' for CLIP model '{model_name}'.\n{_how_to_provide(model_name)}"
        )
    cached = _cached_tag_checkpoint(pretrained_cfg, cache_dir)
    if cached is not None:
        return WeightSource("tag", weights, weights, cached)
    if _env_offline():
        raise WeightsUnavailableError(
            f"pretrained tag '{weights}' of '{model_name}' is not in the local cache and HF_HUB_OFFLINE is set, "
            f"so it cannot be downloaded.\n{_how_to_provide(model_name)}"
        )
    return WeightSource("tag", weights, weights, None)


@dataclass
class LoadedClip:
    """A ready open_clip model in eval mode with what the encoders need beside it."""

    model: Any  # open_clip.CLIP
    tokenizer: Any
    model_name: str
    weights: WeightSource
    preset: ClipPreset
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def identity_key(self) -> str:
        """Names the exact model: used as the text-embedding cache key."""
        return f"{self.model_name}@{self.weights.identity}@{self.image_size}"


def _is_local_dir_with_config(source: WeightSource) -> bool:
    return source.kind == "dir" and (Path(source.location) / "open_clip_config.json").is_file()


def load_clip_model(
    model_name: str,
    weights: str | None,
    *,
    device: torch.device | str = "cpu",
    allow_random_weights: bool = False,
    image_size: int | None = None,
    cache_dir: str | None = None,
) -> LoadedClip:
    """Build the model once: resolve weights (fail fast), create it, load weights strictly, eval mode."""
    preset = preset_for(model_name)
    source = resolve_weights(model_name, weights, allow_random_weights=allow_random_weights, cache_dir=cache_dir)
    kwargs: dict[str, Any] = {"device": "cpu", "force_quick_gelu": preset.force_quick_gelu}
    if image_size is not None:
        kwargs["force_image_size"] = int(image_size)
    if source.kind == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = open_clip.create_model(model_name, pretrained=None, **kwargs)
    elif _is_local_dir_with_config(source):
        model = open_clip.create_model(f"local-dir:{source.location}", **kwargs)
    elif source.checkpoint is not None:
        model = open_clip.create_model(model_name, pretrained=source.checkpoint, require_pretrained=True, **kwargs)
    else:  # online tag download
        model = open_clip.create_model(model_name, pretrained=source.location, require_pretrained=True, **kwargs)
    model.eval().requires_grad_(False).to(device)
    if _is_local_dir_with_config(source):
        tokenizer = open_clip.get_tokenizer(f"local-dir:{source.location}")
    else:
        tokenizer = open_clip.get_tokenizer(model_name)
    preprocess = open_clip.get_model_preprocess_cfg(model)
    size = model.visual.image_size
    side = int(size[0] if isinstance(size, (tuple, list)) else size)
    return LoadedClip(
        model=model,
        tokenizer=tokenizer,
        model_name=model_name,
        weights=source,
        preset=preset,
        image_size=side,
        mean=tuple(float(v) for v in preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(float(v) for v in preprocess.get("std", open_clip.OPENAI_DATASET_STD)),
    )
