import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from flywheel_runtime.settings import PlatformSettings, env_reference
from flywheel_runtime.storage import PLATFORM_BUCKETS

from .conftest import provision

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
COMPOSE_ENV_EXAMPLE = ROOT / "deploy" / "compose" / "compose.env.example"

APP = {
    "labeling",
    "data-monitor",
    "trainer-dispatch",
    "validator",
    "rollout",
    "inference-bff",
    "log-worker",
    "workspaces",
}
INFRA = {"rabbitmq", "postgres", "minio", "minio-init", "model-repository-init", "mlflow"}
INFRA |= {"triton", "redis", "rabbitmq-provision"}
OBS = {"otel-collector"}
REQUIRED_SECRETS = {
    "RABBITMQ_PASSWORD",
    "POSTGRES_PASSWORD",
    "MINIO_ROOT_PASSWORD",
    "FLYWHEEL_COMPOSE_DEV_SIGNING_KEY",
} | {provision.password_env(service) for service in provision.load_access()}
TMP = "/tmp"  # noqa: S108 - the tmpfs mount the containers get
ANY_INTERFACE = "0.0.0.0"  # noqa: S104 - what a server in a container listens on
# The combinations the compose file's header documents.
ACTIVATIONS = [{"infra"}, {"infra", "app"}, {"infra", "app", "obs"}, {"obs"}]

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])((?:[^{}]|\{[^{}]*\})*))?\}")


class MissingVariableError(Exception):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation of every string in the file (``$$`` is a literal ``$``)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2), match.group(3) or ""
        present = name in env
        filled = present and env[name] != ""
        if operator is None:
            return env.get(name, "")
        if operator in (":-", "-"):
            use_default = not filled if operator == ":-" else not present
            return interpolate(argument, env) if use_default else env[name]
        if operator in (":?", "?"):
            if (operator == ":?" and not filled) or (operator == "?" and not present):
                raise MissingVariableError(f"{name}: {argument}")
            return env[name]
        take = filled if operator == ":+" else present
        return interpolate(argument, env) if take else ""

    parts = value.split("$$")
    return "$".join(_VARIABLE.sub(substitute, part) for part in parts)


def read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            env[key.strip()] = value
    return env


