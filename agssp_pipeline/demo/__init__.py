"""Synthetic demo corpus: metal surfaces with planted defects, four native-format sources, ground truth."""

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
