"""``python -m agssp_pipeline.demo ROOT``: write the demo corpus and print what was planted in it.

Figures per source: images, defect-free images, planted defects by type, deliberately bad files, and
the median/10th-percentile local contrast of the defects (see ``inspect.local_contrast``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from agssp_pipeline import artifact_io
from agssp_pipeline.demo.corpus import generate_demo
from agssp_pipeline.demo.inspect import contact_sheet, defect_contrast


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agssp_pipeline.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("root", type=Path, help="folder for the corpus (created; other files are left alone)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the images per source")
    parser.add_argument(
        "--preview", action="store_true", help="write contact sheets to ground_truth/previews/"
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    corpus = generate_demo(args.root, seed=args.seed, scale=args.scale)
    elapsed = time.perf_counter() - started
    print(f"demo corpus: {corpus.root} (seed {corpus.seed}, scale {corpus.scale}) written in {elapsed:.2f} s")
    print(f"config: {corpus.config_path}")
    columns = f"{'source':<20} {'images':>6} {'normal':>6} {'defects':>7} {'bad':>3}"
    header = f"{columns}  {'contrast p10/p50':>16}  by type"
    print(header)
    print("-" * len(header))
    for source in corpus.sources:
        stats = defect_contrast(corpus.root, source)
        by_type = ", ".join(f"{k} {v}" for k, v in stats["defect_type"].value_counts().sort_index().items())
        p10, p50 = stats["contrast"].quantile([0.1, 0.5])
        print(
            f"{source:<20} {corpus.images[source]:>6} {corpus.normal_images[source]:>6} "
            f"{corpus.defects[source]:>7} {len(corpus.bad_files[source]):>3}  "
            f"{p10:>7.2f} /{p50:>7.2f}  {by_type}"
        )
        if args.preview:
            target = corpus.ground_truth_dir / "previews" / f"{source}.png"
            artifact_io.write_image(target, contact_sheet(corpus.root, source))
            print(f"{'':<20} preview: {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
