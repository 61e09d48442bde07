"""The one registry of initial weights a finetune starts from: the paper's modes (its Table 2) and user files.

=========  ======  ===========================================================================================
variant    mode    starts from
=========  ======  ===========================================================================================
scratch    -       random init (the detector of ``detector.model`` on backbone ``detector.backbone``)
imagenet   1       the backbone's offline ImageNet weights (EfficientNet-Lite0); neck and head random
domain     2       a backbone pretrained on the same corpus with the same recipe but ``distill_weight: 0``
                   (in-domain pretraining without anomaly guidance), from ImageNet where the backbone has it
agbp       3       the AGBP backbone checkpoint (distillation on), from ImageNet where the backbone has it
agssp      4       the AGDP detector (backbone, neck and head pretrained on pseudo boxes)
<name>     -       a user weights file named in ``finetune.extra_weights``
=========  ======  ===========================================================================================

A variant that cannot exist for a backbone (no offline ImageNet weights for CSPDarknet) raises
:class:`VariantNotApplicable`; the table keeps a row for it that says so, rather than dropping it silently.
A missing checkpoint is the user's to make, and is an error naming the asset to materialize.
``domain`` and ``agbp`` runs are told apart by the ``distill_weight`` their lineage records.

agssp against agbp (issue 11 item 1). What differs between the two starts, everything else (optimizer ``auto`` =
AdamW at the lr of the class count, 3 warm-up epochs, EMA, no frozen layer, ``last.pt`` scored) being equal:

- both load the AGBP backbone (layers 0..9); CSPDarknet gets AGBP's ImageNet input normalisation folded into
  layer 0 (``detector.fold_input_normalisation``: before, ultralytics' [0, 1] pixels met BN statistics of
  normalised inputs, harmless where BN trains, wrong for AGDP's frozen backbone whose BN stays in eval mode);
- agssp also loads the neck (layers 10..21) and the Detect head (22) of a one-class detector trained on pseudo
  boxes, all but the class-logit convs (``cv3.*.2``: 1 vs N classes, re-initialised with ultralytics' prior);
- with ``detector.freeze_backbone: true`` (the paper; default) AGDP leaves the backbone tensor for tensor as AGBP
  made it, so ``finetune.agssp_init: backbone`` is then the agbp start.

Measured (``benchmarks/agdp_bounds.py``, YOLOv8n, 128 px, AGDP 3 epochs, finetune 8 epochs on 400 NEU-DET images
scored on 160 others, one seed, mAP@0.5 in %; CPU-sized: read differences under ~2 points as noise; backbone: a
1-epoch AGBP run on magnetic tile; ``--config`` a materialised run with magnetic_tile pretrain, neu_det downstream;
magnetic tile rows: ``--agdp-epochs 3 --finetune-epochs 8 --train-images 400 --val-images 160``; NEU rows the same
with ``--source neu_det --downstream neu_det --agdp gt:on:frozen gt:on:unfrozen:detector,backbone_neck,backbone
random:on:unfrozen``; AGDP val: mAP@0.5 of the one-class detector on its own kind of boxes of its val split):

======================================  ===================  ============  ==========  ==========
start                                   AGDP boxes           AGDP bb       AGDP val    finetune
======================================  ===================  ============  ==========  ==========
scratch / agbp (fold off) / agbp        -                    -             -           3.6 / 6.1 / 6.7
agssp detector (fold off: before fix)   magnetic tile pseudo frozen        0.0         5.9
agssp detector (the paper's recipe)     magnetic tile pseudo frozen        0.3         8.3
agssp detector                          magnetic tile pseudo unfrozen      0.0         1.6
agssp backbone_neck / backbone          magnetic tile pseudo unfrozen      0.0         6.0 / 7.3
agssp detector / backbone_neck          magnetic tile GT     unfrozen      0.0         7.6 / 7.6
agssp detector                          magnetic tile random unfrozen      0.0         5.0
NEU half B: scratch / agbp (off) / agbp -                    -             -           4.4 / 6.2 / 7.6
agssp detector                          NEU half A GT        frozen        0.5         8.6
agssp detector                          NEU half A GT        unfrozen      4.9         11.1
agssp backbone_neck / backbone          NEU half A GT        unfrozen      4.9         12.3 / 14.5
agssp detector                          NEU half A random    unfrozen      1.0         10.1
======================================  ===================  ============  ==========  ==========

Seed 1 of the first four rows (``--agdp pseudo:on:frozen pseudo:off:frozen --seeds 1``): scratch 7.2, agbp 6.9 /
5.7, agssp 6.0 / 6.5: seed noise at this budget is ~3 points, so every single-seed difference below is a lead.
Read: the input-normalisation fold fixes a real mismatch (exact, tested) and lifts the paper's recipe on both seeds
(agssp 5.9 -> 8.3, 6.0 -> 6.5; mean 6.0 -> 7.4 vs agbp 6.5 / 6.2, scratch 5.4). The transfer path works with good boxes (GT rows >= agbp).
Training the backbone in AGDP (``detector.freeze_backbone: false``/``auto``) helps in-domain (NEU GT 8.6 -> 11.1,
even random boxes 10.1: most of that gain is in-domain training, not box quality) but on cross-domain pseudo
boxes it wrecks the head (1.6, below random boxes' 5.0) unless the head is re-initialised (``finetune.agssp_init: backbone_neck`` 6.0,
``backbone`` 7.3). Mixed, one seed: the defaults stay the paper's (frozen backbone, full detector).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from agssp_pipeline.training import checkpoint as ckpt
from agssp_pipeline.training.backbones import backbone_spec
from agssp_pipeline.training.checkpoint import InitialWeights
from agssp_pipeline.training.detector import (
    backbone_initial_weights,
    detector_initial_weights,
    load_weight_file,
)
from agssp_pipeline.training.yolo_backbones import imagenet_state, required_prefixes

USER_FILE = "user file"


class VariantNotApplicable(ValueError):
    """The variant cannot exist for this backbone; the table reports it as not applicable."""


@dataclass
class VariantContext:
    """What the variant builders may use: the backbone, checkpoint locations and the user's extra files."""

    backbone_checkpoint: str | None = None
    detector_checkpoint: str | None = None
    extra_weights: dict[str, str] = field(default_factory=dict)
    domain_checkpoint: str | None = None
    backbone: str = "yolov8n"
    image_size: int = 224
    agssp_init: str = "detector"  # which AGDP layers agssp starts from (``finetune.agssp_init``, AGSSP_INITS)


