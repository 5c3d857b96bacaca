"""Adapters of the labeling ports: PostgreSQL, S3 and http(s)."""
