"""Headline experiment: does AGSSP pretraining help YOLOv8 on NEU-DET? Prints the comparison table.

    .venv/bin/python benchmarks/neu_det_comparison.py [--workdir DIR] [--finetune-epochs 10] ...

Pretraining corpus: the synthetic demo corpus (its plant, VOC and mask sources) plus the real magnetic-tile
dataset (../shared/data/magnetic_tile, MT_Free as normal references); NEU-DET (../shared/data/neu_det) is the
only downstream dataset and never enters pretraining (the finetune stage refuses overlapping image ids).
Anomaly maps come from the offline few-shot CNN encoder (``kead.encoder: cnn_fewshot``; no CLIP weights are
reachable offline). Everything runs through the pipeline's own assets (the same as ``agssp materialize``):
image_index -> anomaly_maps -> category_thresholds -> pseudo_boxes -> backbone_checkpoint ->
detector_checkpoint -> finetune_evaluation. Artifacts stay in the work dir (default benchmarks/results/neu_det).

Settings are printed with the table; read them before quoting a number (a few CPU epochs are far from the
paper's 100+ GPU epochs, so absolute mAP is low and deltas are noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import agssp_pipeline  # noqa: E402,F401  (offline defaults)

NEU_CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
DEMO_DOWNSTREAM = "demo_downstream"


def parse_args() -> argparse.Namespace:
    shared = Path(os.environ.get("AGSSP_SHARED_DATA", REPO.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "results" / "neu_det")
    parser.add_argument("--neu-root", type=Path, default=shared / "neu_det")
    parser.add_argument("--magnetic-tile-root", type=Path, default=shared / "magnetic_tile")
    parser.add_argument("--model", default="yolov8n")
    parser.add_argument("--imgsz", type=int, default=160, help="detector/finetune image size (NEU is 200x200)")
    parser.add_argument("--kead-imgsz", type=int, default=160, help="anomaly-map encoder input size")
    parser.add_argument("--backbone-epochs", type=int, default=1)
    parser.add_argument("--backbone-imgsz", type=int, default=128)
    parser.add_argument("--detector-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--few-shot", type=int, default=None, help="also run a few-shot regime (e.g. 50: Mini50)")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--demo-scale", type=float, default=1.0)
    parser.add_argument("--select", default=None,
                        help="Dagster asset selection to (re)materialise; default: the whole chain")
    parser.add_argument("--report-only", action="store_true", help="print the table of a finished run")
    return parser.parse_args()


def build_config(args: argparse.Namespace) -> Path:
    """Write the experiment's agssp.yaml: demo pretraining sources + magnetic tile, NEU-DET downstream."""
    import yaml

    from agssp_pipeline.demo import generate_demo

    for root, name in ((args.neu_root, "NEU-DET"), (args.magnetic_tile_root, "magnetic tile")):
        if not root.is_dir():
            raise SystemExit(f"{name} not found at {root} (set AGSSP_SHARED_DATA or pass its root)")
    workdir = args.workdir.resolve()
    corpus = generate_demo(workdir / "demo", seed=args.seed, scale=args.demo_scale)
    demo = yaml.safe_load(Path(corpus.config_path).read_text())
    demo_root = Path(corpus.config_path).parent
    sources = []
    for source in demo["sources"]:
        if source["name"] == DEMO_DOWNSTREAM:
            continue  # NEU-DET is the downstream set here
        root = Path(source["root"])
        sources.append({**source, "root": str(root if root.is_absolute() else (demo_root / root).resolve()),
                        "role": "pretrain"})
    sources += [
        {"name": "magnetic_tile", "kind": "public", "format": "mask_folder", "root": str(args.magnetic_tile_root),
         "category": "magnetic_tile", "normal_subfolders": ["MT_Free"], "options": {"class_strip_prefix": "MT_"},
         "role": "pretrain"},
        {"name": "neu_det", "kind": "public", "format": "voc", "root": str(args.neu_root),
         # a category of its own: KeAD picks normal references per category, and NEU must not feed pretraining
         "category": "neu_hot_rolled_strip", "classes": NEU_CLASSES, "role": "downstream"},
    ]
    config = {
        "storage_root": str(workdir / "storage"),
        "sources": sources,
        "kead": {**demo.get("kead", {}), "encoder": "cnn_fewshot", "image_size": args.kead_imgsz},
        "boxes": demo.get("boxes", {}),
        "backbone": {**demo.get("backbone", {}), "backbones": [args.model], "epochs": args.backbone_epochs,
                     "image_size": args.backbone_imgsz, "seed": args.seed},
        "detector": {"model": args.model, "backbone": args.model, "epochs": args.detector_epochs,
                     "image_size": args.imgsz, "batch_size": args.batch, "freeze_backbone": True,
                     "seed": args.seed, "workers": 2},
        "finetune": {"epochs": args.finetune_epochs, "image_size": args.imgsz, "batch_size": args.batch,
                     "val_fraction": args.val_fraction, "few_shot_train_images": args.few_shot, "seed": args.seed,
                     "workers": 2, "variants": ["scratch", "agbp", "agssp"]},
    }
    path = workdir / "agssp.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def materialise(config_path: Path, selection: str | None) -> bool:
    from agssp_pipeline.config import load_config
    from agssp_pipeline.definitions import build_definitions
    from agssp_pipeline.orchestration import materialize_selection, prepare_instance

    config = load_config(config_path)
    instance = prepare_instance(config, str(config_path))
    defs = build_definitions(str(config_path))

    def on_step(step) -> None:
        where = f"[{step.partition}]" if step.partition else ""
        state = "ok" if step.success else f"FAILED: {step.error}"
        print(f"{time.strftime('%H:%M:%S')} {step.asset}{where}: {state} ({step.seconds:.0f} s)", flush=True)

    report = materialize_selection(defs, config, instance, selection=selection, on_step=on_step)
    return not report.failed


