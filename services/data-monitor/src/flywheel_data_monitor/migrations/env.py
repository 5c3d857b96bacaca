from flywheel_data_monitor.adapters.tables import metadata
from flywheel_runtime.migrations import run_env

run_env(metadata)
