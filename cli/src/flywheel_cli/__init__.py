"""The ``flywheel`` command: the local stack, its status, rollout actions and the demo."""
