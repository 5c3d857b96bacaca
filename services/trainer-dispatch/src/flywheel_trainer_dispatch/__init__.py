"""Flywheel's trainer dispatch: queues retrains per model line and runs them on a backend."""
