"""Evaluation of detectors: COCO-standard mAP from pipeline tables (``coco_map``)."""
