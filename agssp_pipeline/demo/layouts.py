"""Writers for the four demo sources, each in the native layout a user would really hand us.

Every writer returns the images it wrote (with their planted ground truth) and the deliberately bad
files it added, so the corpus can record ground truth outside the source folders, where ingestion
never looks.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import cv2
import numpy as np
from PIL import Image

from agssp_pipeline import artifact_io
from agssp_pipeline.demo.render import SyntheticImage, synthesize

JPEG_QUALITY = 92


@dataclass(frozen=True)
class SourceSpec:
    """What a demo source is (mirrors its entry in agssp.yaml) and how many images it gets at scale 1."""

    name: str
    kind: str
    format: str
    category: str
    role: str
    defect_classes: tuple[str, ...]
    images: int
    normal_fraction: float
    max_defects: int
    classes: tuple[str, ...] = ()
    normal_subfolders: tuple[str, ...] = ()
    options: dict[str, object] = field(default_factory=dict)
    # defect type -> the class name its native labels use (mask folders name classes by folder)
    native_labels: dict[str, str] = field(default_factory=dict)

    def label(self, defect_type: str) -> str:
        return self.native_labels.get(defect_type, defect_type)


@dataclass
class WrittenImage:
    file: str  # path relative to the source root, POSIX separators
    data: bytes
    image: SyntheticImage
    duplicate_of: str | None = None  # file this one is a byte copy of


@dataclass
class BadFile:
    file: str
    data: bytes
    problem: str  # what ingestion should notice


@dataclass
class SourceOutput:
    images: list[WrittenImage] = field(default_factory=list)
    extra_files: dict[str, bytes] = field(default_factory=dict)  # annotations, data.yaml, masks ...
    bad_files: list[BadFile] = field(default_factory=list)


class ImageFactory:
    """Per-image random streams keyed by (seed, source, index): adding images never changes earlier ones."""

    def __init__(self, seed: int, spec: SourceSpec):
        self.seed = seed
        self.spec = spec
        self._source_key = zlib.crc32(spec.name.encode())

    def rng(self, index: int, purpose: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, self._source_key, index, purpose])

    def is_normal_slot(self, index: int) -> bool:
        """Evenly spread defect-free images, exactly ``floor(n * normal_fraction)`` among the first n:
        few-shot references must exist even in a small corpus, so this is not left to chance."""
        fraction = self.spec.normal_fraction
        return int(np.floor((index + 1) * fraction)) > int(np.floor(index * fraction))

    def image(
        self, index: int, height: int, width: int, forced_classes: list[str] | None = None
    ) -> SyntheticImage:
        rng = self.rng(index)
        if forced_classes is not None:
            classes = forced_classes
        elif self.is_normal_slot(index):
            classes = []
        else:
            count = int(rng.integers(1, self.spec.max_defects + 1))
            classes = [str(c) for c in rng.choice(self.spec.defect_classes, size=count)]
        return synthesize(rng, self.spec.category, height, width, classes)


def encode_jpeg(grey: np.ndarray, rgb: bool = True) -> bytes:
    """JPEG of a grey frame; ``rgb`` stores it RGB-encoded like NEU-DET, otherwise single-channel."""
    pixels = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR) if rgb else grey
    ok, buffer = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("OpenCV failed to encode a JPEG")
    return buffer.tobytes()


def encode_png(pixels: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:
        raise RuntimeError("OpenCV failed to encode a PNG")
    return buffer.tobytes()


def encode_cmyk_jpeg(grey: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(grey, mode="L").convert("CMYK").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def soft_mask_png(mask: np.ndarray) -> bytes:
    """Anti-aliased mask like the magnetic-tile masks; thresholding at >127 gives back ``mask`` exactly."""
    blurred = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 0.7)
    values = np.where(mask, 128 + 127 * blurred, 127 * blurred)
    return encode_png(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def count_for(spec: SourceSpec, scale: float) -> int:
    return max(4, int(round(spec.images * scale)))


# --- demo_plant_line1: image folder, two camera/date subfolders, deliberately bad files -----------------


def write_plant_folder(spec: SourceSpec, factory: ImageFactory, scale: float) -> SourceOutput:
    out = SourceOutput()
    total = count_for(spec, scale)
    cameras = [("2026-03-02_cam1", (160, 160), "jpg"), ("2026-03-03_cam2", (160, 192), "png")]
    for index in range(total):
        folder, (height, width), ext = cameras[index % 2]
        image = factory.image(index, height, width)
        stem = f"L1C{index % 2 + 1}_{folder[:10].replace('-', '')}_{index:05d}"
        data = encode_jpeg(image.pixels) if ext == "jpg" else encode_png(image.pixels)
        out.images.append(WrittenImage(f"{folder}/{stem}.{ext}", data, image))
    # valid but unusual encodings that ingestion must convert (they keep their ground truth)
    deep = factory.image(total, 160, 192)
    out.images.append(
        WrittenImage(
            f"2026-03-03_cam2/L1C2_20260303_{total:05d}_16bit.png",
            encode_png(deep.pixels.astype(np.uint16) * 257),
            deep,
        )
    )
    cmyk = factory.image(total + 1, 160, 160)
    out.images.append(
        WrittenImage(
            f"2026-03-02_cam1/L1C1_20260302_{total + 1:05d}_cmyk.jpg", encode_cmyk_jpeg(cmyk.pixels), cmyk
        )
    )
    # the same frame exported twice by the line PC
    original = out.images[0]
    out.images.append(
        WrittenImage("2026-03-03_cam2/export_copy_00000.jpg", original.data, original.image, original.file)
    )
    # broken files: quarantine material, no ground truth
    complete = encode_jpeg(factory.image(total + 2, 160, 160).pixels)
    out.bad_files += [
        BadFile("2026-03-02_cam1/L1C1_20260302_zero_bytes.jpg", b"", "empty file"),
        BadFile(
            "2026-03-02_cam1/L1C1_20260302_truncated.jpg", complete[: len(complete) // 2], "truncated JPEG"
        ),
        BadFile(
            "2026-03-03_cam2/L1C2_20260303_not_an_image.png",
            b"line PC export log: camera 2 lost sync at 03:14:07, frame skipped\n",
            "text file with an image extension",
        ),
    ]
    return out


# --- demo_rolled_voc: Pascal VOC like NEU-DET ---------------------------------------------------------


def voc_xml(filename: str, width: int, height: int, objects: list[tuple[str, int, int, int, int]]) -> bytes:
    """Pascal VOC annotation; ``objects`` hold pixel-edge corners (x2/y2 exclusive), as LabelImg writes."""
    parts = [
        "<annotation>",
        "\t<folder>IMAGES</folder>",
        f"\t<filename>{escape(filename)}</filename>",
        "\t<source>\n\t\t<database>AGSSP demo (synthetic)</database>\n\t</source>",
        f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n\t\t<depth>3</depth>\n\t</size>",
        "\t<segmented>0</segmented>",
    ]
    for name, xmin, ymin, xmax, ymax in objects:
        parts.append(
            "\t<object>\n"
            f"\t\t<name>{escape(name)}</name>\n\t\t<pose>Unspecified</pose>\n"
            "\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>\n"
            f"\t\t<bndbox>\n\t\t\t<xmin>{xmin}</xmin>\n\t\t\t<ymin>{ymin}</ymin>\n"
            f"\t\t\t<xmax>{xmax}</xmax>\n\t\t\t<ymax>{ymax}</ymax>\n\t\t</bndbox>\n"
            "\t</object>"
        )
    parts.append("</annotation>\n")
    return "\n".join(parts).encode()


def write_voc(spec: SourceSpec, factory: ImageFactory, scale: float) -> SourceOutput:
    out = SourceOutput()
    images_dir, annotations_dir = spec.options["images"], spec.options["annotations"]
    frames = [factory.image(index, 160, 160) for index in range(count_for(spec, scale))]
    # the labelling slip below needs a defect on the image border; tiny corpora may lack one: add frames
    while _edge_slip(frames) is None:
        if len(frames) > count_for(spec, scale) + MAX_EXTRA_FRAMES:
            raise RuntimeError("no planted defect reaches an image edge; cannot write the out-of-bounds box")
        frames.append(factory.image(len(frames), 160, 160))
    annotations = [[[spec.label(d.class_name), *d.box] for d in image.defects] for image in frames]
    frame_index, object_index, coordinate, value = _edge_slip(frames)  # type: ignore[misc]
    annotations[frame_index][object_index][1 + coordinate] = value
    for index, (image, objects) in enumerate(zip(frames, annotations, strict=True)):
        stem = f"strip_{index + 1:04d}"
        out.images.append(WrittenImage(f"{images_dir}/{stem}.jpg", encode_jpeg(image.pixels), image))
        xml = voc_xml(f"{stem}.jpg", image.width, image.height, [tuple(o) for o in objects])
        out.extra_files[f"{annotations_dir}/{stem}.xml"] = xml
    missing = f"strip_{len(frames) + 1:04d}"
    out.bad_files.append(
        BadFile(
            f"{annotations_dir}/{missing}.xml",
            voc_xml(f"{missing}.jpg", 160, 160, [("scratch", 20, 30, 90, 34)]),
            "annotation whose image is missing",
        )
    )
    return out


MAX_EXTRA_FRAMES = 100
EDGE_OVERSHOOT = 3


def _edge_slip(frames: list[SyntheticImage]) -> tuple[int, int, int, int] | None:
    """A labelling-tool slip on the first box that touches the image border: that side is written
    ``EDGE_OVERSHOOT`` px outside the image (negative, or past width/height).

    Returns (frame, object, coordinate 0..3 = x1 y1 x2 y2, written value). Clipping the written box to
    the image restores the true box exactly, which is what ingestion should do.
    """
    for frame_index, image in enumerate(frames):
        limits = (0, 0, image.width, image.height)
        for object_index, defect in enumerate(image.defects):
            for coordinate, (value, limit) in enumerate(zip(defect.box, limits, strict=True)):
                if value == limit:
                    overshoot = -EDGE_OVERSHOOT if coordinate < 2 else EDGE_OVERSHOOT
                    return frame_index, object_index, coordinate, limit + overshoot
    return None


# --- demo_billet_masks: magnetic-tile layout <Class>/Imgs/<name>.jpg + <name>.png -----------------------


def write_mask_folder(spec: SourceSpec, factory: ImageFactory, scale: float) -> SourceOutput:
    out = SourceOutput()
    per_class = max(3, int(round(spec.images * scale / (len(spec.defect_classes) + 2))))
    normal_folder = spec.normal_subfolders[0]
    plan = [(spec.label(kind), kind) for kind in spec.defect_classes for _ in range(per_class)]
    plan += [(normal_folder, None)] * max(8, 2 * per_class)
    for index, (folder, class_name) in enumerate(plan):
        rng = factory.rng(index, purpose=1)
        height, width = int(rng.choice([160, 176, 192])), int(rng.choice([144, 160, 176]))
        forced = [] if class_name is None else [class_name] * int(rng.integers(1, 3))
        image = factory.image(index, height, width, forced)
        stem = f"billet_{index + 1:04d}"
        out.images.append(
            WrittenImage(f"{folder}/Imgs/{stem}.jpg", encode_jpeg(image.pixels, rgb=False), image)
        )
        out.extra_files[f"{folder}/Imgs/{stem}.png"] = soft_mask_png(image.union_mask())
    return out


# --- demo_downstream: Ultralytics YOLO layout ---------------------------------------------------------


def yolo_label(image: SyntheticImage, class_ids: dict[str, int], spec: SourceSpec) -> bytes:
    lines = []
    for defect in image.defects:
        x1, y1, x2, y2 = defect.box
        cx, cy = (x1 + x2) / 2 / image.width, (y1 + y2) / 2 / image.height
        bw, bh = (x2 - x1) / image.width, (y2 - y1) / image.height
        lines.append(f"{class_ids[spec.label(defect.class_name)]} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}")
    return ("\n".join(lines) + "\n" if lines else "").encode()


def write_yolo(spec: SourceSpec, factory: ImageFactory, scale: float) -> SourceOutput:
    out = SourceOutput()
    class_ids = {name: i for i, name in enumerate(spec.classes)}
    for index in range(count_for(spec, scale)):
        image = factory.image(index, 160, 160)
        stem = f"coil_{index + 1:04d}"
        out.images.append(WrittenImage(f"images/{stem}.jpg", encode_jpeg(image.pixels), image))
        out.extra_files[f"labels/{stem}.txt"] = yolo_label(image, class_ids, spec)
    names = "\n".join(f"  {i}: {name}" for name, i in class_ids.items())
    out.extra_files["data.yaml"] = (
        "# AGSSP demo downstream set (synthetic hot-rolled strip), Ultralytics dataset file.\n"
        "# No 'path' key: Ultralytics then resolves train/val against this file's folder.\n"
        f"train: images\nval: images\nnc: {len(class_ids)}\nnames:\n{names}\n"
    ).encode()
    return out


SourceWriter = Callable[[SourceSpec, ImageFactory, float], SourceOutput]
WRITERS: dict[str, SourceWriter] = {
    "image_folder": write_plant_folder,
    "voc": write_voc,
    "mask_folder": write_mask_folder,
    "yolo": write_yolo,
}


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write ``data`` unless the file already holds exactly it (keeps mtimes stable on regeneration)."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    artifact_io.write_bytes(path, data)
    return True
