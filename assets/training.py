"""Dagster assets: training (wiring only; the work lives in agssp_pipeline)."""