@dataclass(frozen=True)
class Variant:
    """A named way to get initial weights, with the paper's mode it stands for."""

    name: str
    mode: str
    description: str
    build: Callable[[VariantContext], InitialWeights | None]


def _scratch(context: VariantContext) -> None:
    return None


def _imagenet(context: VariantContext) -> InitialWeights:
    spec = backbone_spec(context.backbone)
    if not spec.imagenet:
        raise VariantNotApplicable(f"backbone '{context.backbone}' has no ImageNet weights offline "
                                   "(EfficientNet-Lite0 has: detector.backbone: efficientnet_lite0)")
    state, source = imagenet_state(context.backbone, context.image_size)
    return InitialWeights("imagenet", state, required_prefixes(context.backbone),
                          {"checkpoint": source, "kind": "imagenet", "backbone": context.backbone})


def _backbone_run(context: VariantContext, variant: str, checkpoint: str | None) -> InitialWeights:
    if not checkpoint:
        hint = "with backbone.distill_weight: 0 " if variant == "domain" else ""
        raise FileNotFoundError(f"variant '{variant}' needs a backbone checkpoint of '{context.backbone}' "
                                f"{hint}(materialize backbone_checkpoint)")
    initial = backbone_initial_weights(checkpoint)
    trained = str(initial.lineage.get("backbone") or context.backbone)
    if trained != context.backbone:
        raise ValueError(f"variant '{variant}': checkpoint {checkpoint} is a '{trained}' backbone, the detector "
                         f"uses '{context.backbone}' (detector.backbone)")
    weight = initial.lineage.get("distill_weight")
    if variant == "domain" and weight != 0:
        raise ValueError(f"variant 'domain' needs a run with distill_weight 0; {checkpoint} has {weight}")
    initial.name = variant
    return initial


def _agbp(context: VariantContext) -> InitialWeights:
    return _backbone_run(context, "agbp", context.backbone_checkpoint)


def _domain(context: VariantContext) -> InitialWeights:
    return _backbone_run(context, "domain", context.domain_checkpoint)


def _agssp(context: VariantContext) -> InitialWeights:
    if not context.detector_checkpoint:
        raise FileNotFoundError("variant 'agssp' needs a detector checkpoint (materialize detector_checkpoint)")
    return detector_initial_weights(context.detector_checkpoint, context.agssp_init)


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("scratch", "-", "random init", _scratch),
    Variant("imagenet", "1", "ImageNet backbone", _imagenet),
    Variant("domain", "2", "in-domain backbone pretraining (distill weight 0)", _domain),
    Variant("agbp", "3", "AGBP backbone (anomaly-guided distillation)", _agbp),
    Variant("agssp", "4", "AGDP detector (AGBP backbone + pseudo-box pretraining)", _agssp),
]}


def describe(variant: str) -> tuple[str, str]:
    """(mode, description) of a variant; user files are mode '-'."""
    known = VARIANTS.get(variant)
    return (known.mode, known.description) if known else ("-", USER_FILE)


def initial_weights_for(variant: str, context: VariantContext) -> InitialWeights | None:
    """Initial weights of ``variant`` (None: random init); raises :class:`VariantNotApplicable` or a clear error."""
    if variant in VARIANTS:
        return VARIANTS[variant].build(context)
    if variant in context.extra_weights:
        uri = os.path.expanduser(context.extra_weights[variant])  # a local path or an object-store URL
        return InitialWeights(variant, load_weight_file(uri), (), {"checkpoint": uri, "kind": USER_FILE})
    raise ValueError(f"unknown finetune variant '{variant}' (built in: {sorted(VARIANTS)}; "
                     f"extra_weights: {sorted(context.extra_weights)})")


def _completed_runs(layout, backbone: str) -> list[tuple[str, dict]]:
    return [(run_id, lineage) for run_id, lineage in ckpt.list_runs(layout, backbone)
            if lineage.get("status", "complete") == "complete"]


def latest_backbone_runs(layout, backbone: str) -> tuple[str | None, str | None]:
    """(agbp run dir, domain run dir): the newest completed runs of ``backbone`` with distillation on / off."""
    agbp = domain = None
    for run_id, lineage in _completed_runs(layout, backbone):  # oldest first: the last one wins
        run = ckpt.run_dir(layout, backbone, run_id)
        if lineage.get("distill_weight") == 0:
            domain = run
        else:
            agbp = run
    return agbp, domain
