"""Adapters to MLflow, v2 inference servers and Kubernetes; filled in as services need them."""
