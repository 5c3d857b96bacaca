"""Adapters implementing the rollout's ports: PostgreSQL, Triton, the broker."""
