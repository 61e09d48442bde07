"""agssp: the AGSSP pretraining pipeline from the command line.

It runs the same Dagster assets as the web UI (make ui), in-process and headless, for scripts and cron,
and ends every run with a summary: steps, failed images and checks, result tables and their paths.

Start with your own folders:
  agssp init /data/line1 /data/neu_det --out agssp.yaml   # recognise layouts, write a commented config
  agssp validate --config agssp.yaml                      # names, sizes, devices, paths: before any run
  agssp materialize --config agssp.yaml                   # the whole chain, then the summary
  AGSSP_CONFIG=agssp.yaml make ui                         # the same assets and runs in the web UI
Or try it on synthetic data first: agssp demo
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from agssp_pipeline.config import CONFIG_ENV_VAR, ConfigError, SelectionError, load_config


def _build(config_path: str):
    from agssp_pipeline.definitions import build_definitions
    from agssp_pipeline.orchestration import prepare_instance

    config = load_config(config_path)
    instance = prepare_instance(config, config_path)
    return config, instance, build_definitions(str(Path(config_path).resolve()))


@contextmanager
def _lines_above(bar):
    """Route everything printed while ``bar`` runs (Dagster's log lines, warnings) above the bar."""
    from tqdm.contrib import DummyTqdmFile

    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = DummyTqdmFile(saved[0]), DummyTqdmFile(saved[1])
    try:
        yield saved
    finally:
        sys.stdout, sys.stderr = saved


def _run(config_path: str, selection: str | None, partition: str | None, title: str = "AGSSP run summary") -> int:
    """Plan, run with a progress bar over the planned steps, print the summary; the exit code."""
    from tqdm import tqdm

    from agssp_pipeline.orchestration import materialize_selection, plan_selection
    from agssp_pipeline.run_summary import render_summary

    config, instance, defs = _build(config_path)
    planned = plan_selection(defs, config, selection=selection, only_source=partition)  # typos stop here
    bar = tqdm(total=len(planned), desc="materialising", unit="step", leave=True, file=sys.stderr,
               dynamic_ncols=True)
    def show_next() -> None:  # what runs next: the bar says what it is waiting for
        if bar.n < len(planned):
            after = planned[bar.n]
            bar.set_postfix_str(f"next {after.asset}" + (f"[{after.partition}]" if after.partition else ""))

    show_next()
    with _lines_above(bar) as (out, _):
        def on_step(step) -> None:
            bar.update(1)
            where = f"[{step.partition}]" if step.partition else ""
            show_next()
            detail = "" if step.success else f" - {step.error}"
            bar.write(f"{step.asset}{where}: {step.status} in {step.seconds:.1f} s{detail}", file=out)

        report = materialize_selection(defs, config, instance, selection=selection, only_source=partition,
                                       on_step=on_step)
    bar.close()
    print(render_summary(config, report, title=title))
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


def cmd_demo(args: argparse.Namespace) -> int:
    from agssp_pipeline.demo import generate_demo

    root = Path(args.root).resolve()
    corpus = generate_demo(root, seed=args.seed)
    print(f"demo corpus written to {corpus.root} (config: {corpus.config_path})")
    code = _run(str(corpus.config_path), args.select, None, title="AGSSP demo summary")
    print(f"\nOpen the web UI on these assets with: AGSSP_CONFIG={corpus.config_path} make ui   "
          "(then http://127.0.0.1:3000)")
    print("The demo images are synthetic; agssp init YOUR_FOLDERS writes a config for real data.")
    return code


def cmd_materialize(args: argparse.Namespace) -> int:
    code = _run(args.config, args.select, args.partition)
    print(f"\nSee the runs, assets and previews in the web UI: AGSSP_CONFIG={Path(args.config).resolve()} make ui")
    return code


def cmd_validate(args: argparse.Namespace) -> int:
    """Load the config and report what can be known before a run; exit 2 on errors, warnings exit 0."""
    from agssp_pipeline import artifact_io
    from agssp_pipeline.config import static_problems

    config = load_config(args.config)
    problems = static_problems(config)
    for source in config.sources:
        root = artifact_io.local_path(source.root)
        if root is not None and not root.exists():
            print(f"note: source '{source.name}': root {source.root} does not exist here (its partition will fail)")
    errors = [p for p in problems if p.severity == "error"]
    for problem in problems:
        print(f"agssp: {args.config}: {problem.severity}: {problem}", file=sys.stderr)
    if errors:
        print(f"{args.config}: {len(errors)} error(s)", file=sys.stderr)
        return 2
    print(f"{args.config}: valid, {len(config.sources)} sources "
          f"({len(config.pretrain_sources())} pretraining, {len(config.downstream_sources())} downstream)"
          + (f", {len(problems)} warning(s)" if problems else ""))
    return 0


def cmd_convert_weights(args: argparse.Namespace) -> int:
    from agssp_pipeline.training.detector import convert_weights_file

    print(f"wrote {convert_weights_file(args.file, args.out)} (tensors only; use it in finetune.extra_weights)")
    return 0


def _owning_config(target: str) -> str | None:
    """The config whose storage_root holds the local artifact ``target``: a YAML file beside that root or in it.

    Lets ``agssp lineage PATH`` find the Dagster instance (``<config dir>/dagster_home``) without --config.
    """
    from agssp_pipeline import artifact_io
    from agssp_pipeline.lineage_report import infer_storage_root

    local = artifact_io.local_path(target)
    if local is None or not local.exists():
        return None
    root = infer_storage_root(artifact_io.canonical(local))
    if root is None:
        return None
    for folder in (Path(root).parent, Path(root)):
        for candidate in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
            try:
                config = load_config(candidate)
            except (ConfigError, OSError):
                continue  # not a pipeline config (e.g. a data.yaml)
            if artifact_io.same_location(config.storage_root, root):
                return str(candidate)
    return None


def cmd_lineage(args: argparse.Namespace) -> int:
    from agssp_pipeline.lineage_report import LineageTargetError, build_lineage_report

    config_path = args.lineage_config or os.environ.get(CONFIG_ENV_VAR) or _owning_config(args.target)
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


RAW = argparse.RawDescriptionHelpFormatter  # descriptions and examples keep their line breaks

DEMO_HELP = """Writes a synthetic corpus (four sources in different native formats, a few deliberately bad
files), its agssp.yaml (demo-sized: small epochs and images) and every artifact under --root, then
prints the summary: steps, sources, KeAD AUROC, pseudo-box quality, the finetune comparison."""
DEMO_EXAMPLES = """examples:
  agssp demo                          # everything under ./agssp_demo
  agssp demo --root /tmp/demo --select 'key:image_index+'"""
MATERIALIZE_HELP = """Runs the selected assets of the config headless and in-process (the same assets and runs as the
web UI), one named run per asset, with a progress bar over the planned steps. Ends with a summary:
steps with status and time, failed images and checks, the result tables of the evaluations the run
produced and their paths. Exit 0 when all is well, 1 when a step failed, an ERROR check failed or
images could not be processed, 2 for a bad config, asset or source name."""
MATERIALIZE_EXAMPLES = """examples:
  agssp materialize --config agssp.yaml                             # everything
  agssp materialize --config agssp.yaml --select image_index        # one asset, every source
  agssp materialize --config agssp.yaml --select 'key:anomaly_maps+' --partition plant_line_3"""
VALIDATE_HELP = """Loads the config and reports what can be known without running: every field's type and range,
encoder, backbone and detector names against their registries, image sizes (multiples of 32), format
options of each source, a storage root that is a file, and, as warnings, device: cuda on a machine
without CUDA and source folders missing here. Exit 2 on errors."""
VALIDATE_EXAMPLES = """examples:
  agssp validate --config agssp.yaml
  AGSSP_CONFIG=agssp.yaml agssp validate"""
LINEAGE_HELP = """Prints the chain behind an artifact or asset: sources and index versions -> map store (encoder,
weights, prompts, references) -> thresholds -> pseudo boxes -> checkpoints -> evaluations, from what
each writer recorded, plus the Dagster records when the instance is found (the one of the config, or
the one beside the artifact's storage root). An input changed after use is flagged STALE."""
LINEAGE_EXAMPLES = """examples:
  agssp lineage agssp_data/checkpoints/detector/yolov8n/<run_id>
  agssp lineage kead_evaluation[plant_line_3] --config agssp.yaml
  agssp lineage finetune_evaluation --config agssp.yaml --json | head"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agssp", description=__doc__, formatter_class=RAW,
                                     epilog="agssp COMMAND --help describes each command, with examples.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="write the synthetic demo corpus and run the whole chain on it",
                          description=DEMO_HELP, epilog=DEMO_EXAMPLES, formatter_class=RAW)
    demo.add_argument("--root", default="./agssp_demo", help="folder for the corpus, config and artifacts")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic corpus (same seed, same bytes)")
    demo.add_argument("--select", default=None, help="asset selection (default: everything)")
    demo.set_defaults(func=cmd_demo)

    mat = sub.add_parser("materialize", help="materialise assets headless, in-process, then print a summary",
                         description=MATERIALIZE_HELP, epilog=MATERIALIZE_EXAMPLES, formatter_class=RAW)
    mat.add_argument("--config", default=None, help="agssp.yaml (default: $AGSSP_CONFIG)")
    mat.add_argument("--select", default=None, help="Dagster asset selection, e.g. 'image_index' or 'key:anomaly_maps+'")
    mat.add_argument("--partition", default=None, help="only this source (partition key)")
    mat.set_defaults(func=cmd_materialize)

    lin = sub.add_parser("lineage", help="the chain from sources to evaluations behind an artifact or asset",
                         description=LINEAGE_HELP, epilog=LINEAGE_EXAMPLES, formatter_class=RAW)
    lin.add_argument("target", help="checkpoint run dir / model.safetensors / lineage.json, an "
                     "evaluations/<finetune|kead|box_quality>/ table, a pseudo-box or index parquet, the thresholds "
                     "table, a maps.zarr/<source> store (local or s3://), or an asset name (its latest artifact), e.g. "
                     "finetune_evaluation, kead_evaluation[demo_billet_masks], pseudo_boxes[demo_plant_line1]")
    lin.add_argument("--config", dest="lineage_config", default=None,
                     help="agssp.yaml (needed for asset names; default: $AGSSP_CONFIG, else the config "
                          "beside the artifact's storage root)")
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

    val = sub.add_parser("validate", help="check a config file before running it",
                         description=VALIDATE_HELP, epilog=VALIDATE_EXAMPLES, formatter_class=RAW)
    val.add_argument("--config", default=None, help="agssp.yaml (default: $AGSSP_CONFIG)")
    val.set_defaults(func=cmd_validate)
    return parser


def _quiet_broken_pipe() -> int:
    """The reader went away (``agssp lineage --json | head``): no traceback, no flush error at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, what a shell reports for a writer whose pipe closed


def _dispatch(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "config", "unset") is None:
        args.config = os.environ.get(CONFIG_ENV_VAR)
        if not args.config:
            print(f"agssp: no config: pass --config FILE or set {CONFIG_ENV_VAR}", file=sys.stderr)
            return 2
    try:
        return int(args.func(args) or 0)
    except (ConfigError, SelectionError) as error:
        print(f"agssp: {error}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 ok, 1 the run needs attention, 2 bad input (config, asset or source names)."""
    try:
        code = _dispatch(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _quiet_broken_pipe()


if __name__ == "__main__":
    sys.exit(main())
