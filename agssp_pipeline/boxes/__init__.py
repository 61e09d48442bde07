"""Per-category thresholds, pseudo-defect boxes, training exports and their measured quality.

Pure functions on numpy arrays and DataFrames (``thresholds``, ``extract``, ``pseudo``, ``quality``,
``export``); ``stage`` reads/writes them over the storage layout for the Dagster assets
``category_thresholds``, ``pseudo_boxes`` and ``pseudo_box_quality`` (assets/boxes.py).

Rules (settings in ``BoxesSettings``, ``boxes:`` in agssp.yaml):
- T_c = mean over the category's images of max(map) - ``delta``, pooled over every pretraining source of
  the category (``thresholds.parquet``; downstream sources never shape pseudo labels).
- Image split (``image_split``): an image is defective when its image score is strictly above the
  category's cutoff: ``fixed`` (``image_score_threshold``) or ``quantile`` (``image_score_quantile`` of
  the category's scores). Only defective images get boxes.
- Boxes: bilinear upsampling to image size, binarise at T_c, 8-connected components, components below
  ``max(min_area_pixels, ceil(min_area_fraction * H * W))`` dropped (16 px / 0.05 % by default: a floor
  against interpolation specks on small images, a fraction so the rule holds at any resolution), box =
  bounding rectangle in pixel edges (x2 exclusive), score = map maximum over the component, NMS at
  ``nms_iou``, then the ``top_k`` best.
- ``pseudo_boxes/<source>.parquet`` is a manifest: one row per box plus one row with null box columns
  per image without boxes; ``judged_defective`` false rows are the negatives of the exports.

Why ``quantile`` 0.5 is the default image split (measured with benchmarks/box_quality.py, offline CNN
encoder, balanced accuracy / F1 per dataset in the module docstring of that script's report): a fixed
cutoff is only meaningful on one encoder's calibrated scale and collapsed where references are not clean
(NEU-DET and the unlabelled demo plant line, whose references are "typical" images that may hold
defects: scores shift down and a fixed 0.5 flags almost nothing), while a quantile never degenerates.
Lower quantiles scored higher on our corpora only because those are 65-100 % defective; 0.5 assumes no
prevalence. Set ``image_score_quantile`` to 1 - the expected defect prevalence when it is known, or use
``fixed`` with clean normal references and a calibrated encoder.
"""
