"""Dagster assets: boxes (wiring only; the work lives in agssp_pipeline)."""
