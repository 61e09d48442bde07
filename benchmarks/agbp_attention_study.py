"""Which AGBP recipe moves a backbone's attention onto defects? A sweep read out by the attention probe.

    .venv/bin/python benchmarks/agbp_attention_study.py --config RUN/agssp.yaml [--backbone efficientnet_lite0]
        [--steps 150 600] [--weights auto 1 0] [--losses cosine l2norm] [--max-images 64]

``RUN/agssp.yaml`` is a pipeline config whose anomaly maps are materialised (e.g. the one
``pretraining_comparison.py`` writes). Each combination trains one AGBP run (the config's ``backbone`` section
with ``distill_weight`` and ``distill_loss`` overridden, as many epochs as ``--steps`` needs) into a scratch
storage root beside the run (the run's own checkpoints are untouched), then probes it exactly as the
``backbone_attention_evaluation`` asset does: pixel AUROC of the distilled stages' attention against the
ground-truth defect pixels of every labelled source. Rows ``scratch``/``imagenet`` are the starts; the row
``teacher`` is the anomaly map itself under the same protocol (per-image min-max, pooled pixels), on the
sources that have maps: the ceiling distillation aims at. Seeds, steps and image size are printed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import agssp_pipeline  # noqa: E402,F401  (offline defaults)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--backbone", default=None, help="default: the config's first backbone")
    parser.add_argument("--steps", type=int, nargs="+", default=[150, 600])
    parser.add_argument("--weights", nargs="+", default=["auto", "1"], help="distill weights ('auto' or numbers)")
    parser.add_argument("--losses", nargs="+", default=["default"], help="distillation distances (losses.py)")
    parser.add_argument("--max-images", type=int, default=64, help="probe images per labelled source")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch storage (default: beside the config)")
    return parser.parse_args(argv)


def teacher_maps(layout, source: str, probe):
    """(N, G, G) anomaly maps of the probe's images, read once; None when the source has no maps for them all."""
    import numpy as np
    import torch

    from agssp_pipeline import artifact_io
    from agssp_pipeline.kead.store import LazyMaps

    if not artifact_io.exists(layout.maps_store(source)):
        return None
    maps = LazyMaps(layout.maps_store(source))
    known = set(np.asarray(maps.image_ids).astype(str).tolist())
    if not all(i in known for i in probe.image_ids):
        return None
    return torch.from_numpy(np.stack([maps[i] for i in probe.image_ids]).astype(np.float32))


def teacher_auroc(maps, probe, grid: int | None = None) -> float:
    """AUROC of the anomaly maps under the probe's protocol (NaN: no maps). ``grid``: first averaged down to
    ``grid`` x ``grid`` cells, the resolution of a distilled stage (the best that stage's attention can draw)."""
    import torch.nn.functional as F

    from agssp_pipeline.eval.attention_probe import pixel_auroc, upsampled_minmax

    if maps is None:
        return float("nan")
    if grid is not None:
        maps = F.adaptive_avg_pool2d(maps[:, None], grid)[:, 0]
    return pixel_auroc(upsampled_minmax(maps, *probe.masks.shape[-2:]).numpy(), probe.masks)


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    from agssp_pipeline.boxes.stage import read_annotations, read_index
    from agssp_pipeline.config import load_config
    from agssp_pipeline.eval.attention_probe import Start, load_probe_images, probe_start
    from agssp_pipeline.training import checkpoint as ckpt
    from agssp_pipeline.training.agbp import train_backbone
    from agssp_pipeline.training.backbones import backbone_spec, build_backbone
    from agssp_pipeline.training.data import pretrain_table_from_config

    args = parse_args(argv)
    config = load_config(args.config)
    layout = config.layout()
    backbone = args.backbone or config.backbone.backbones[0]
    size = config.backbone.image_size
    workdir = (args.workdir or args.config.resolve().parent / "agbp_study").resolve()
    study = config.model_copy(update={"storage_root": str(workdir)})
    table = pretrain_table_from_config(config)
    probes = []
    for source in [s.name for s in config.sources]:
        loaded = load_probe_images(source, read_index(layout, source), read_annotations(layout, source), size,
                                   args.max_images)
        if loaded is not None and len(loaded.images):
            probes.append(loaded)
    spec = backbone_spec(backbone)
    stages = spec.default_distill_stages()
    teachers = {p.source: teacher_maps(layout, p.source, p) for p in probes}
    rows = [{"start": "teacher (anomaly map)", **{p.source: teacher_auroc(teachers[p.source], p) for p in probes}}]
    for stride in (spec.stage_strides[i] for i in stages):
        rows.append({"start": f"teacher at stride {stride} ({size // stride}x{size // stride})",
                     **{p.source: teacher_auroc(teachers[p.source], p, size // stride) for p in probes}})

    def probe_row(name: str, model, extra: dict) -> dict:
        start = Start(name, model, tuple(stages))
        return {"start": name, **extra, **{p.source: probe_start(start, p, backbone, size)["pixel_auroc"]
                                           for p in probes}}

    import torch

    per_epoch = len(table) // config.backbone.batch_size  # the loader drops the last partial batch
    torch.manual_seed(config.backbone.seed)
    rows.append(probe_row("scratch", build_backbone(backbone, image_size=size, pretrained=False).backbone, {}))
    if spec.imagenet:
        rows.append(probe_row("imagenet", build_backbone(backbone, image_size=size, pretrained=True).backbone, {}))
    for loss in args.losses:
        for weight in args.weights:
            for steps in args.steps:
                epochs = math.ceil(steps / per_epoch)  # an epoch is one pass over the corpus at most
                settings = config.backbone.model_copy(update={
                    "epochs": epochs, "max_steps_per_epoch": math.ceil(steps / epochs), "distill_loss": loss, "resume": False,
                    "distill_weight": weight if weight == "auto" else float(weight)})
                started = time.perf_counter()
                result = train_backbone(study, backbone, settings=settings, table=table, make_latest=False)
                seconds = time.perf_counter() - started
                state, lineage = ckpt.load_checkpoint(result.run_dir, float32=True)
                model = build_backbone(backbone, image_size=size, pretrained=False).backbone
                model.native.load_state_dict(state)
                history = result.step_history
                tail = max(1, len(history["distill"]) // 10)
                rows.append(probe_row(f"agbp {loss} w={weight} {steps} steps", model, {
                    "weight": lineage.get("distill_weight"), "seconds": round(seconds),
                    "distill first": history["distill"][0], "distill last10%": sum(history["distill"][-tail:]) / tail,
                    "base last10%": (sum(history["base"][-tail:]) / tail) if history["base"][0] is not None else None,
                }))
                print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)
    print(f"\nbackbone {backbone}, {size} px, batch {config.backbone.batch_size}, seed {config.backbone.seed}, "
          f"base loss {config.backbone.base_loss}, probe: first {args.max_images} labelled images per source; "
          f"pretraining images {len(table)} from {sorted(table.rows['source'].unique())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
