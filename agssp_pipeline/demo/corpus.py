"""The embedded demo corpus: four synthetic sources, their config file and hidden ground truth.

``generate_demo`` lets anyone run the whole pipeline (and the test suite) without real plant data, in
minutes on a laptop CPU. Ground truth lives in ``<root>/ground_truth/`` — outside every source root, so
ingestion never sees it (plant data is unlabelled), yet quality evaluations can score against it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from agssp_pipeline import artifact_io
from agssp_pipeline.demo.layouts import (
    WRITERS,
    ImageFactory,
    SourceOutput,
    SourceSpec,
    encode_png,
    write_if_changed,
)

CONFIG_NAME = "agssp.yaml"
SOURCES_DIR = "sources"
GROUND_TRUTH_DIR = "ground_truth"
MANIFEST = f"{GROUND_TRUTH_DIR}/manifest.json"
STORAGE_DIR = "storage"

DEMO_SOURCES: tuple[SourceSpec, ...] = (
    SourceSpec(
        name="demo_plant_line1",
        kind="plant",
        format="image_folder",
        category="brushed_steel",
        role="pretrain",
        defect_classes=("scratch", "pit", "crack", "patch"),
        images=48,
        normal_fraction=0.25,
        max_defects=3,
        # three broken frames in ~50 is over the 5 % default of the image_index quarantine check
        options={"max_quarantine_rate": 0.1},
    ),
    SourceSpec(
        name="demo_rolled_voc",
        kind="public",
        format="voc",
        category="rolled_strip",
        role="pretrain",
        defect_classes=("scratch", "pit", "inclusion", "patch"),
        images=48,
        normal_fraction=0.15,
        max_defects=3,
        classes=("scratch", "pit", "inclusion", "patch"),
        options={"images": "IMAGES", "annotations": "ANNOTATIONS"},
    ),
    SourceSpec(
        name="demo_billet_masks",
        kind="public",
        format="mask_folder",
        category="cast_billet",
        role="pretrain",
        defect_classes=("crack", "pit", "inclusion"),
        images=50,
        normal_fraction=0.0,
        max_defects=2,
        normal_subfolders=("Free",),
        native_labels={"crack": "Crack", "pit": "Pit", "inclusion": "Inclusion"},
    ),
    SourceSpec(
        name="demo_downstream",
        kind="public",
        format="yolo",
        category="rolled_strip",
        role="downstream",
        defect_classes=("scratch", "pit", "inclusion"),
        images=60,
        normal_fraction=0.1,
        max_defects=3,
        classes=("scratch", "pit", "inclusion"),
    ),
)
SOURCE_SPECS = {spec.name: spec for spec in DEMO_SOURCES}

IMAGE_COLUMNS = [
    "source",
    "file",
    "image_id",
    "width",
    "height",
    "is_normal",
    "n_defects",
    "duplicate_of_file",
    "mask_file",
]
BOX_COLUMNS = [
    "source",
    "file",
    "image_id",
    "instance",
    "class_name",
    "defect_type",
    "x1",
    "y1",
    "x2",
    "y2",
    "mask_area",
]


@dataclass
class DemoCorpus:
    """Where the demo lives and what was planted in it."""

    root: Path
    config_path: Path
    storage_root: Path
    sources: list[str]
    source_roots: dict[str, Path]
    ground_truth_dir: Path
    seed: int
    scale: float
    images: dict[str, int] = field(default_factory=dict)  # readable images written per source
    defects: dict[str, int] = field(default_factory=dict)  # planted defect instances per source
    normal_images: dict[str, int] = field(default_factory=dict)
    bad_files: dict[str, list[str]] = field(default_factory=dict)  # source -> files relative to its root

    def ground_truth(self, source: str) -> pd.DataFrame:
        return ground_truth(self.root, source)

    def ground_truth_images(self, source: str) -> pd.DataFrame:
        return ground_truth_images(self.root, source)


def image_id_of(data: bytes) -> str:
    """Same id ingestion gives a file: the first 16 hex digits of the SHA-256 of its bytes."""
    return hashlib.sha256(data).hexdigest()[:16]


class DemoCorpusConflict(RuntimeError):
    """``root`` holds a demo corpus whose files a new generation would leave behind without ground truth."""


def generate_demo(root: str | Path, seed: int = 0, scale: float = 1.0) -> DemoCorpus:
    """Write (or rewrite identically) the demo corpus under ``root``; files not written by it are left alone.

    ``scale`` multiplies the number of images per source (1.0 = about 50 per source, sized for a full
    pipeline run in about ten minutes on two CPU cores). Everything is rendered in memory first and a
    file is only written when its bytes change, so regenerating keeps mtimes (and ingestion caches) intact.
    Raises ``DemoCorpusConflict`` rather than leave images of an earlier, larger generation behind.
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    root = Path(root).resolve()
    gt_dir = root / GROUND_TRUTH_DIR
    corpus = DemoCorpus(
        root=root,
        config_path=root / CONFIG_NAME,
        storage_root=root / STORAGE_DIR,
        sources=[spec.name for spec in DEMO_SOURCES],
        source_roots={spec.name: root / SOURCES_DIR / spec.name for spec in DEMO_SOURCES},
        ground_truth_dir=gt_dir,
        seed=seed,
        scale=scale,
    )
    files: dict[str, bytes] = {}  # path relative to root -> bytes
    manifest: dict[str, Any] = {"seed": seed, "scale": scale, "sources": {}}
    for spec in DEMO_SOURCES:
        output = WRITERS[spec.format](spec, ImageFactory(seed, spec), scale)
        prefix = f"{SOURCES_DIR}/{spec.name}"
        files.update({f"{prefix}/{w.file}": w.data for w in output.images})
        files.update({f"{prefix}/{name}": data for name, data in output.extra_files.items()})
        files.update({f"{prefix}/{bad.file}": bad.data for bad in output.bad_files})
        images, boxes, masks = _ground_truth_tables(spec, output)
        gt_prefix = f"{GROUND_TRUTH_DIR}/{spec.name}"
        files.update({f"{gt_prefix}/{name}": data for name, data in masks.items()})
        files[f"{gt_prefix}/images.parquet"] = artifact_io.parquet_bytes(images)
        files[f"{gt_prefix}/boxes.parquet"] = artifact_io.parquet_bytes(boxes)
        corpus.images[spec.name] = len(images)
        corpus.defects[spec.name] = len(boxes)
        corpus.normal_images[spec.name] = int(images["is_normal"].sum())
        corpus.bad_files[spec.name] = [bad.file for bad in output.bad_files]
        manifest["sources"][spec.name] = {
            "images": len(images),
            "defects": len(boxes),
            "normal_images": corpus.normal_images[spec.name],
            "bad_files": [{"file": bad.file, "problem": bad.problem} for bad in output.bad_files],
        }
    files[CONFIG_NAME] = render_config().encode()
    files["README.txt"] = README_TEXT.encode()
    manifest["files"] = sorted(files)
    _refuse_leftovers(root, set(files))
    files[MANIFEST] = (json.dumps(manifest, indent=1) + "\n").encode()
    for relative, data in files.items():
        write_if_changed(root / relative, data)
    corpus.storage_root.mkdir(parents=True, exist_ok=True)
    return corpus


