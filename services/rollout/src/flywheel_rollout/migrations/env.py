from flywheel_rollout.adapters.tables import metadata
from flywheel_runtime.migrations import run_env

run_env(metadata)
