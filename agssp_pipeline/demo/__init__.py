"""Synthetic demo corpus: metal surfaces with planted defects, four native-format sources, ground truth.

``generate_demo(root, seed=0, scale=1.0) -> DemoCorpus`` writes, deterministically (numpy Generator per
image, byte-identical files for a seed; unchanged files are not rewritten):

    root/agssp.yaml                  config (storage_root: storage, relative source roots), load_config-valid
    root/README.txt                  "these images are synthetic" + how to point a config at real data
    root/sources/demo_plant_line1/   image_folder, brushed_steel, unlabelled; JPEG + PNG cameras, a 16-bit
                                     PNG, a CMYK JPEG, an exact duplicate, and three broken files
    root/sources/demo_rolled_voc/    voc (IMAGES/ + ANNOTATIONS/), rolled_strip; one box past the edge,
                                     one annotation without image
    root/sources/demo_billet_masks/  mask_folder (<Class>/Imgs/<name>.jpg + .png), cast_billet, Free/ normal
    root/sources/demo_downstream/    yolo (images/ labels/ data.yaml), rolled_strip, 3 classes, downstream
    root/ground_truth/<source>/      images.parquet, boxes.parquet, masks/ (instance-label PNGs); hidden
                                     from ingestion; read with ``ground_truth`` / ``ground_truth_images``
                                     or, from a configured source, ``find_ground_truth(root, name)``

Boxes everywhere use pixel edges (x2/y2 exclusive, the tight box of the defect mask), the convention of the
index annotations, so ingested labels equal the planted ground truth exactly. ``python -m
agssp_pipeline.demo ROOT --preview`` prints per-source figures and writes contact sheets.
"""

from agssp_pipeline.demo.corpus import (
    DEMO_SOURCES,
    SOURCE_SPECS,
    DemoCorpus,
    DemoCorpusConflict,
    demo_root_of,
    find_ground_truth,
    generate_demo,
    ground_truth,
    ground_truth_images,
    image_id_of,
    read_instance_mask,
    render_config,
)

__all__ = [
    "DEMO_SOURCES",
    "SOURCE_SPECS",
    "DemoCorpus",
    "DemoCorpusConflict",
    "demo_root_of",
    "find_ground_truth",
    "generate_demo",
    "ground_truth",
    "ground_truth_images",
    "image_id_of",
    "read_instance_mask",
    "render_config",
]
