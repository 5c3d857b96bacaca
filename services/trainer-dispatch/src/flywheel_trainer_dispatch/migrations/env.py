from flywheel_runtime.migrations import run_env
from flywheel_trainer_dispatch.adapters.tables import metadata

run_env(metadata)
