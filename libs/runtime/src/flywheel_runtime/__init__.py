"""Shared runtime for Flywheel services: everything a service needs that is not its domain."""
