"""AGBP losses: attention-map distillation towards anomaly maps, and the base losses it is added to.

Total loss (paper): ``L = L_base + lambda * L_distill``, where ``lambda`` is fixed or ``"auto"``: the
ratio ``L_base / L_distill`` measured on the first iteration, so that both terms start with equal weight.

Attention map of a stage (Zagoruyko & Komodakis): ``A = sum_c F_c^2`` -> (B, H, W). The anomaly map is
resized to the stage's resolution (bilinear) and both are flattened per sample. Two distances:

* ``cosine``: ``1 - cos(A, M)`` -- scale-free; default across architectures (CNN backbones);
* ``l2norm``: ``|| A/|A| - M/|M| ||_2`` -- L2 between L2-normalised maps; default inside ViT-like encoders.

Both are averaged over the batch and summed over the distilled stages.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from agssp_pipeline.training.backbones import BackboneWithHead, StagedBackbone

_EPS = 1e-12


def attention_map(feature: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """Sum over channels of the squared activations: (B, C, H, W) or (B, H, W, C) -> (B, H, W) float32."""
    if feature.ndim != 4:
        raise ValueError(f"expected a 4-D feature map, got shape {tuple(feature.shape)}")
    channel_dim = 3 if channels_last else 1
    return feature.float().pow(2).sum(dim=channel_dim)


def resize_map(anomaly_map: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h, w) or (B, 1, h, w) anomaly maps -> (B, height, width), bilinear."""
    maps = anomaly_map if anomaly_map.ndim == 4 else anomaly_map.unsqueeze(1)
    if maps.shape[-2:] == (height, width):
        return maps[:, 0].float()
    return F.interpolate(maps.float(), size=(height, width), mode="bilinear", align_corners=False)[:, 0]


def _flat_normalised(maps: torch.Tensor) -> torch.Tensor:
    return F.normalize(maps.flatten(1), p=2, dim=1, eps=_EPS)


def cosine_distance(attention: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``1 - cos`` between flattened maps (B, H, W)."""
    return (1.0 - (_flat_normalised(attention) * _flat_normalised(target)).sum(dim=1)).mean()


def normalised_l2_distance(attention: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the L2 distance between per-sample L2-normalised flattened maps."""
    diff = _flat_normalised(attention) - _flat_normalised(target)
    # sqrt with a floor: the distance is 0 when maps agree and sqrt has an infinite slope there
    return diff.pow(2).sum(dim=1).clamp_min(_EPS).sqrt().mean()


DISTILL_DISTANCES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cosine": cosine_distance,
    "l2norm": normalised_l2_distance,
}


def distillation_loss(
    features: Sequence[torch.Tensor],
    anomaly_map: torch.Tensor,
    stages: Sequence[int],
    distance: str = "cosine",
    channels_last: bool = False,
) -> torch.Tensor:
    """Sum over ``stages`` of the distance between each stage's attention map and the anomaly map."""
    try:
        measure = DISTILL_DISTANCES[distance]
    except KeyError:
        raise ValueError(
            f"unknown distillation distance '{distance}' (known: {', '.join(DISTILL_DISTANCES)})"
        ) from None
    total = anomaly_map.new_zeros((), dtype=torch.float32)
    for index in stages:
        attention = attention_map(features[index], channels_last=channels_last)
        target = resize_map(anomaly_map, attention.shape[-2], attention.shape[-1])
        total = total + measure(attention, target)
    return total


def auto_distill_weight(base_loss: float, distill_loss: float) -> float:
    """The paper's rule: scale distillation so both terms contribute equally on the first iteration."""
    if not (math.isfinite(base_loss) and math.isfinite(distill_loss)) or distill_loss <= 0 or base_loss <= 0:
        return 1.0
    return base_loss / distill_loss


# ---------------------------------------------------------------- base losses


