"""Forward functions over an open_clip ``VisionTransformer``'s own modules: V-V (CLIP Surgery) taps and windows.

No new parameters and no patched modules: the functions read the pretrained weights of the model and
run its blocks, so any open_clip ViT with standard ``ResidualAttentionBlock`` s works.

V-V attention (CLIP Surgery, Li et al. 2023, "dual paths"), as implemented here:

* The ORIGINAL path is the model's own forward (each block called as a module), so the CLS token, the
  image embedding and the original-path taps are bit-identical to ``open_clip``'s ``forward_intermediates``
  (tested). The image score is computed from this path.
* From block ``vv_start_block`` (0-based) on, a SURGERY path runs beside it. At each such block:
  ``h = ln_1(x_original_in)``; ``v = h W_v + b_v`` (the value slice of the block's ``in_proj``);
  ``vv = softmax(v v^T * d_head^-0.5) v`` per head; ``x_surgery += ls_1(out_proj(vv))``.
  As in the CLIP Surgery reference: the V-V attention reads the ORIGINAL path's block input (the new
  path does not feed itself), the residual is kept, the FFN is skipped on the surgery path, and the
  surgery path starts as the original residual stream at the input of the first V-V block.
  Cost: nothing is projected twice. A V-V block computes its ``in_proj`` once; the original (q, k, v)
  attention and the V-V (v, v, v) attention run as one ``scaled_dot_product_attention`` call over the
  two stacked, and one ``out_proj`` serves both (``fused_dual_block``). What is left of the extra cost
  is the second attention and out_proj rows: about 1/12 of a block's FLOPs at ViT-B sizes.
  Blocks before ``vv_start_block`` (and every block with V-V off) are called as the model's own
  modules, so with V-V off the forward is bit-identical to open_clip's; inside the fused blocks the
  original path equals the module's output to float rounding (tested with tolerances).
* Patch tokens are tapped after the chosen (1-based) block outputs from both paths and passed through
  ``ln_post`` and ``proj`` (so they live in the joint image-text space). A tap before the first V-V
  block returns the original tokens on the surgery side (the two paths are still equal there).

Windows (WinCLIP): a window's embedding is the CLS output of the transformer run on the CLS token plus
the window's patch tokens only (after patch + positional embedding and ``ln_pre``, which are per-token
and therefore identical to masking the other tokens out of the attention). All windows of all images of
a batch run as one batch of short sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class UnsupportedVisualError(TypeError):
    """The vision tower is not a plain open_clip ViT with nn.MultiheadAttention blocks."""


@dataclass
class VisualTaps:
    """Projected outputs of one dual-path forward, for B images with N patch tokens and embed dim D."""

    image_embedding: torch.Tensor  # (B, D) == model.encode_image (not normalised)
    vv_tokens: list[torch.Tensor]  # per tap (B, N, D): surgery path, ln_post + proj
    original_tokens: list[torch.Tensor]  # per tap (B, N, D): original path, ln_post + proj
    original_tokens_raw: list[torch.Tensor]  # per tap (B, N, width): original path, before ln_post


def check_visual(visual: nn.Module) -> None:
    """Fail with a clear message for towers these functions do not handle (timm towers, attention pools)."""
    transformer = getattr(visual, "transformer", None)
    if transformer is None or not hasattr(visual, "conv1") or not hasattr(transformer, "resblocks"):
        raise UnsupportedVisualError(
            f"{type(visual).__name__} is not an open_clip VisionTransformer: KeAD needs a ViT CLIP "
            "(e.g. ViT-B-16-plus-240, ViT-L-14-336, ViT-H-14-378-quickgelu)"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedVisualError("vision towers with an attentional pooler (CoCa) are not supported")
    for index, block in enumerate(transformer.resblocks):
        if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
            raise UnsupportedVisualError(
                f"block {index} uses {type(getattr(block, 'attn', None)).__name__}; the V-V path needs "
                "nn.MultiheadAttention blocks (open_clip's default ResidualAttentionBlock)"
            )


def embed_tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch embedding + CLS + positional embedding + ln_pre, as open_clip's ``_embeds`` (B, 1+N, width)."""
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    x = x + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    return visual.ln_pre(x)


