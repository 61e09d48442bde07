"""AGSSP: anomaly-guided self-supervised pretraining for industrial surface defect detection.

The library is importable and testable without Dagster; ``assets/`` and ``jobs/`` only wire it.
"""

from agssp_pipeline.env import configure_offline, quiet_known_warnings

configure_offline()
quiet_known_warnings()

__version__ = "0.1.0"
