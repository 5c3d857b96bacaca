"""Flywheel workspaces: isolated GPU development environments for ML engineers."""
