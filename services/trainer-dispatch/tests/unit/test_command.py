import json
import uuid
from pathlib import Path

from pydantic import SecretStr

from flywheel_runtime.settings import PlatformSettings
from flywheel_trainer_dispatch.adapters.local import (
    TrainingOptions,
    build_command,
    default_threads,
    training_env,
)
from flywheel_trainer_dispatch.ports import RunSpec
from flywheel_trainer_dispatch.settings import LineTraining

RUN_ID = uuid.UUID("00000000-0000-4000-8000-0000000000aa")
CORRELATION_ID = uuid.UUID("00000000-0000-4000-8000-0000000000cc")
SPEC = RunSpec(
    run_id=RUN_ID,
    project_id="digits",
    model_line="digits-classifier",
    snapshot_id="snap-1",
    registered_model="digits-classifier",
    correlation_id=CORRELATION_ID,
)
RESULT = Path("runs") / str(RUN_ID) / "result.json"


def _arguments(command: list[str]) -> dict[str, str]:
    flags = command[command.index("flywheel_vision.train") + 1 :]
    return dict(zip(flags[::2], flags[1::2], strict=False))


def test_one_process_runs_the_entry_point_with_python() -> None:
    options = TrainingOptions(epochs=2, batch_size=32, lr=0.01, threads_per_process=2)

    command = build_command(SPEC, options, python="python3", result_file=RESULT)

    assert command[:3] == ["python3", "-m", "flywheel_vision.train"]
    arguments = _arguments(command)
    assert arguments["--training-run-id"] == str(RUN_ID)
    assert arguments["--correlation-id"] == str(CORRELATION_ID)
    assert arguments["--model-name"] == "digits-classifier"
    assert arguments["--snapshot-id"] == "snap-1"
    assert arguments["--project-id"] == "digits"
    assert (arguments["--epochs"], arguments["--batch-size"], arguments["--lr"]) == (
        "2",
        "32",
        "0.01",
    )
    assert arguments["--threads"] == "2"
    assert arguments["--result-file"] == str(RESULT)
    assert arguments["--base-alias"] == "champion"
    assert "--exclude-labels-file" not in command


def test_several_processes_run_under_torchrun_standalone() -> None:
    options = TrainingOptions(nproc_per_node=2, threads_per_process=1)

    command = build_command(SPEC, options, python="python3", result_file=RESULT)

    assert command[:7] == [
        "python3",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "flywheel_vision.train",
    ]
    assert _arguments(command)["--training-run-id"] == str(RUN_ID)


def test_excluded_labels_and_no_base_reach_the_command() -> None:
    excluded = Path("runs") / "excluded-labels.json"

    command = build_command(
        SPEC,
        TrainingOptions(base_alias=None),
        python="python3",
        result_file=RESULT,
        excluded_file=excluded,
    )

    assert "--no-base" in command
    assert "--base-alias" not in command
    assert command[command.index("--exclude-labels-file") + 1] == str(excluded)


