"""Adapters implementing the data monitor's ports: PostgreSQL tables and S3 snapshots."""