def _run_block(visual: nn.Module, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Call a block as the model does (batch-first or not), on batch-first input."""
    if getattr(visual.transformer, "batch_first", True):
        return block(x)
    return block(x.transpose(0, 1)).transpose(0, 1)


def _value_projection(attn: nn.MultiheadAttention) -> tuple[torch.Tensor, torch.Tensor | None]:
    width = attn.embed_dim
    if attn.in_proj_weight is not None:
        weight = attn.in_proj_weight[2 * width :]
    else:
        weight = attn.v_proj_weight
    bias = attn.in_proj_bias[2 * width :] if attn.in_proj_bias is not None else None
    return weight, bias


def vv_attention(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``out_proj(softmax(v v^T / sqrt(d_head)) v)`` with the block's own weights; hidden = ln_1(x)."""
    attn: nn.MultiheadAttention = block.attn
    batch, length, width = hidden.shape
    heads = attn.num_heads
    weight, bias = _value_projection(attn)
    value = F.linear(hidden, weight, bias).view(batch, length, heads, width // heads).transpose(1, 2)
    mixed = F.scaled_dot_product_attention(value, value, value)
    mixed = mixed.transpose(1, 2).reshape(batch, length, width)
    return attn.out_proj(mixed)


def supports_fused_block(block: nn.Module) -> bool:
    """A plain self-attention ``ResidualAttentionBlock`` whose packed ``in_proj`` the fused path can share."""
    attn = getattr(block, "attn", None)
    return (
        isinstance(attn, nn.MultiheadAttention)
        and attn.in_proj_weight is not None
        and attn.bias_k is None
        and not attn.add_zero_attn
        and not hasattr(block, "ln_1_kv")
        and all(hasattr(block, name) for name in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2"))
    )


def fused_dual_block(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One block on the original path plus its V-V attention output, sharing ``in_proj`` and ``out_proj``.

    Returns ``(block(x), ls_1(out_proj(vv(ln_1(x)))))``: the first is the model's own block output (same
    weights and operations, eval-mode attention), the second is what the surgery path adds.
    """
    attn: nn.MultiheadAttention = block.attn
    batch, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    query, key, value = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    mixed = F.scaled_dot_product_attention(
        torch.cat([query, value]), torch.cat([key, value]), torch.cat([value, value])
    )  # rows :batch are the original attention, rows batch: the V-V attention
    attended = block.ls_1(attn.out_proj(mixed.transpose(1, 2).reshape(2 * batch, length, width)))
    x = x + attended[:batch]
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, attended[batch:]


def project_tokens(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """ln_post then the visual projection: tokens into the joint image-text space."""
    tokens = visual.ln_post(tokens)
    return tokens @ visual.proj if visual.proj is not None else tokens


def pooled_embedding(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The image embedding from the final residual stream, exactly as the model's forward computes it."""
    if hasattr(visual, "_pool"):
        pooled, _ = visual._pool(x)
    else:  # open_clip < 3: class token after ln_post
        pooled = visual.ln_post(x[:, 0])
    return pooled @ visual.proj if visual.proj is not None else pooled


def dual_path_forward(
    visual: nn.Module,
    images: torch.Tensor,
    tap_layers: tuple[int, ...],
    vv_start_block: int | None,
    fused: bool = True,
) -> VisualTaps:
    """One pass: original path (model's blocks) + V-V surgery path from ``vv_start_block`` (None: off).

    ``fused=False`` runs every V-V block as the model's own module plus a separate V-V attention (the
    original path then stays bit-identical to open_clip's even with V-V on, at the cost of a second
    value projection and out_proj per V-V block).

    ``tap_layers`` are 1-based block outputs (block i's output is tap i). Blocks after the last tap
    still run because the image embedding comes from the final block.
    """
    blocks = visual.transformer.resblocks
    depth = len(blocks)
    if not tap_layers or min(tap_layers) < 1 or max(tap_layers) > depth:
        raise ValueError(f"tap layers {tap_layers} must lie in 1..{depth}")
    start = depth if vv_start_block is None else int(vv_start_block)
    if start < 0:
        raise ValueError(f"vv_start_block must be >= 0, got {vv_start_block}")
    x = embed_tokens(visual, images)
    surgery: torch.Tensor | None = None
    taps_surgery: list[torch.Tensor] = []
    taps_original: list[torch.Tensor] = []
    wanted = set(tap_layers)
    for index, block in enumerate(blocks):
        if index >= start:
            if surgery is None:
                surgery = x
            if fused and supports_fused_block(block):
                x, vv_update = fused_dual_block(block, x)
                surgery = surgery + vv_update
            else:
                surgery = surgery + block.ls_1(vv_attention(block, block.ln_1(x)))
                x = _run_block(visual, block, x)
        else:
            x = _run_block(visual, block, x)
        if index + 1 in wanted:
            taps_original.append(x[:, 1:])
            taps_surgery.append((surgery if surgery is not None else x)[:, 1:])
    return VisualTaps(
        image_embedding=pooled_embedding(visual, x),
        vv_tokens=[project_tokens(visual, t) for t in taps_surgery],
        original_tokens=[project_tokens(visual, t) for t in taps_original],
        original_tokens_raw=taps_original,
    )


def window_indices(grid: int, window: int, stride: int = 1, device: torch.device | None = None) -> torch.Tensor:
    """(W, window*window) flat patch indices of every window (row-major), built with unfold, no loops."""
    if window > grid:
        raise ValueError(f"window {window} larger than the {grid}x{grid} patch grid")
    flat = torch.arange(grid * grid, device=device, dtype=torch.float32).view(1, 1, grid, grid)
    cols = F.unfold(flat, kernel_size=window, stride=stride)  # (1, window*window, W)
    return cols[0].T.round().long()


def window_embeddings(
    visual: nn.Module, tokens: torch.Tensor, indices: torch.Tensor, chunk_size: int = 8192
) -> torch.Tensor:
    """Embeddings (B, W, D) of every window: CLS + the window's patch tokens through all blocks.

    ``tokens`` is ``embed_tokens`` output (B, 1+N, width); ``indices`` (W, k) from ``window_indices``.
    Windows of all images are one batch (chunked only to bound memory on very large batches).
    """
    batch, _, width = tokens.shape
    n_windows, k = indices.shape
    patches = tokens[:, 1:][:, indices.reshape(-1)].view(batch * n_windows, k, width)
    cls = tokens[:, :1].unsqueeze(1).expand(batch, n_windows, 1, width).reshape(batch * n_windows, 1, width)
    sequences = torch.cat([cls, patches], dim=1)
    outputs = []
    for part in sequences.split(chunk_size):
        x = part
        for block in visual.transformer.resblocks:
            x = _run_block(visual, block, x)
        outputs.append(pooled_embedding(visual, x))
    return torch.cat(outputs).view(batch, n_windows, -1)
