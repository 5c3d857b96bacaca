"""Adapters implementing the validator's ports: PostgreSQL, S3 test splits, onnxruntime."""
