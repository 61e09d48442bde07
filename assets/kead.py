"""Dagster assets: kead (wiring only; the work lives in agssp_pipeline)."""
