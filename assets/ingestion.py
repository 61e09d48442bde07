"""Dagster assets: ingestion (wiring only; the work lives in agssp_pipeline)."""
