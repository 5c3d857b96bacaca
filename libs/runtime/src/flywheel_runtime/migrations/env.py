from flywheel_runtime.migrations import run_env
from flywheel_runtime.outbox import runtime_metadata

run_env(runtime_metadata)
