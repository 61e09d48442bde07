"""ADPretrain's two losses on residual features, as plain torch (no model, no data code).

A residual is a patch feature minus its nearest normal reference patch of the same category: normal
patches leave small, directionless residuals, anomalous ones large residuals pointing away from the
normal manifold. The projector is trained so that the two kinds differ both in angle and in norm:

- ``angle_contrastive_loss``: InfoNCE over the two augmented views of each patch. The positive of an
  anchor is the other view of the same patch; its negatives are all residuals (both views) of the other
  kind (normal vs abnormal). Minimising it pulls the views together and pushes normal and abnormal
  residuals apart in angle;
- ``norm_loss``: normal residual norms kept inside ``radius``, abnormal ones pushed beyond
  ``radius + margin`` (squared hinge on both sides), so the norm of a projected residual is an
  anomaly score on a known scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(view_a: torch.Tensor, view_b: torch.Tensor, labels: torch.Tensor) -> None:
    if view_a.shape != view_b.shape or view_a.ndim != 2:
        raise ValueError(f"views must both be (N, D), got {tuple(view_a.shape)} and {tuple(view_b.shape)}")
    if labels.shape != (view_a.shape[0],):
        raise ValueError(f"labels must be (N,) = ({view_a.shape[0]},), got {tuple(labels.shape)}")


def angle_contrastive_loss(view_a: torch.Tensor, view_b: torch.Tensor, labels: torch.Tensor,
                           temperature: float = 0.15) -> torch.Tensor:
    """InfoNCE: other view positive, opposite-kind residuals negative; mean over both views' anchors.

    ``labels``: (N,) 1 for abnormal patches, 0 for normal. Without patches of both kinds there are no
    negatives and the loss is 0 (nothing to separate).
    """
    _check(view_a, view_b, labels)
    labels = labels.bool()
    if labels.all() or not labels.any():
        return view_a.sum() * 0.0
    points = F.normalize(torch.cat([view_a, view_b]), dim=1)
    kinds = torch.cat([labels, labels])
    count = view_a.shape[0]
    logits = points @ points.T / temperature
    partner = torch.cat([torch.arange(count, 2 * count), torch.arange(0, count)]).to(points.device)
    positive = logits.gather(1, partner[:, None])[:, 0]
    negative_mask = kinds[:, None] != kinds[None, :]
    negatives = logits.masked_fill(~negative_mask, float("-inf"))
    denominator = torch.logsumexp(torch.cat([positive[:, None], negatives], dim=1), dim=1)
    return (denominator - positive).mean()


def norm_loss(residuals: torch.Tensor, labels: torch.Tensor, radius: float = 1.0,
              margin: float = 1.0) -> torch.Tensor:
    """Squared hinge: normal norms above ``radius`` and abnormal ones below ``radius + margin`` cost.

    Each kind is averaged on its own, so a batch with few abnormal patches still weighs them equally.
    """
    if residuals.ndim != 2 or labels.shape != (residuals.shape[0],):
        raise ValueError(f"residuals must be (N, D) with labels (N,), got {tuple(residuals.shape)}, "
                         f"{tuple(labels.shape)}")
    labels = labels.bool()
    norms = residuals.norm(dim=1)
    loss = residuals.sum() * 0.0
    if (~labels).any():
        loss = loss + F.relu(norms[~labels] - radius).pow(2).mean()
    if labels.any():
        loss = loss + F.relu(radius + margin - norms[labels]).pow(2).mean()
    return loss


def adaptor_loss(view_a: torch.Tensor, view_b: torch.Tensor, labels: torch.Tensor, temperature: float = 0.15,
                 radius: float = 1.0, margin: float = 1.0, norm_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Both losses on the projected residuals of two views: {"angle", "norm", "total"}."""
    angle = angle_contrastive_loss(view_a, view_b, labels, temperature)
    norm = 0.5 * (norm_loss(view_a, labels, radius, margin) + norm_loss(view_b, labels, radius, margin))
    return {"angle": angle, "norm": norm, "total": angle + norm_weight * norm}
