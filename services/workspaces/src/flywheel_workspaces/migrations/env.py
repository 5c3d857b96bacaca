from flywheel_runtime.migrations import run_env
from flywheel_workspaces.adapters.tables import metadata

run_env(metadata)
