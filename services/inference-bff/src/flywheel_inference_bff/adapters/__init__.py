"""Adapters implementing the BFF's ports: Triton, Redis, the broker, S3 and PostgreSQL."""
