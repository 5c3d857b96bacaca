"""Flywheel's validator: gates every trained model against the champion on held-out data."""
