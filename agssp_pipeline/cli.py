"""Command line: ``agssp demo``, ``agssp materialize``, ``agssp validate``, ``agssp lineage``.

The CLI runs the same Dagster assets as the web UI, in-process and headless, for scripts and cron.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agssp_pipeline.config import ConfigError, PipelineConfig, load_config


def _build(config_path: str):
    from agssp_pipeline.definitions import build_definitions
    from agssp_pipeline.orchestration import prepare_instance

    config = load_config(config_path)
    instance = prepare_instance(config, config_path)
    return config, instance, build_definitions(str(Path(config_path).resolve()))


def _run(config_path: str, selection: str | None, partition: str | None) -> int:
    from tqdm import tqdm

    from agssp_pipeline.orchestration import materialize_selection

    config, instance, defs = _build(config_path)
    bar = tqdm(desc="materialising", unit="step", leave=True)

    def on_step(step) -> None:
        bar.update(1)
        where = f"[{step.partition}]" if step.partition else ""
        state = "ok" if step.success else "FAILED"
        bar.write(f"{step.asset}{where}: {state} in {step.seconds:.1f} s" + ("" if step.success else f" - {step.error}"))

    report = materialize_selection(defs, config, instance, selection=selection, only_source=partition, on_step=on_step)
    bar.close()
    return report_outcome(report)


def report_outcome(report) -> int:
    """Print what went wrong (failed steps, failed ERROR checks, lost images) and warnings; the exit code.

    Exit 1 when any step failed, any ERROR-severity check failed or any image could not be processed, so
    a cron job or CI notices; failed WARN checks are printed but do not change the exit code.
    """
    for step in report.warnings:
        where = f"[{step.partition}]" if step.partition else ""
        print(f"warning: {step.asset}{where}: check(s) not passed: {', '.join(step.checks_warned)}")
    problems = report.problems
    if not problems:
        print(f"\nall {len(report.steps)} steps succeeded")
        return 0
    print(f"\n{len(problems)} of {len(report.steps)} steps need attention:", file=sys.stderr)
    for step in problems:
        where = f"[{step.partition}]" if step.partition else ""
        reasons = [] if step.success else [f"FAILED: {step.error}"]
        if step.checks_failed:
            reasons.append(f"ERROR check(s) failed: {', '.join(step.checks_failed)}")
        if step.images_failed:
            reasons.append(f"{step.images_failed} image(s) could not be processed (see the run's metadata)")
        print(f"  {step.asset}{where}: {'; '.join(reasons)}", file=sys.stderr)
    return 1


def print_summary(config: PipelineConfig) -> None:
    """What the demo produced, in words a person can act on (read through artifact_io: works on S3 too)."""
    import pandas as pd

    from agssp_pipeline import artifact_io

    layout = config.layout()
    print("\n=== AGSSP demo summary ===")
    print(f"storage_root: {layout.root}")
    total_images = total_quarantined = 0
    print(f"{'source':<22}{'role':<12}{'format':<14}{'images':>8}{'boxes':>8}{'quarantined':>13}")
    for source in config.sources:
        index_path = layout.index(source.name)
        if not artifact_io.exists(index_path):
            print(f"{source.name:<22}{source.role:<12}{source.format:<14}{'(not indexed)':>29}")
            continue
        n_images = len(artifact_io.read_parquet(index_path, columns=["image_id"]))
        ann = layout.annotations(source.name)
        n_boxes = len(artifact_io.read_parquet(ann, columns=["image_id"])) if artifact_io.exists(ann) else 0
        quarantine = layout.quarantine(source.name)
        # clipped boxes and converted images are kept; only "quarantined" rows are rejected files
        rows = (artifact_io.read_parquet(quarantine, columns=["action"]) if artifact_io.exists(quarantine)
                else pd.DataFrame({"action": []}))
        n_quarantined = int((rows["action"] == "quarantined").sum())
        total_images += n_images
        total_quarantined += n_quarantined
        print(f"{source.name:<22}{source.role:<12}{source.format:<14}{n_images:>8}{n_boxes:>8}{n_quarantined:>13}")
    print(f"total: {total_images} images indexed, {total_quarantined} files quarantined "
          f"(reasons in {layout.path('index')}/<source>.quarantine.parquet)")
    artifacts = [
        ("anomaly maps", layout.maps_root()),
        ("thresholds", layout.thresholds()),
        ("pseudo boxes", layout.path("pseudo_boxes")),
        ("checkpoints", layout.path("checkpoints")),
        ("evaluations", layout.path("evaluations")),
    ]
    print("artifacts:")
    for label, path in artifacts:
        state = "" if artifact_io.exists(path) else "  (not produced)"
        print(f"  {label:<14}{path}{state}")
    for table in artifact_io.glob(layout.evaluations("finetune", "*", ".md")):
        print(f"\n{artifact_io.name(table).removesuffix('.md')}:\n{artifact_io.read_text(table)}")
    print("\nOpen the web UI on these assets with: make ui   (then http://127.0.0.1:3000)")
    print("The demo images are synthetic; point a copy of agssp.yaml at your own folders for real data.")


def cmd_demo(args: argparse.Namespace) -> int:
    from agssp_pipeline.demo import generate_demo

    root = Path(args.root).resolve()
    corpus = generate_demo(root, seed=args.seed)
    print(f"demo corpus written to {corpus.root} (config: {corpus.config_path})")
    code = _run(str(corpus.config_path), args.select, None)
    print_summary(load_config(corpus.config_path))
    return code


def cmd_materialize(args: argparse.Namespace) -> int:
    return _run(args.config, args.select, args.partition)


def cmd_validate(args: argparse.Namespace) -> int:
    from agssp_pipeline import artifact_io
    from agssp_pipeline.sources.formats import check_options

    config = load_config(args.config)
    problems = []
    for source in config.sources:
        try:
            check_options(source)
        except ValueError as error:
            problems.append(str(error))
        root = artifact_io.local_path(source.root)
        if root is not None and not root.exists():
            print(f"note: source '{source.name}': root {source.root} does not exist here (its partition will fail)")
    if problems:
        print("\n".join(f"agssp: {p}" for p in problems), file=sys.stderr)
        return 2
    print(f"{args.config}: valid, {len(config.sources)} sources "
          f"({len(config.pretrain_sources())} pretraining, {len(config.downstream_sources())} downstream)")
    return 0


def cmd_convert_weights(args: argparse.Namespace) -> int:
    from agssp_pipeline.training.detector import convert_weights_file

    print(f"wrote {convert_weights_file(args.file, args.out)} (tensors only; use it in finetune.extra_weights)")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    import os

    from agssp_pipeline.config import CONFIG_ENV_VAR
    from agssp_pipeline.lineage_report import LineageTargetError, build_lineage_report

    config_path = args.lineage_config or os.environ.get(CONFIG_ENV_VAR)
    try:
        report = build_lineage_report(args.target, config_path, use_dagster=not args.no_dagster)
    except LineageTargetError as error:
        print(f"agssp lineage: {error}", file=sys.stderr)
        return 2
    print(report.to_json() if args.json else report.render())
    return 1 if args.fail_on_stale and report.flags("STALE") else 0


def cmd_init(args: argparse.Namespace) -> int:
    """Recognise each folder's layout and write a commented config; exit 2 on a missing folder or file."""
    from agssp_pipeline.init_config import write_init_config

    try:
        target, guesses = write_init_config(args.folders, args.out, force=args.force)
    except (FileExistsError, ValueError) as error:
        print(f"agssp init: {error}", file=sys.stderr)
        return 2
    for guess in guesses:
        print(f"{guess.root}: {guess.claim.format} ({guess.claim.labels} labels) -> source '{guess.name}', "
              f"role {guess.role} (guessed)")
    print(f"wrote {target}: review the lines marked CONFIRM, then run agssp validate --config {target}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agssp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="write the synthetic demo corpus and run the whole chain on it")
    demo.add_argument("--root", default="./agssp_demo", help="folder for the corpus, config and artifacts")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--select", default=None, help="asset selection (default: everything)")
    demo.set_defaults(func=cmd_demo)

    mat = sub.add_parser("materialize", help="materialise assets headless, in-process")
    mat.add_argument("--config", default=None, help="agssp.yaml (default: $AGSSP_CONFIG)")
    mat.add_argument("--select", default=None, help="Dagster asset selection, e.g. 'image_index' or 'key:anomaly_maps+'")
    mat.add_argument("--partition", default=None, help="only this source (partition key)")
    mat.set_defaults(func=cmd_materialize)

    lin = sub.add_parser("lineage", help="the chain from sources to evaluations behind an artifact or asset")
    lin.add_argument("target", help="checkpoint run dir / model.safetensors / lineage.json, an "
                     "evaluations/<finetune|kead|box_quality>/ table, a pseudo-box or index parquet, the thresholds "
                     "table, a maps.zarr/<source> store (local or s3://), or an asset name (its latest artifact), e.g. "
                     "finetune_evaluation, kead_evaluation[demo_billet_masks], pseudo_boxes[demo_plant_line1]")
    lin.add_argument("--config", dest="lineage_config", default=None,
                     help="agssp.yaml (needed for asset names; default: $AGSSP_CONFIG)")
    lin.add_argument("--json", action="store_true", help="machine-readable output")
    lin.add_argument("--no-dagster", action="store_true", help="ignore the Dagster instance, artifacts only")
    lin.add_argument("--fail-on-stale", action="store_true", help="exit 1 when an upstream artifact changed after use")
    lin.set_defaults(func=cmd_lineage)

    conv = sub.add_parser(
        "convert-weights", help="rewrite a pickled .pt (e.g. ultralytics yolov8n.pt) as .safetensors",
        description="Unpickles FILE (only for files you trust) and writes its weights as safetensors, "
                    "which the pipeline loads without unpickling. Example: agssp convert-weights yolov8n.pt")
    conv.add_argument("file", help="the .pt file")
    conv.add_argument("--out", default=None, help="target (default: FILE with the suffix .safetensors)")
    conv.set_defaults(func=cmd_convert_weights)

    init = sub.add_parser(
        "init", help="write an agssp.yaml for your own folders (layouts recognised)",
        description="Looks at each FOLDER, recognises its layout (VOC, YOLO, YOLO-seg, COCO, labelme, mask "
                    "folders, class folders, CSV labels, instance masks, pixel boxes, split folders...) and writes a "
                    "commented config with production-sized settings; guessed roles are marked CONFIRM. "
                    "Example: agssp init /data/line1 /data/neu_det --out agssp.yaml")
    init.add_argument("folders", nargs="+", metavar="FOLDER", help="one dataset folder per source")
    init.add_argument("--out", default="agssp.yaml", help="config file to write (default: agssp.yaml)")
    init.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    init.set_defaults(func=cmd_init)

    val = sub.add_parser("validate", help="validate a config file")
    val.add_argument("--config", default=None)
    val.set_defaults(func=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "config", "unset") is None:
        import os

        from agssp_pipeline.config import CONFIG_ENV_VAR

        args.config = os.environ.get(CONFIG_ENV_VAR)
        if not args.config:
            print(f"agssp: no config: pass --config FILE or set {CONFIG_ENV_VAR}", file=sys.stderr)
            return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as error:
        print(f"agssp: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
