"""Flywheel labeling: labels from labeling tools become images in S3, label rows, immutable
dataset snapshots and labels.saved events."""
