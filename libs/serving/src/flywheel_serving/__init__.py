"""Serving: Triton model repositories built from registered versions, and Triton itself."""
