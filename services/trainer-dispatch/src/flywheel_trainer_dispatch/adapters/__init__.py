"""Adapters implementing the trainer dispatch's ports: PostgreSQL tables, the local backend and
the Kubernetes backend (with its manifests and the MLflow lookup of results)."""
