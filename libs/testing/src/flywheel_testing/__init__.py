"""Pytest plugin and helpers that start the real servers Flywheel talks to."""
