import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from flywheel_trainer_dispatch.settings import TrainerDispatchSettings


def test_settings_read_their_own_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_TRAINER_DISPATCH_MAX_CONCURRENT_RUNS", "3")
    monkeypatch.setenv("FLYWHEEL_TRAINER_DISPATCH_NPROC_PER_NODE", "2")
    monkeypatch.setenv("FLYWHEEL_TRAINER_DISPATCH_RUNS_DIR", "scratch/runs")
    monkeypatch.setenv("FLYWHEEL_TRAINER_DISPATCH_TIMEOUT_S", "90")
    monkeypatch.setenv("FLYWHEEL_MLFLOW_URI", "http://mlflow:5000")

    settings = TrainerDispatchSettings()

    assert settings.max_concurrent_runs == 3
    assert settings.nproc_per_node == 2
    assert settings.runs_dir == Path("scratch/runs")
    assert settings.timeout_s == 90
    assert settings.platform.mlflow_uri == "http://mlflow:5000"
    assert settings.db_schema == "trainer_dispatch"
    assert settings.backend == "local"
    assert settings.auth is None
    assert settings.instance_id == ""
    assert settings.owner() == socket.gethostname()


def test_the_registered_model_is_named_after_the_model_line() -> None:
    assert TrainerDispatchSettings().registered_model("digits", "digits-clf") == "digits-clf"
    named = TrainerDispatchSettings(registered_model_name="{project_id}.{model_line}")
    assert named.registered_model("digits", "digits-clf") == "digits.digits-clf"


def test_a_registered_model_template_with_unknown_fields_is_refused() -> None:
    with pytest.raises(ValidationError, match="registered_model_name"):
        TrainerDispatchSettings(registered_model_name="{team}-{model_line}")


def test_settings_refuse_an_unknown_backend() -> None:
    with pytest.raises(ValidationError, match="backend"):
        TrainerDispatchSettings.model_validate({"backend": "slurm"})


def test_the_kubernetes_backend_reads_its_nested_block(monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = "FLYWHEEL_TRAINER_DISPATCH_"
    monkeypatch.setenv(f"{prefix}BACKEND", "kubernetes")
    monkeypatch.setenv(f"{prefix}KUBERNETES__NAMESPACE", "ml")
    monkeypatch.setenv(f"{prefix}KUBERNETES__QUEUE_NAME", "retrains")
    monkeypatch.setenv(f"{prefix}KUBERNETES__WORKERS", "4")
    monkeypatch.setenv(f"{prefix}KUBERNETES__GPU__MODE", "mig")
    monkeypatch.setenv(f"{prefix}KUBERNETES__GPU__MIG_PROFILE", "2g.20gb")
    monkeypatch.setenv(f"{prefix}KUBERNETES__CONNECTION__MODE", "in_cluster")
    monkeypatch.setenv(f"{prefix}KUBERNETES__SECRETS__S3_SECRET", "s3-creds")
    monkeypatch.setenv(f"{prefix}KUBERNETES__PLACEMENT__MANUAL__BURSTABLE", "true")
    monkeypatch.setenv(
        f"{prefix}KUBERNETES__CLUSTERS",
        '[{"name": "onprem", "slots": 4, "flavors": [{"name": "a100", "cost": "low"}]},'
        ' {"name": "cloud", "pool": "public", "connection": {"context": "gke"},'
        ' "flavors": [{"name": "l4", "cost": "standard", "node_labels": {"gpu": "l4"}}]}]',
    )

    settings = TrainerDispatchSettings()

    kube = settings.kubernetes
    assert settings.backend == "kubernetes"
    assert (kube.namespace, kube.queue_name, kube.workers) == ("ml", "retrains", 4)
    assert kube.gpu.resource() == "nvidia.com/mig-2g.20gb"
    assert kube.connection.mode == "in_cluster"
    assert kube.secrets.s3_secret == "s3-creds"
    assert kube.secrets.s3_access_key_key == "s3-access-key"
    assert kube.placement.manual.burstable
    assert kube.placement.manual.budget == "low"
    assert kube.placement.drift.deadline_s == 7200
    clusters = kube.resolved_clusters()
    assert [c.name for c in clusters] == ["onprem", "cloud"]
    assert clusters[1].pool == "public"
    assert clusters[1].connection.context == "gke"
    assert clusters[1].flavors[0].node_labels == {"gpu": "l4"}


def test_without_clusters_the_backend_uses_one_private_cluster() -> None:
    (cluster,) = TrainerDispatchSettings().kubernetes.resolved_clusters()

    assert (cluster.name, cluster.pool) == ("default", "private")
    assert [f.name for f in cluster.flavors] == ["default"]


def test_cluster_names_must_be_unique() -> None:
    with pytest.raises(ValidationError, match="unique"):
        TrainerDispatchSettings.model_validate(
            {"kubernetes": {"clusters": [{"name": "a"}, {"name": "a"}]}}
        )


def test_a_mig_profile_must_look_like_one() -> None:
    with pytest.raises(ValidationError, match="mig_profile"):
        TrainerDispatchSettings.model_validate({"kubernetes": {"gpu": {"mig_profile": "big"}}})


def test_a_model_line_names_its_entry_point_and_hyperparameters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "FLYWHEEL_TRAINER_DISPATCH_MODEL_LINES__shapes__ENTRY_POINT", "examples/train.py"
    )
    monkeypatch.setenv(
        "FLYWHEEL_TRAINER_DISPATCH_MODEL_LINES__shapes__HYPERPARAMETERS", '{"epochs": 1}'
    )
    monkeypatch.setenv("FLYWHEEL_TRAINER_DISPATCH_HYPERPARAMETERS", '{"dropout": 0.2}')

    settings = TrainerDispatchSettings()

    assert settings.entry_point == "flywheel_vision.reference:train"
    assert settings.hyperparameters == {"dropout": 0.2}
    line = settings.model_lines["shapes"]
    assert (line.entry_point, line.hyperparameters, line.nproc_per_node) == (
        "examples/train.py",
        {"epochs": 1},
        None,
    )
    with pytest.raises(ValueError, match="entry point is empty"):
        TrainerDispatchSettings(entry_point=" ")