def _refuse_leftovers(root: Path, new_files: set[str]) -> None:
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        return
    try:
        previous = artifact_io.read_json(manifest_path)
        old_files = set(previous.get("files", []))
    except (ValueError, AttributeError):
        raise DemoCorpusConflict(
            f"unreadable demo manifest {manifest_path}: remove {root} or pick another root"
        ) from None
    leftovers = sorted(f for f in old_files - new_files if (root / f).exists())
    if leftovers:
        raise DemoCorpusConflict(
            f"{root} holds a demo corpus generated with seed {previous.get('seed')} and scale "
            f"{previous.get('scale')}; regenerating it here would leave {len(leftovers)} of its files "
            f"(e.g. {leftovers[0]}) without ground truth. Remove that folder or choose another root."
        )


def _ground_truth_tables(
    spec: SourceSpec, output: SourceOutput
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, bytes]]:
    """Per-image and per-box tables, plus instance-label PNGs (0 = background, k = instance k) by name."""
    image_rows, box_rows, masks = [], [], {}
    for written in output.images:
        image = written.image
        image_id = image_id_of(written.data)
        mask_file = f"masks/{Path(written.duplicate_of or written.file).with_suffix('.png').as_posix()}"
        image_rows.append(
            {
                "source": spec.name,
                "file": written.file,
                "image_id": image_id,
                "width": image.width,
                "height": image.height,
                "is_normal": image.is_normal,
                "n_defects": len(image.defects),
                "duplicate_of_file": written.duplicate_of,
                "mask_file": mask_file,
            }
        )
        if written.duplicate_of is not None:
            continue  # its boxes are those of the original: one set per image_id
        labels = np.zeros((image.height, image.width), dtype=np.uint8)
        for instance, defect in enumerate(image.defects, start=1):
            labels[defect.mask] = instance
            x1, y1, x2, y2 = defect.box
            box_rows.append(
                {
                    "source": spec.name,
                    "file": written.file,
                    "image_id": image_id,
                    "instance": instance,
                    "class_name": spec.label(defect.class_name),
                    "defect_type": defect.class_name,
                    "x1": float(x1),
                    "y1": float(y1),
                    "x2": float(x2),
                    "y2": float(y2),
                    "mask_area": defect.area,
                }
            )
        masks[mask_file] = encode_png(labels)
    images = pd.DataFrame(image_rows, columns=IMAGE_COLUMNS)
    boxes = pd.DataFrame(box_rows, columns=BOX_COLUMNS)
    return images, boxes, masks


