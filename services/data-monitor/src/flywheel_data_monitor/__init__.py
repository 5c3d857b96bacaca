"""Flywheel's data monitor: counts labels per project, checks their quality, decides retrains."""
