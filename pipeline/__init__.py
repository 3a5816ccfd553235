"""Batch image inference: object storage -> Ray Data -> CNN actor pool -> Parquet."""