def _check_source(root: Path, source: str) -> Path:
    folder = Path(root) / GROUND_TRUTH_DIR / source
    if source not in SOURCE_SPECS:
        raise KeyError(f"unknown demo source '{source}' (known: {', '.join(SOURCE_SPECS)})")
    if not (folder / "images.parquet").is_file():
        raise FileNotFoundError(
            f"no demo ground truth for '{source}' under {folder}: run generate_demo({root}) first"
        )
    return folder


def _with_paths(frame: pd.DataFrame, root: Path, source: str) -> pd.DataFrame:
    source_root = Path(root).resolve() / SOURCES_DIR / source
    frame.insert(2, "path", [str(source_root / f) for f in frame["file"]])
    return frame


def ground_truth_images(root: Path, source: str) -> pd.DataFrame:
    """One row per readable image of a demo source: path, image_id, size, is_normal, n_defects, mask_path.

    ``mask_path`` is an instance-label PNG (0 background, k = the box row with ``instance == k``);
    ``mask > 0`` is the defect mask. Duplicates carry ``duplicate_of_file`` and no boxes of their own.
    """
    folder = _check_source(root, source)
    frame = _with_paths(artifact_io.read_parquet(folder / "images.parquet"), root, source)
    frame["mask_path"] = [str(folder.resolve() / f) for f in frame.pop("mask_file")]
    duplicates = frame["duplicate_of_file"]
    frame["duplicate_of_file"] = pd.Series(
        [v if isinstance(v, str) else None for v in duplicates], index=frame.index, dtype=object
    )
    return frame


def ground_truth(root: Path, source: str) -> pd.DataFrame:
    """Planted defect boxes of a demo source (every source, the unlabelled plant one included).

    Columns: source, file, path, image_id, instance, class_name (as the source's native labels name it),
    defect_type (scratch, pit, inclusion, crack, patch), x1, y1, x2, y2 (pixel edges, x2/y2 exclusive =
    tight bounding box of the mask, the convention of the index annotations), mask_area, mask_path
    (instance-label PNG), width, height.
    Defect-free images have no rows; see ``ground_truth_images`` for them.
    """
    folder = _check_source(root, source)
    boxes = _with_paths(artifact_io.read_parquet(folder / "boxes.parquet"), root, source)
    images = ground_truth_images(root, source)
    return boxes.merge(images[["file", "mask_path", "width", "height"]], on="file", how="left")


def demo_root_of(source_root: str | Path, source: str) -> Path | None:
    """The demo corpus folder a configured source lives in, or None for any other (real) source.

    A demo source sits at ``<root>/sources/<name>`` with ``<root>/ground_truth/<name>/`` beside it; this is
    how a pipeline stage finds the hidden ground truth of e.g. the unlabelled plant source from its config.
    """
    path = artifact_io.local_path(source_root)
    if path is None or source not in SOURCE_SPECS or path.name != source:
        return None
    root = path.resolve().parent.parent
    if (
        path.resolve().parent.name != SOURCES_DIR
        or not (root / GROUND_TRUTH_DIR / source / "boxes.parquet").is_file()
    ):
        return None
    return root


def find_ground_truth(source_root: str | Path, source: str) -> pd.DataFrame | None:
    """``ground_truth`` of a configured source when it is a demo source, else None (real data)."""
    root = demo_root_of(source_root, source)
    return None if root is None else ground_truth(root, source)


def read_instance_mask(mask_path: str | Path) -> np.ndarray:
    labels = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
    if labels is None:
        raise FileNotFoundError(f"cannot read ground-truth mask {mask_path}")
    return labels


