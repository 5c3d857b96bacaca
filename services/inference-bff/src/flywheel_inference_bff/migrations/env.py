from flywheel_inference_bff.adapters.tables import metadata
from flywheel_runtime.migrations import run_env

run_env(metadata)
