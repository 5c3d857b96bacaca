from flywheel_runtime.migrations import run_env
from flywheel_validator.adapters.tables import metadata

run_env(metadata)