def documented(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        match = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=", line)
        if match:
            names.add(match.group(1))
    return names


def raw() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def example_env() -> dict[str, str]:
    """What a user's .env holds after following the header, with the secrets filled in."""
    env = read_env_file(ENV_EXAMPLE) | read_env_file(COMPOSE_ENV_EXAMPLE)
    return env | {name: f"test-{name.lower()}" for name in REQUIRED_SECRETS}


def resolved() -> dict[str, Any]:
    result: dict[str, Any] = interpolate(raw(), example_env())
    return result


def services() -> dict[str, Any]:
    result: dict[str, Any] = resolved()["services"]
    return result


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def test_compose_file_matches_the_compose_specification():
    vendor = pytest.importorskip(
        "check_jsonschema.builtin_schemas.vendor",
        reason="the Compose specification schema ships in the check-jsonschema package",
    )
    schema = json.loads(resources.files(vendor).joinpath("compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)

    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(raw())]
    assert errors == []
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(resolved())]
    assert errors == []


def test_each_service_belongs_to_one_documented_profile():
    by_profile: dict[str, set[str]] = {"infra": set(), "app": set(), "obs": set()}
    for name, service in services().items():
        profiles = service.get("profiles", [])
        assert len(profiles) == 1, f"{name}: {profiles}"
        by_profile[profiles[0]].add(name)

    assert by_profile == {"infra": INFRA, "app": APP, "obs": OBS}


@pytest.mark.parametrize("active", ACTIVATIONS, ids=lambda a: "+".join(sorted(a)))
def test_depends_on_targets_exist_and_start_with_their_dependents(active):
    everything = services()
    started = {
        n for n, s in everything.items() if not s.get("profiles") or active & set(s["profiles"])
    }

    for name in started:
        for target in everything[name].get("depends_on", {}):
            assert target in everything, f"{name} depends on {target}, which is not defined"
            assert target in started, f"{name} needs {target}, not started by {sorted(active)}"


def test_depends_on_conditions_can_be_met():
    everything = services()
    for name, service in everything.items():
        for target, spec in service.get("depends_on", {}).items():
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in everything[target], f"{name} waits on {target}'s health"
            elif condition == "service_completed_successfully":
                assert everything[target].get("restart") == "no", f"{target} must be one-shot"
            else:
                assert condition == "service_started"


def test_app_services_are_healthchecked_and_hardened():
    for name in APP:
        service = services()[name]
        test = " ".join(service["healthcheck"]["test"])

        assert "http://127.0.0.1:8080/healthz" in test, name
        assert service["read_only"] is True, name
        assert service["tmpfs"] == [TMP], name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        for target in ("rabbitmq", "postgres", "minio-init"):
            assert target in service["depends_on"], f"{name} starts before {target}"


def test_app_images_are_built_from_the_service_dockerfiles(catalog):
    for name in APP:
        build = services()[name]["build"]
        dockerfile = ROOT / build["dockerfile"]

        assert build["context"] == "."
        assert dockerfile == catalog[name].dockerfile
        assert dockerfile.is_file()
    assert services()["log-worker"]["command"] == [
        "python",
        "-m",
        "flywheel_inference_bff.logworker",
    ]
    assert services()["log-worker"]["image"] == services()["inference-bff"]["image"]


def test_every_referenced_variable_is_documented():
    names = set(_VARIABLE.findall(COMPOSE.read_text()))
    referenced = {name for name, _, _ in names}
    known = documented(ENV_EXAMPLE) | documented(COMPOSE_ENV_EXAMPLE)

    assert sorted(referenced - known) == []


def test_required_secrets_fail_fast_and_ship_empty():
    required = {
        name for name, operator, _ in _VARIABLE.findall(COMPOSE.read_text()) if "?" in operator
    }
    example = read_env_file(COMPOSE_ENV_EXAMPLE)

    assert required == REQUIRED_SECRETS
    for name in REQUIRED_SECRETS:
        assert example[name] == "", f"{name} has a default value in the example"
        env = example_env()
        del env[name]
        with pytest.raises(MissingVariableError, match=name):
            interpolate(raw(), env)


def test_secret_like_values_are_never_written_in_the_file():
    secret = re.compile(r"PASSWORD|SECRET|SIGNING_KEY|ACCESS_KEY|INGESTION_KEY")
    for name, service in raw()["services"].items():
        for key, value in environment(service).items():
            if secret.search(key) and value:
                assert "${" in value, f"{name}: {key} is set to a literal"


def test_infra_servers_are_configured_as_the_design_says():
    s = services()
    triton = s["triton"]["command"]
    mlflow = s["mlflow"]["command"]
    buckets = s["minio-init"]["command"][0]

    assert s["rabbitmq"]["image"].split(":")[1].endswith("-management")
    assert s["triton"]["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert "--model-repository=s3://minio:9000/flywheel-models/triton" in triton
    assert "--model-control-mode=explicit" in triton
    assert "--strict-readiness=false" in triton
    assert any(arg.startswith("--backend-store-uri=postgresql+psycopg2://") for arg in mlflow)
    assert "--artifacts-destination=s3://flywheel-models/mlflow" in mlflow
    assert s["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    for bucket in PLATFORM_BUCKETS:
        assert f"local/{bucket}" in buckets
    assert Path(ROOT / "deploy/otel/collector.yaml").is_file()
    assert (
        "./deploy/otel/collector.yaml:/etc/otelcol/config.yaml:ro" in s["otel-collector"]["volumes"]
    )


def test_rollout_and_triton_share_the_model_repository():
    s = services()
    rollout_env = environment(s["rollout"])
    folder = rollout_env["FLYWHEEL_ROLLOUT_REPOSITORY_DIR"]

    assert f"model-repository:{folder}" in s["rollout"]["volumes"]
    assert f"model-repository:{folder}:ro" in s["triton"]["volumes"]
    assert f"--model-repository={folder}" in s["triton"]["command"]


def test_collector_scrapes_every_app_service():
    config = yaml.safe_load((ROOT / "deploy/otel/collector.yaml").read_text())
    jobs = config["receivers"]["prometheus"]["config"]["scrape_configs"]
    targets = {t for job in jobs for group in job["static_configs"] for t in group["targets"]}
    pipelines = config["service"]["pipelines"]

    assert {f"{name}:8080" for name in APP} <= targets
    assert {"rabbitmq:15692", "triton:8002"} <= targets
    assert all(p["exporters"] == ["otlp/signoz"] for p in pipelines.values())


@pytest.mark.parametrize("name", sorted(APP))
def test_app_container_environment_builds_the_service_settings(
    name,
    catalog,
    dockerfile,
    image_env,
    read_settings_env,
    platform_local_defaults,
    settings_from,
    check_auth,
):
    deployable = catalog[name]
    compose_env = environment(services()[name])
    env = image_env(dockerfile(deployable.dockerfile)) | compose_env
    reads = read_settings_env(deployable.settings_class())

    unknown = sorted(v for v in compose_env if v.startswith("FLYWHEEL_") and not reads.reads(v))
    assert unknown == [], f"{name} does not read {unknown}"
    defaults = {
        variable: default
        for cls in (deployable.settings_class(), PlatformSettings)
        for variable, default, _ in env_reference(cls)
    }
    empty = sorted(v for v, value in env.items() if value == "" and defaults.get(v, "x") != "")
    assert empty == [], f"{name}: empty values replace non-empty defaults: {empty}"
    assert sorted(platform_local_defaults - set(compose_env)) == [], "defaults point at localhost"
    settings = settings_from(deployable, env)
    assert check_auth(settings) == []
    assert settings.http_host == ANY_INTERFACE
    assert settings.http_port == 8080
