"""Adapters: the PostgreSQL store and the environment backends (local, kubernetes)."""