def render_config() -> str:
    """The demo's agssp.yaml: relative paths, so the whole folder can be moved or copied as is."""
    blocks = []
    for spec in DEMO_SOURCES:
        lines = [
            f"  - name: {spec.name}",
            f"    kind: {spec.kind}",
            f"    format: {spec.format}",
            f"    root: {SOURCES_DIR}/{spec.name}",
            f"    category: {spec.category}",
            f"    role: {spec.role}",
        ]
        if spec.normal_subfolders:
            lines.append(f"    normal_subfolders: [{', '.join(spec.normal_subfolders)}]")
        if spec.classes:
            lines.append(f"    classes: [{', '.join(spec.classes)}]")
        if spec.options:
            lines.append("    options:")
            lines += [f"      {key}: {value}" for key, value in spec.options.items()]
        blocks.append("\n".join(lines))
    return CONFIG_TEMPLATE.format(sources="\n".join(blocks))


CONFIG_TEMPLATE = """\
# AGSSP demo configuration (synthetic data; see README.txt).
# DEMO-SIZED: epochs 1/1/2, 128/160 px (KeAD maps 224 px, the product 320), num_workers 0 so it runs on a
# laptop CPU in minutes. For real data start from `agssp init FOLDER...`, which writes production-sized settings.
# Relative paths resolve against this file's folder.
storage_root: {STORAGE_DIR}

sources:
{sources}

kead:
  encoder: cnn_fewshot      # EfficientNet-Lite0 features, few-shot normal references
  mode: fewshot
  k_shot: 4
  reference_strategy: auto
  image_size: 224           # DEMO-SIZED: product default 320 (kead/cnn_encoder.py); 224 maps 2.4x faster on CPU
  # input (aspect) and cnn_layers ([2, 3]) are the product defaults: bench_kead_eval.py measured them
  batch_size: 16
  num_workers: 0
  device: auto
  adaptor_training:         # feature_adaptor (ADPretrain projector): a few steps, enough to show the stage
    steps: 30
    batch_size: 256
    max_images_per_category: 8

boxes:
  method: measured          # or paper: the paper's exact rule (agssp_pipeline/boxes/__init__.py)
  delta: 0.1
  top_k: 10

backbone:
  backbones: [yolov8n]
  epochs: 1
  batch_size: 16
  image_size: 128
  num_workers: 0
  device: auto

detector:
  model: yolov8n
  epochs: 1
  image_size: 160
  batch_size: 16
  workers: 0
  device: auto

finetune:
  epochs: 2
  image_size: 160
  batch_size: 16
  val_fraction: 0.25
  workers: 0
  device: auto
  plots: false              # ultralytics' per-run figures are half of a tiny CPU run; the comparison chart stays
""".replace("{STORAGE_DIR}", STORAGE_DIR)

README_TEXT = """\
AGSSP demo corpus
=================

Everything here is SYNTHETIC: procedurally generated metal surfaces (brushed steel, hot-rolled strip,
cast billet) with planted scratches, pits, inclusions, cracks and patches. It exists so the pipeline can
be tried end to end without plant data. Do not draw conclusions about real detection quality from it.

  agssp.yaml     pipeline config for this corpus (storage_root: storage, relative source roots)
  sources/       four image sources in their native layouts:
                   demo_plant_line1   plain image folder (unlabelled plant data, incl. a few broken files)
                   demo_rolled_voc    Pascal VOC (IMAGES/ + ANNOTATIONS/), like NEU-DET
                   demo_billet_masks  <Class>/Imgs/<name>.jpg + <name>.png masks, defect-free in Free/
                   demo_downstream    Ultralytics YOLO (images/ + labels/ + data.yaml), finetuning only
  ground_truth/  what was planted (boxes, instance masks) for quality checks; never read by ingestion
  storage/       pipeline outputs

Using real data: copy agssp.yaml, set storage_root to a folder (or s3:// URL) with room for maps and
checkpoints, and replace the sources list with your own, e.g.

  sources:
    - name: line3_coils            # slug, becomes the Dagster partition key
      kind: plant
      format: image_folder
      root: /mnt/cameras/line3
      category: hot_rolled_strip
      role: pretrain
    - name: neu_det
      kind: public
      format: voc
      root: /data/neu_det
      category: rolled_strip
      options: {images: IMAGES, annotations: ANNOTATIONS}

Then run the pipeline with AGSSP_CONFIG=/path/to/agssp.yaml (or --config).

Regenerating the demo (same seed) rewrites agssp.yaml, README.txt, sources/ and ground_truth/ with
identical bytes and leaves every other file alone: edit a copy of agssp.yaml, not this one.
Inspect it with:  python -m agssp_pipeline.demo <this folder> --preview   (contact sheets with outlines)
"""
