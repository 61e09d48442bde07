"""Per-category thresholds, pseudo-defect boxes, training exports and their measured quality.

Pure functions on numpy arrays and DataFrames (``thresholds``, ``extract``, ``pseudo``, ``quality``,
``export``); ``stage`` reads/writes them over the storage layout for the Dagster assets
``category_thresholds``, ``pseudo_boxes`` and ``pseudo_box_quality`` (assets/boxes.py).

Rules (settings in ``BoxesSettings``, ``boxes:`` in agssp.yaml). ``boxes.method`` names a preset of three
named rules (``settings.METHODS``); each rule set explicitly overrides its preset:
- ``threshold_rule`` (``thresholds.THRESHOLD_RULES``): ``paper``: T_c = mean over the category's images of
  max(map) - ``delta``; ``normal_mad``: median + ``threshold_k`` * 1.4826 * MAD of the maxima of the images
  the split judges normal. Pooled over every pretraining source of the category (``thresholds.parquet``;
  downstream sources never shape pseudo labels).
- ``image_split`` (``thresholds.IMAGE_SPLIT_RULES``): ``map_max`` (an image is defective when its map
  maximum exceeds T_c: what the paper implies by binarising every image), ``fixed``, ``quantile``,
  ``otsu`` and ``gmm`` (two-class splits of the image scores, the quantile rule when the scores look
  unimodal). Only defective images get boxes.
- ``binarisation`` (``extract.BINARISATIONS``): ``single`` (pixels >= T_c), ``hysteresis`` (seeded at T_c,
  grown down to a lower level), ``rethreshold`` (each component keeps its pixels above
  ``level + rethreshold_fraction * (peak - level)``, level = the image's map median, and is relabelled).
- ``method: paper`` = paper / map_max / single: the paper's exact rule. ``method: measured`` (default) =
  paper / map_max / rethreshold 0.5. The old product default was paper / quantile 0.5 / single.
- Boxes: bilinear upsampling to image size, binarisation, 8-connected components, components below
  ``max(min_area_pixels, ceil(min_area_fraction * H * W))`` dropped (16 px / 0.05 % by default: a floor
  against interpolation specks on small images, a fraction so the rule holds at any resolution), box =
  bounding rectangle in pixel edges (x2 exclusive), score = map maximum over the component, NMS at
  ``nms_iou``, then the ``top_k`` best.
- ``pseudo_boxes/<source>.parquet`` is a manifest: one row per box plus one row with null box columns
  per image without boxes; ``judged_defective`` false rows are the negatives of the exports. Its attrs
  hold the settings and the resolved rules; the thresholds table records method and rules per category.

Why ``measured`` is the default: box recall / precision at IoU 0.3 (greedy matching) on the same cached
maps, ``nice .venv/bin/python benchmarks/box_quality.py --datasets demo,magnetic_tile,neu_det
--max-per-class 0 --sweep`` (run per dataset; KeAD = ``KeadSettings()`` of commit 5c4979b: cnn_fewshot,
320 px squashed input, layers (2, 3, 4), 40x40 maps, k=4 ``auto`` references left out). Images: demo
46+44+46 (the mean of its three sources is one dataset), magnetic tile 1,340 (all; 388 with defects),
NEU-DET 1,795 (all; references left out). Random = same number and sizes of boxes placed at random.

    threshold/split/binarisation   demo R  P      MT R   P      NEU R  P      mean R  worst R  mean P
    paper/map_max/rethr0.5 (dflt)  0.163  0.251  0.158  0.034  0.146  0.162  0.156   0.146    0.149
    paper/gmm/rethr0.5             0.155  0.288  0.158  0.045  0.142  0.184  0.152   0.142    0.172
    paper/otsu/rethr0.5            0.163  0.285  0.158  0.045  0.113  0.202  0.145   0.113    0.177
    paper/quantile0.5/rethr0.5     0.150  0.285  0.158  0.045  0.113  0.202  0.140   0.113    0.177
    paper/map_max/single (paper)   0.133  0.229  0.145  0.032  0.079  0.122  0.119   0.079    0.128
    paper/quantile0.5/single (old) 0.119  0.261  0.145  0.043  0.048  0.133  0.104   0.048    0.146
    paper/otsu/hyst0.5             0.074  0.162  0.143  0.057  0.048  0.156  0.088   0.048    0.125
    mad2/otsu/hyst0.5              0.064  0.174  0.145  0.139  0.023  0.354  0.077   0.023    0.222
    mad2/otsu/single               0.093  0.203  0.113  0.100  0.016  0.172  0.074   0.016    0.158
    mad3/otsu/single               0.044  0.177  0.121  0.260  0.000  -      0.055   0.000    -
    random boxes, default's sizes  -      -      0.063  -      0.089  -

Read: the per-component re-threshold is the one change that helps everywhere (MT box area / GT area
2.05 -> 2.01 median, demo billet recall 0.02 -> 0.11, NEU 0.08 -> 0.15: NEU components split into
several peaked boxes). Hysteresis grows boxes 5-15x the GT size and loses recall. ``normal_mad`` raises
precision on MT (0.03 -> 0.26 at k=3) but starves NEU-DET (100 % defective: the "normal" half is
defective too, so T_c lands above most peaks) and the normalised demo maps. Otsu and the Gaussian mixture
fell back to the 0.5 quantile on MT (no two-class structure in its scores: separability < 0.75, or no
posterior crossing), the mixture flagged 64 % of NEU-DET; ``map_max`` flags 75-80 % of MT and NEU. The
rethreshold fraction 0.3 / 0.5 / 0.7, recall@0.3: NEU-DET (default) 0.128 / 0.146 / 0.116; MT and demo
(measured around paper/otsu/rethreshold, whose split fell back to the 0.5 quantile on MT) 0.160 / 0.158 /
0.134 and 0.133 / 0.163 / 0.188; mean 0.140 / 0.156 / 0.146, worst 0.128 / 0.146 / 0.116: 0.5 kept. min_area 0.2 % / 0.5 % and top_k 3 / 5: recall unchanged
on demo and MT (0.158), precision +0.01 at most (MT 0.049 / top_k 3 0.053), so those defaults stay.
The issue's goals are not met with these maps: MT recall 0.16 at precision 0.03 (goal 0.40 at 0.30),
NEU-DET 0.146 vs 0.089 random (1.6x, goal 3x). The limit is the maps (MT pixel AUROC ~0.73), not the
box rules; re-measure when the KeAD defaults change (kead/ commit 4e4d2bf changed layers and input).

Image split (older table, benchmarks/box_quality.py at 224 px, balanced accuracy of the split): quantile
0.5 had the best worst case among fixed/quantile rules (demo 0.77-0.88, MT 0.66); a known prevalence is
best encoded as ``image_split: quantile`` with ``image_score_quantile`` = 1 - prevalence.
"""
