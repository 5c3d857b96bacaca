"""Adapters implementing the trainer dispatch's ports: PostgreSQL tables and the local backend."""