def report(config_path: Path, wall_seconds: float | None) -> int:
    import pandas as pd

    from agssp_pipeline.config import load_config
    from agssp_pipeline.training.finetune import comparison_markdown

    config = load_config(config_path)
    layout = config.layout()
    table_path = Path(layout.evaluations("finetune", "neu_det"))
    if not table_path.is_file():
        print(f"no evaluation table at {table_path}", file=sys.stderr)
        return 1
    table = pd.read_parquet(table_path)
    per_class = pd.read_parquet(layout.evaluations("finetune", "neu_det.per_class"))
    print("\n=== NEU-DET: YOLOv8 finetuned from scratch vs AGSSP pretraining (COCO mAP, val split) ===\n")
    summary = pd.read_parquet(layout.evaluations("finetune", "neu_det.summary"))
    print(comparison_markdown(summary, table, config.finetune.bootstrap_replicates))
    print("\nper-class AP@0.5:0.95:")
    print(per_class.pivot_table(index=["regime", "variant"], columns="class_name", values="ap50_95")
          .round(3).to_string())
    detector_lineage = {}
    agssp_rows = table[table["variant"] == "agssp"]
    if not agssp_rows.empty and agssp_rows["checkpoint_lineage"].notna().any():
        detector_lineage = json.loads(agssp_rows["checkpoint_lineage"].dropna().iloc[0])
    first = table.iloc[0]
    print("\nsettings:")
    print(f"  model {first['model']}, image size {first['imgsz']}, batch {first['batch']}, seed {first['seed']}, "
          f"finetune epochs {first['epochs']} (same recipe for every variant; last-epoch weights evaluated)")
    print(f"  train/val images: {dict(zip(table['regime'], table['train_images'], strict=False))} / "
          f"{int(first['val_images'])} (stratified split, stored in {layout.path('splits', 'neu_det.parquet')})")
    print(f"  pretraining sources: {[s.name for s in config.pretrain_sources()]}; "
          f"KeAD encoder {config.kead.encoder}; backbone epochs {config.backbone.epochs} "
          f"(image size {config.backbone.image_size}); detector epochs {config.detector.epochs} "
          f"(backbone frozen: {config.detector.freeze_backbone})")
    if detector_lineage:
        print(f"  AGDP training set: {detector_lineage.get('training_set')}")
        print(f"  AGDP checkpoint: {detector_lineage.get('checkpoint')}")
    seconds = {f"{r.regime}/{r.variant}": r.train_seconds for r in table.itertuples(index=False)}
    print(f"  train seconds (incl. ultralytics' final val): {seconds}")
    if wall_seconds is not None:
        print(f"  wall time of this run: {wall_seconds / 60:.1f} min on {os.cpu_count()} CPU cores (shared)")
    return 0


def main() -> int:
    args = parse_args()
    config_path = args.workdir.resolve() / "agssp.yaml"
    if args.report_only:
        return report(config_path, None)
    started = time.perf_counter()
    config_path = build_config(args)
    print(f"config: {config_path}", flush=True)
    ok = materialise(config_path, args.select)
    code = report(config_path, time.perf_counter() - started)
    return code if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