def info_nce(query: torch.Tensor, key: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3 contrastive loss: positives on the diagonal of the (B, B) similarity matrix, x 2T."""
    query = F.normalize(query.float(), dim=1)
    key = F.normalize(key.float(), dim=1)
    logits = query @ key.t() / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels) * (2 * temperature)


def _mlp(in_dim: int, hidden: int, out_dim: int, layers: int) -> nn.Sequential:
    blocks: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        blocks += [nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        dim = hidden
    blocks += [nn.Linear(dim, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False)]
    return nn.Sequential(*blocks)


class BaseObjective(nn.Module):
    """A base loss over a backbone; returns (loss or None, the per-view stage features for distillation)."""

    views: int = 1

    def __init__(self, model: BackboneWithHead):
        super().__init__()
        self.model = model

    @property
    def backbone(self) -> StagedBackbone:
        return self.model.backbone

    def after_step(self, progress: float) -> None:
        """Hook after each optimiser step (momentum updates); ``progress`` in [0, 1] over training."""

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor | None, list[list[torch.Tensor]]]:
        raise NotImplementedError


class NoBaseObjective(BaseObjective):
    """Distillation only (``base_loss: none``)."""

    def forward(self, images, labels):
        return None, [self.backbone.forward_stages(images[:, 0])]


class ClassificationObjective(BaseObjective):
    """Supervised classification over the pretraining categories: linear head on the pooled last stage."""

    def __init__(self, model: BackboneWithHead):
        super().__init__(model)
        if model.head is None:
            raise ValueError("the 'cls' base loss needs num_classes > 0")

    def forward(self, images, labels):
        features = self.backbone.forward_stages(images[:, 0])
        logits = self.model.classify(features[-1])
        return F.cross_entropy(logits.float(), labels), [features]


class MocoV3Objective(BaseObjective):
    """MoCo v3 for CNNs: two views, momentum encoder, projector (3-layer) + predictor (2-layer), InfoNCE."""

    views = 2

    def __init__(
        self,
        model: BackboneWithHead,
        dim: int = 256,
        hidden: int = 1024,
        temperature: float = 0.2,
        momentum: float = 0.99,
    ):
        super().__init__(model)
        in_dim = model.backbone.out_channels[-1]
        self.projector = _mlp(in_dim, hidden, dim, layers=3)
        self.predictor = _mlp(dim, hidden, dim, layers=2)
        self.momentum_backbone = copy.deepcopy(model.backbone)
        self.momentum_projector = copy.deepcopy(self.projector)
        for module in (self.momentum_backbone, self.momentum_projector):
            module.requires_grad_(False)
        self.temperature = temperature
        self.base_momentum = momentum

    def _embed(self, features: list[torch.Tensor], projector: nn.Module) -> torch.Tensor:
        return projector(features[-1].float().mean(dim=(2, 3)))

    def forward(self, images, labels):
        if images.shape[1] != 2:
            raise ValueError(f"MoCo needs 2 views per image, got {images.shape[1]}")
        view_features = [self.backbone.forward_stages(images[:, v]) for v in range(2)]
        queries = [self.predictor(self._embed(f, self.projector)) for f in view_features]
        with torch.no_grad():
            keys = [
                self._embed(self.momentum_backbone.forward_stages(images[:, v]), self.momentum_projector)
                for v in range(2)
            ]
        loss = info_nce(queries[0], keys[1], self.temperature) + info_nce(
            queries[1], keys[0], self.temperature
        )
        return loss, view_features

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        # cosine schedule of the momentum towards 1 (MoCo v3)
        momentum = 1.0 - 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - self.base_momentum)
        pairs = ((self.backbone, self.momentum_backbone), (self.projector, self.momentum_projector))
        for online, target in pairs:
            for p_online, p_target in zip(online.parameters(), target.parameters(), strict=True):
                p_target.mul_(momentum).add_(p_online.detach(), alpha=1.0 - momentum)
            for b_online, b_target in zip(online.buffers(), target.buffers(), strict=True):
                b_target.copy_(b_online)


class SimMIMObjective(BaseObjective):
    """SimMIM for Swin: mask random 32-px patches of the patch embedding, reconstruct pixels (L1 on masked)."""

    def __init__(self, model: BackboneWithHead, mask_ratio: float = 0.6, mask_patch_size: int = 32):
        super().__init__(model)
        backbone = model.backbone
        if getattr(backbone, "family", "cnn") != "vit":
            raise ValueError("SimMIM needs a ViT-like backbone (swin_*); use 'moco' or 'cls' for CNNs")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, backbone.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        stride = backbone.stride
        self.decoder = nn.Sequential(
            nn.Conv2d(backbone.out_channels[-1], stride**2 * 3, kernel_size=1), nn.PixelShuffle(stride)
        )
        self.mask_ratio = mask_ratio
        self.mask_patch_size = mask_patch_size
        self.patch_size = backbone.patch_size

    def random_mask(self, batch: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        """(B, H/mask_patch, W/mask_patch) bool mask with ``mask_ratio`` of the cells set."""
        rows, cols = max(1, height // self.mask_patch_size), max(1, width // self.mask_patch_size)
        cells = rows * cols
        count = max(1, int(round(cells * self.mask_ratio)))
        order = torch.rand(batch, cells, device=device).argsort(dim=1)
        mask = torch.zeros(batch, cells, dtype=torch.bool, device=device)
        mask.scatter_(1, order[:, :count], True)
        return mask.view(batch, rows, cols)

    def forward(self, images, labels):
        x = images[:, 0]
        batch, _, height, width = x.shape
        mask = self.random_mask(batch, height, width, x.device)
        token_scale = self.mask_patch_size // self.patch_size
        token_mask = mask.repeat_interleave(token_scale, 1).repeat_interleave(token_scale, 2)

        def apply_mask(tokens: torch.Tensor) -> torch.Tensor:  # tokens NHWC
            w = token_mask[:, : tokens.shape[1], : tokens.shape[2]].unsqueeze(-1).to(tokens.dtype)
            return tokens * (1 - w) + self.mask_token.to(tokens.dtype) * w

        features = self.backbone.forward_stages(x, embed_transform=apply_mask)
        reconstruction = self.decoder(features[-1]).float()[..., :height, :width]
        pixel_mask = mask.repeat_interleave(self.mask_patch_size, 1).repeat_interleave(
            self.mask_patch_size, 2
        )
        pixel_mask = pixel_mask[:, :height, :width].unsqueeze(1).float()
        target = x.float()[..., : reconstruction.shape[-2], : reconstruction.shape[-1]]
        pixel_mask = pixel_mask[..., : reconstruction.shape[-2], : reconstruction.shape[-1]]
        l1 = F.l1_loss(reconstruction, target, reduction="none")
        loss = (l1 * pixel_mask).sum() / (pixel_mask.sum() * 3 + 1e-5)
        return loss, [features]


BASE_OBJECTIVES: dict[str, Callable[[BackboneWithHead], BaseObjective]] = {
    "none": NoBaseObjective,
    "cls": ClassificationObjective,
    "moco": MocoV3Objective,
    "simmim": SimMIMObjective,
}


def build_objective(name: str, model: BackboneWithHead) -> BaseObjective:
    try:
        factory = BASE_OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown base loss '{name}' (known: {', '.join(BASE_OBJECTIVES)})") from None
    return factory(model)
