"""AGSSP: anomaly-guided self-supervised pretraining for industrial surface defect detection.

The library is importable and testable without Dagster; ``assets/`` and ``jobs/`` only wire it.
"""

from agssp_pipeline.env import configure_offline

configure_offline()

__version__ = "0.1.0"
