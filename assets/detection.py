"""Dagster assets: detection (wiring only; the work lives in agssp_pipeline)."""
