"""Flywheel's rollout: canaries each validated version on live traffic, then promotes it or
rolls it back."""
