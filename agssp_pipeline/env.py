"""Offline-first process settings.

The pipeline runs in plants without internet. Importing the package sets conservative defaults
(``setdefault``: a user who is online can override them in the environment) so that nothing waits on
a model hub or downloads fonts and packages at run time.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "0",
    "YOLO_VERBOSE": "False",
    "DAGSTER_DISABLE_TELEMETRY": "1",  # air-gapped plants: never try to upload usage statistics
}

# Dagster preview/beta features the project uses on purpose (message start, as Dagster words it). Dagster warns
# about each at every import; the project's own warnings and any other Dagster warning still show.
KNOWN_DAGSTER_FEATURES = (
    r"Specifying a partitions_def on an AssetCheckSpec is currently in preview",  # per-source asset checks
    r"Function `observable_source_asset` is currently in beta",  # plant folder fingerprints
    r"Parameter `backfill_policy` of function `asset` is currently in beta",  # single-run anomaly maps
    r"Parameter `include_sources` of function `AssetSelection.all` is currently in beta",  # `not` in --select
)


def yolo_config_dir() -> Path:
    return Path(os.environ.get("AGSSP_CACHE_DIR", Path.home() / ".cache" / "agssp")) / "ultralytics"


def _ensure_ultralytics_font(config_dir: Path) -> None:
    """ultralytics downloads Arial.ttf on first plot; ship any local TTF in its place."""
    target = config_dir / "Ultralytics" / "Arial.ttf"
    if target.exists():
        return
    try:
        import matplotlib

        source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    except Exception:  # matplotlib missing: plotting stays off anyway
        return
    if source.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        for name in ("Arial.ttf", "Arial.Unicode.ttf"):
            shutil.copyfile(source, target.parent / name)


def configure_offline() -> None:
    """Apply offline defaults; idempotent and cheap (no network, no heavy imports)."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if "YOLO_CONFIG_DIR" not in os.environ:
        config_dir = yolo_config_dir()
        try:
            config_dir.mkdir(parents=True, exist_ok=True)
        except OSError:
            return
        os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    _ensure_ultralytics_font(Path(os.environ["YOLO_CONFIG_DIR"]))


def quiet_known_warnings() -> None:
    """Hide Dagster's preview/beta warnings for the features listed in KNOWN_DAGSTER_FEATURES only.

    Filtered by message and by the warning's module (``dagster.*``), not by a blanket ignore: a new preview
    feature, a deprecation or any warning of this project or of torch/ultralytics is still shown.
    """
    for message in KNOWN_DAGSTER_FEATURES:
        warnings.filterwarnings("ignore", message=message, module=r"dagster(\.|$)")