def test_secrets_travel_in_the_environment_never_on_the_command_line() -> None:
    platform = PlatformSettings(
        s3_endpoint="s3.local:9000",
        s3_access_key=SecretStr("access-key-1"),
        s3_secret_key=SecretStr("secret-key-1"),
        mlflow_uri="http://mlflow.local:5000",
        database_url=SecretStr("postgresql+asyncpg://user:db-password@db/flywheel"),
        rabbit_url=SecretStr("amqp://user:rabbit-password@rabbit/"),
    )
    options = TrainingOptions(threads_per_process=3)
    inherited = {
        "PATH": "/usr/bin",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "FLYWHEEL_DATABASE_URL": "postgresql+asyncpg://user:db-password@db/flywheel",
        "FLYWHEEL_RABBIT_URL": "amqp://user:rabbit-password@rabbit/",
        "FLYWHEEL_TRAINER_DISPATCH_AUTH__DEV_SIGNING_KEY": "pem",
        "FLYWHEEL_GIT_SHA": "abc123",
        "RANK": "3",
        "MASTER_PORT": "29500",
    }

    env = training_env(platform, options, inherited)
    command = build_command(SPEC, options, python="python3", result_file=RESULT)

    assert env["FLYWHEEL_S3_ENDPOINT"] == "s3.local:9000"
    assert env["FLYWHEEL_S3_ACCESS_KEY"] == "access-key-1"
    assert env["FLYWHEEL_S3_SECRET_KEY"] == "secret-key-1"
    assert env["FLYWHEEL_MLFLOW_URI"] == "http://mlflow.local:5000"
    assert env["OMP_NUM_THREADS"] == "3"
    assert env["PATH"] == "/usr/bin"
    assert env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert env["FLYWHEEL_GIT_SHA"] == "abc123"
    for leaked in (
        "FLYWHEEL_DATABASE_URL",
        "FLYWHEEL_RABBIT_URL",
        "FLYWHEEL_TRAINER_DISPATCH_AUTH__DEV_SIGNING_KEY",
        "RANK",
        "MASTER_PORT",
    ):
        assert leaked not in env
    joined = " ".join(command)
    for secret in ("access-key-1", "secret-key-1", "db-password", "rabbit-password"):
        assert secret not in joined


def test_default_threads_share_the_cpus_between_processes() -> None:
    assert default_threads(1, cpus=8) == 8
    assert default_threads(2, cpus=8) == 4
    assert default_threads(4, cpus=2) == 1


def test_the_line_s_entry_point_and_hyperparameters_reach_the_command(tmp_path: Path) -> None:
    options = TrainingOptions(
        hyperparameters={"dropout": 0.1, "width": 8},
        model_lines={
            "digits-classifier": LineTraining(
                entry_point="examples/train.py", hyperparameters={"width": 16}, nproc_per_node=2
            ),
            "other": LineTraining(entry_point="other.pkg:train"),
        },
    )

    command = build_command(SPEC, options, python="python3", result_file=RESULT, cwd=tmp_path)
    in_image = build_command(SPEC, options, python="python3", result_file=RESULT)

    arguments = _arguments(command)
    assert arguments["--entry-point"] == str(tmp_path / "examples" / "train.py")
    assert arguments["--model-line"] == "digits-classifier"
    assert json.loads(arguments["--hyperparameters"]) == {"dropout": 0.1, "width": 16}
    assert "--nproc_per_node=2" in command
    assert _arguments(in_image)["--entry-point"] == "examples/train.py"


def test_a_run_s_own_request_wins_over_its_line() -> None:
    options = TrainingOptions(
        nproc_per_node=1,
        threads_per_process=4,
        model_lines={"digits-classifier": LineTraining(entry_point="line.pkg:train")},
    )
    spec = SPEC.model_copy(
        update={
            "entry_point": "mine.pkg:train",
            "hyperparameters": {"epochs": 1},
            "nproc_per_node": 2,
        }
    )

    resolved = options.for_run(spec)
    command = build_command(spec, options, python="python3", result_file=RESULT)

    assert (resolved.entry_point, resolved.nproc_per_node) == ("mine.pkg:train", 2)
    assert resolved.threads_per_process == 2  # the same CPUs, shared by two processes
    assert _arguments(command)["--entry-point"] == "mine.pkg:train"
    assert json.loads(_arguments(command)["--hyperparameters"]) == {"epochs": 1}
    assert (
        TrainingOptions(threads_per_process=4, threads_configured=True)
        .for_run(spec)
        .threads_per_process
        == 4
    )


def test_without_a_line_of_its_own_a_run_trains_the_reference() -> None:
    command = build_command(SPEC, TrainingOptions(), python="python3", result_file=RESULT)

    assert _arguments(command)["--entry-point"] == "flywheel_vision.reference:train"
    assert "--hyperparameters" not in command
