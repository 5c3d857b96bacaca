import copy
import functools
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from flywheel_rollout.settings import RolloutSettings
from flywheel_runtime.settings import PlatformSettings, env_reference
from flywheel_serving.hpa import hpa_values
from flywheel_serving.tuning import GoldenPoint, LoadPoint, ServingConfig
from flywheel_testing.kube import (
    ManifestError,
    is_builtin,
    load_crd_schemas,
    require_crds,
    validate_manifests,
)
from flywheel_workspaces.adapters import k8s_manifests as workspace_manifests
from flywheel_workspaces.adapters.kubernetes import KubernetesBackend
from flywheel_workspaces.ports import AllocationMode, Workspace, WorkspaceSpec, WorkspaceState

from .conftest import provision

PROVISION_SCRIPT = Path(provision.__file__)

helm = pytest.importorskip("helm_python", reason="helm-python-sdk renders the chart offline")

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "flywheel"
ARGOCD = ROOT / "deploy" / "argocd" / "application.yaml"
NAMESPACE = "flywheel"
RELEASE = "flywheel"
SERVICES = {
    "labeling",
    "data-monitor",
    "trainer-dispatch",
    "validator",
    "rollout",
    "inference-bff",
    "log-worker",
    "workspaces",
}
EXPOSED = {"labeling", "inference-bff", "rollout", "workspaces"}
CLUSTER_SCOPED = {
    "ResourceFlavor",
    "ClusterQueue",
    "WorkloadPriorityClass",
    "PriorityClass",
    "Namespace",
}
DEV_NAMESPACE = "flywheel-dev"
KUBE_VERSIONS = ["1.29", "1.37"]
ANY_INTERFACE = "0.0.0.0"  # noqa: S104 - what a server in a container listens on


def _values(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART / name).read_text())
    return loaded


def _production() -> dict[str, Any]:
    return _values("values-production.yaml")


def _kserve() -> dict[str, Any]:
    values = _production()
    values["kserve"] = values.get("kserve", {}) | {"enabled": True}
    return values


VARIANTS = {"default": dict, "production": _production, "kserve": _kserve}


@functools.cache
def _render(variant: str) -> tuple[dict[str, Any], ...]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(VARIANTS[variant](), name=RELEASE, namespace=NAMESPACE)
    return tuple(d for text in rendered.values() for d in yaml.safe_load_all(text) if d)


@functools.cache
def _merged(variant: str) -> dict[str, Any]:
    with helm.Chart.load(CHART) as chart:
        merged: dict[str, Any] = chart.merge_values(VARIANTS[variant]())
    return merged


def docs(variant: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_render(variant)))


def of_kind(variant: str, kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs(variant) if d["kind"] == kind}


def component(name: str) -> str:
    return f"{RELEASE}-{name}"


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


variants = pytest.mark.parametrize("variant", list(VARIANTS))


# --- Rendering, lint, schema ------------------------------------------------------------------


@variants
def test_chart_renders_offline(variant):
    kinds = Counter(d["kind"] for d in docs(variant))

    assert kinds["Deployment"] >= len(SERVICES)
    assert "Secret" not in kinds, "secrets come from existingSecret, never from the chart"
    for d in docs(variant):
        if d["kind"] not in CLUSTER_SCOPED:
            assert d["metadata"].get("namespace"), f"{d['kind']}/{d['metadata']['name']}"


@pytest.mark.parametrize("values_file", ["values.yaml", "values-production.yaml"])
def test_chart_lints_clean(values_file):
    values = None if values_file == "values.yaml" else _values(values_file)
    report = helm.lint(CHART, values, strict=True, kube_version="v1.30.0")

    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


def test_values_files_pass_the_schema():
    with helm.Chart.load(CHART) as chart:
        assert chart.schema is not None
        chart.validate_schema(None)
        chart.validate_schema(_production())


@pytest.mark.parametrize(
    ("bad", "where"),
    [
        ({"services": {"labeling": {"replicas": 0}}}, "replicas"),
        ({"platform": {"logLevel": "LOUD"}}, "logLevel"),
        ({"platform": {"s3Endpoint": "http://minio:9000"}}, "s3Endpoint"),
        ({"services": {"labeling": {"envPrefix": "LABELING_"}}}, "envPrefix"),
        ({"services": {"labeling": {"config": {"max_batch_items": 5}}}}, "max_batch_items"),
        ({"containerSecurityContext": {"readOnlyRootFilesystem": False}}, "readOnlyRoot"),
        ({"podSecurityContext": {"runAsNonRoot": False}}, "runAsNonRoot"),
        ({"secrets": {"existingSecret": ""}}, "existingSecret"),
        ({"kserve": {"deploymentMode": "Knative"}}, "deploymentMode"),
        ({"services": {"labeling": {"podDisruptionBudget": {"enabled": "yes"}}}}, "enabled"),
        ({"unknownTopLevel": True}, "unknownTopLevel"),
        ({"triton": {"autoscaling": {"requestsPerSecondPerReplica": 0}}}, "requestsPerSecond"),
    ],
)
def test_values_schema_rejects_bad_values(bad, where):
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError, match=where):
        chart.render(bad, name=RELEASE, namespace=NAMESPACE)


def test_autoscaling_bounds_are_checked_at_render():
    bad = {"services": {"labeling": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}}}
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmError, match="minReplicas"):
        chart.render(bad, name=RELEASE, namespace=NAMESPACE)


def test_triton_scales_on_requests_per_second_derived_from_the_golden_point():
    golden = GoldenPoint(
        config=ServingConfig(max_batch_size=16, max_queue_delay_microseconds=500, instance_count=2),
        point=LoadPoint(
            concurrency=16,
            requests=2000,
            errors=0,
            throughput_rps=412.77,
            p50_ms=20.0,
            p95_ms=31.0,
            p99_ms=38.5,
        ),
        hardware="NVIDIA H100",
    )
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(hpa_values(golden, 0.7), name=RELEASE, namespace=NAMESPACE)
    manifests = [d for text in rendered.values() for d in yaml.safe_load_all(text) if d]
    hpas = {d["metadata"]["name"]: d for d in manifests if d["kind"] == "HorizontalPodAutoscaler"}

    cpu, requests = hpas[component("triton")]["spec"]["metrics"]
    assert cpu["resource"]["name"] == "cpu"
    assert requests == {
        "type": "Pods",
        "pods": {
            "metric": {"name": "triton_requests_per_second"},
            "target": {"type": "AverageValue", "averageValue": "288.9"},
        },
    }
    validate_manifests([hpas[component("triton")]], kube_version=KUBE_VERSIONS[-1])
    default = of_kind("default", "HorizontalPodAutoscaler")[component("triton")]
    assert [m["type"] for m in default["spec"]["metrics"]] == ["Resource"]


def test_the_validators_performance_gate_gets_a_triton_sidecar_on_the_folder_it_writes(
    catalog, dockerfile, image_env, settings_from
):
    values = {"services": {"validator": {"performanceGate": {"enabled": True}}}}
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    manifests = [d for text in rendered.values() for d in yaml.safe_load_all(text) if d]
    deployment = next(
        d
        for d in manifests
        if d["kind"] == "Deployment" and d["metadata"]["name"] == component("validator")
    )
    config = next(
        d["data"]
        for d in manifests
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == f"{component('validator')}-config"
    )
    pod = deployment["spec"]["template"]["spec"]
    service, sidecar = pod["containers"]
    deployable = catalog["validator"]
    env = image_env(dockerfile(deployable.dockerfile)) | config
    settings = settings_from(deployable, env)

    gate = settings.performance  # type: ignore[attr-defined]
    assert gate.enabled
    assert sidecar["name"] == "gate-triton"
    assert f"--model-repository={gate.repository_dir}" in sidecar["args"]
    assert "--model-control-mode=explicit" in sidecar["args"]
    assert gate.triton_url == f"127.0.0.1:{sidecar['ports'][0]['containerPort']}"
    mounts = {m["name"]: m["mountPath"] for m in service["volumeMounts"]}
    assert mounts["gate-models"] == str(gate.repository_dir)
    assert {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}["gate-models"] == str(
        gate.repository_dir
    )
    assert "gate-models" in {v["name"] for v in pod["volumes"]}
    validate_manifests([deployment], kube_version=KUBE_VERSIONS[-1])
    default = of_kind("default", "Deployment")[component("validator")]["spec"]["template"]
    assert [c["name"] for c in default["spec"]["containers"]] == ["validator"]
    default_config = of_kind("default", "ConfigMap")[f"{component('validator')}-config"]["data"]
    assert not any("PERFORMANCE__" in key for key in default_config)


# --- Kubernetes schemas -----------------------------------------------------------------------


@variants
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_builtin_kinds_validate_strictly(variant, kube_version):
    builtins = [d for d in docs(variant) if is_builtin(d, kube_version)]

    assert len(builtins) > 40
    validate_manifests(builtins, kube_version=kube_version)


def _crds() -> Path:
    return require_crds()


@variants
def test_custom_resources_validate_against_their_crds(variant):
    crds = load_crd_schemas(_crds())
    custom = [d for d in docs(variant) if not is_builtin(d)]

    assert {d["kind"] for d in custom} >= {
        "AuthorizationPolicy",
        "PeerAuthentication",
        "RequestAuthentication",
        "VirtualService",
        "ServiceMonitor",
        "ResourceFlavor",
        "ClusterQueue",
        "LocalQueue",
        "WorkloadPriorityClass",
    }
    validate_manifests(custom, crds=crds)


def test_argocd_application_points_at_the_chart():
    application = yaml.safe_load(ARGOCD.read_text())
    source = application["spec"]["source"]

    assert (ROOT / source["path"]) == CHART
    for values_file in source["helm"]["valueFiles"]:
        assert (CHART / values_file).is_file()
    assert application["spec"]["destination"]["namespace"] == NAMESPACE


def test_argocd_application_validates_against_its_crd():
    validate_manifests([yaml.safe_load(ARGOCD.read_text())], crds=load_crd_schemas(_crds()))


def test_validator_catches_a_broken_deployment():
    deployment = next(d for d in docs("default") if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}

    with pytest.raises(ManifestError, match="livenessprobe"):
        validate_manifests([deployment], kube_version="1.30")


def test_validator_catches_a_broken_policy():
    policy = next(d for d in docs("default") if d["kind"] == "AuthorizationPolicy")
    policy["spec"]["action"] = "PERMIT"

    with pytest.raises(ManifestError, match="PERMIT"):
        validate_manifests([policy], crds=load_crd_schemas(_crds()))


# --- Workloads ---------------------------------------------------------------------------------


@variants
def test_every_deployment_has_probes_resources_and_a_hardened_security_context(variant):
    for name, deployment in of_kind(variant, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in pod["containers"]:
            security = container["securityContext"]
            ports = {p["name"] for p in container["ports"]}
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["runAsNonRoot"] is True, name
            assert "ALL" in security["capabilities"]["drop"], name
            assert security["seccompProfile"]["type"] == "RuntimeDefault", name
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert container[probe]["httpGet"]["port"] in ports, f"{name} {probe}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), name
            assert not container["image"].endswith(":latest"), name


@variants
def test_services_probe_healthz_and_readyz(variant):
    deployments = of_kind(variant, "Deployment")
    for service in SERVICES:
        container = deployments[component(service)]["spec"]["template"]["spec"]["containers"][0]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]


@variants
def test_only_workloads_that_call_the_api_get_a_token(variant):
    bound = {
        s["name"]
        for binding in of_kind(variant, "RoleBinding").values()
        for s in binding["subjects"]
    }
    assert bound == {component("trainer-dispatch"), component("rollout"), component("workspaces")}
    for name, deployment in of_kind(variant, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is (pod["serviceAccountName"] in bound), name
    for account in of_kind(variant, "ServiceAccount").values():
        assert account["automountServiceAccountToken"] is False


@variants
def test_each_service_has_its_objects(variant):
    deployments = of_kind(variant, "Deployment")
    kinds = [
        "Service",
        "ServiceAccount",
        "PodDisruptionBudget",
        "ConfigMap",
        "AuthorizationPolicy",
        "NetworkPolicy",
        "ServiceMonitor",
    ]
    autoscaled = {
        name for name, svc in _merged(variant)["services"].items() if svc["autoscaling"]["enabled"]
    }
    hpas = of_kind(variant, "HorizontalPodAutoscaler")

    assert autoscaled >= SERVICES - {"rollout", "workspaces"}
    for service in SERVICES:
        name = component(service)
        pod_labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        objects = {kind: of_kind(variant, kind) for kind in kinds}
        assert matches(objects["Service"][name]["spec"]["selector"], pod_labels)
        assert name in objects["ServiceAccount"]
        assert deployments[name]["spec"]["template"]["spec"]["serviceAccountName"] == name
        pdb = objects["PodDisruptionBudget"][name]["spec"]
        assert matches(pdb["selector"]["matchLabels"], pod_labels)
        assert f"{name}-config" in objects["ConfigMap"]
        policy = objects["AuthorizationPolicy"][name]["spec"]
        assert matches(policy["selector"]["matchLabels"], pod_labels)
        netpol = objects["NetworkPolicy"][name]["spec"]
        assert matches(netpol["podSelector"]["matchLabels"], pod_labels)
        assert set(netpol["policyTypes"]) == {"Ingress", "Egress"}
        monitor = objects["ServiceMonitor"][name]["spec"]
        assert monitor["endpoints"][0]["path"] == "/metrics"
        assert monitor["endpoints"][0]["port"] == "http"
        if service in autoscaled:
            target = hpas[name]["spec"]["scaleTargetRef"]
            assert (target["kind"], target["name"]) == ("Deployment", name)
            assert "replicas" not in deployments[name]["spec"], "the HPA owns the replicas"
        else:
            assert name not in hpas


# --- Configuration -----------------------------------------------------------------------------


@variants
def test_service_environment_builds_each_service_settings(
    variant,
    catalog,
    dockerfile,
    image_env,
    read_settings_env,
    platform_local_defaults,
    settings_from,
    check_auth,
):
    config_maps = of_kind(variant, "ConfigMap")
    merged = _merged(variant)
    platform_vars = {v for v, _, _ in env_reference(PlatformSettings)}
    for service in SERVICES:
        deployable = catalog[service]
        container = of_kind(variant, "Deployment")[component(service)]["spec"]["template"]["spec"][
            "containers"
        ][0]
        env = image_env(dockerfile(deployable.dockerfile))
        chart_env: dict[str, str] = {}
        for source in container["envFrom"]:
            chart_env |= config_maps[source["configMapRef"]["name"]]["data"]
        for variable in container["env"]:
            reference = variable["valueFrom"]["secretKeyRef"]
            assert reference["name"] == merged["secrets"]["existingSecret"]
            if not reference.get("optional"):
                chart_env[variable["name"]] = f"secret-{reference['key']}"
        env |= chart_env
        reads = read_settings_env(deployable.settings_class())

        assert merged["services"][service]["envPrefix"] == deployable.env_prefix
        unknown = sorted(v for v in chart_env if not reads.reads(v))
        assert unknown == [], f"{service} does not read {unknown}"
        assert platform_local_defaults <= set(chart_env), "defaults point at localhost"
        assert platform_vars - {"FLYWHEEL_OTEL_ENDPOINT"} <= set(chart_env) | set(env)
        settings = settings_from(deployable, env)
        assert check_auth(settings) == []
        assert (settings.http_host, settings.http_port) == (ANY_INTERFACE, 8080)


@variants
def test_config_changes_roll_the_pods(variant):
    for service in SERVICES:
        annotations = of_kind(variant, "Deployment")[component(service)]["spec"]["template"][
            "metadata"
        ]["annotations"]
        assert len(annotations["checksum/config"]) == 64
        assert annotations["prometheus.io/scrape"] == "true"


# --- Serving -----------------------------------------------------------------------------------


def test_default_serving_is_the_charts_triton():
    triton = of_kind("default", "Deployment")[component("triton")]
    container = triton["spec"]["template"]["spec"]["containers"][0]
    platform = of_kind("default", "ConfigMap")[f"{RELEASE}-platform"]["data"]

    assert container["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert "--model-repository=s3://flywheel-models/triton" in container["args"]
    assert "--model-control-mode=explicit" in container["args"]
    assert "--strict-readiness=false" in container["args"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert (
        platform["FLYWHEEL_TRITON_URL"]
        == f"{component('triton')}.{NAMESPACE}.svc.cluster.local:8000"
    )
    assert of_kind("default", "InferenceService") == {}


def test_production_triton_shares_the_repository_claim_with_rollout():
    deployments = of_kind("production", "Deployment")
    triton = deployments[component("triton")]["spec"]["template"]["spec"]
    rollout = deployments[component("rollout")]["spec"]["template"]["spec"]
    claim = _production()["triton"]["sharedRepositoryClaim"]

    def mount(pod):
        volume = next(v for v in pod["volumes"] if v["name"] == "model-repository")
        point = next(
            m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model-repository"
        )
        return volume["persistentVolumeClaim"]["claimName"], point

    assert mount(triton)[0] == mount(rollout)[0] == claim
    assert mount(triton)[1]["readOnly"] is True
    assert mount(rollout)[1]["readOnly"] is False
    assert f"--model-repository={mount(triton)[1]['mountPath']}" in triton["containers"][0]["args"]


def test_kserve_serving_is_an_inference_service_with_the_triton_runtime():
    services = of_kind("kserve", "InferenceService")
    platform = of_kind("kserve", "ConfigMap")[f"{RELEASE}-platform"]["data"]

    assert list(services) == [component("models")]
    predictor = services[component("models")]["spec"]["predictor"]
    assert predictor["model"]["runtime"] == "kserve-tritonserver"
    assert predictor["model"]["protocolVersion"] == "v2"
    assert predictor["model"]["storageUri"].startswith("s3://")
    assert component("triton") not in of_kind("kserve", "Deployment")
    assert platform["FLYWHEEL_TRITON_URL"].startswith(f"{component('models')}-predictor.")


def test_kserve_serving_is_driven_by_rollout_on_that_inference_service():
    config = of_kind("kserve", "ConfigMap")[f"{component('rollout')}-config"]["data"]
    [service] = of_kind("kserve", "InferenceService").values()
    settings = RolloutSettings.model_validate(
        {
            "backend": config["FLYWHEEL_ROLLOUT_BACKEND"],
            "kserve": {
                key.removeprefix("FLYWHEEL_ROLLOUT_KSERVE__").lower(): value
                for key, value in config.items()
                if key.startswith("FLYWHEEL_ROLLOUT_KSERVE__")
            },
        }
    )
    rules = [
        rule
        for role in of_kind("kserve", "Role").values()
        if role["metadata"]["name"] == component("rollout")
        for rule in role["rules"]
    ]

    assert settings.backend == "kserve"
    assert settings.kserve.namespace == service["metadata"]["namespace"]
    assert settings.kserve.name_template.format(registered_model="digits") == component("models")
    predictor = service["spec"]["predictor"]
    assert settings.kserve.runtime == predictor["model"]["runtime"]
    assert settings.kserve.service_account == predictor["serviceAccountName"]
    uri = settings.kserve.storage_uri_template.format(registered_model="digits", version="7")
    assert uri.startswith("s3://")
    assert uri.endswith("/digits/7/")
    assert any(
        "inferenceservices" in rule["resources"] and {"create", "patch"} <= set(rule["verbs"])
        for rule in rules
    ), rules
    assert (
        "FLYWHEEL_ROLLOUT_BACKEND"
        not in (of_kind("default", "ConfigMap")[f"{component('rollout')}-config"]["data"])
    )


# --- Zero trust ----------------------------------------------------------------------------------


def _principal(namespace: str, account: str) -> str:
    return f"cluster.local/ns/{namespace}/sa/{account}"


PROMETHEUS = _principal("monitoring", "prometheus-k8s")
GATEWAY = _principal("istio-system", "istio-ingressgateway-service-account")


@variants
def test_mtls_is_strict_for_the_namespace(variant):
    (policy,) = of_kind(variant, "PeerAuthentication").values()

    assert policy["spec"] == {"mtls": {"mode": "STRICT"}}
    assert policy["metadata"]["namespace"] == NAMESPACE


@variants
def test_services_admit_only_the_gateway_and_prometheus(variant):
    policies = of_kind(variant, "AuthorizationPolicy")
    for service in SERVICES:
        spec = policies[component(service)]["spec"]
        callers: dict[str, list[dict[str, Any]]] = {}
        for rule in spec["rules"]:
            (source,) = rule["from"]
            (principal,) = source["source"]["principals"]
            callers[principal] = rule["to"]

        assert spec["action"] == "ALLOW"
        assert callers[PROMETHEUS] == [{"operation": {"methods": ["GET"], "paths": ["/metrics"]}}]
        if service in EXPOSED:
            assert set(callers) == {PROMETHEUS, GATEWAY}
            paths = callers[GATEWAY][0]["operation"]["paths"]
            assert paths
            assert all(p.startswith("/") and p != "/*" for p in paths)
        else:
            assert set(callers) == {PROMETHEUS}, f"{service} is called by {set(callers)}"


@variants
def test_serving_admits_only_the_bff_and_rollout(variant):
    name = component("models") if variant == "kserve" else component("triton")
    spec = of_kind(variant, "AuthorizationPolicy")[name]["spec"]
    principals = {
        p for rule in spec["rules"] for f in rule["from"] for p in f["source"].get("principals", [])
    }

    assert principals == {
        PROMETHEUS,
        _principal(NAMESPACE, component("inference-bff")),
        _principal(NAMESPACE, component("rollout")),
    }


@variants
def test_gateway_validates_jwts_from_the_configured_issuer(variant):
    merged = _merged(variant)
    (authn,) = of_kind(variant, "RequestAuthentication").values()
    deny = of_kind(variant, "AuthorizationPolicy")[f"{RELEASE}-require-jwt"]
    (route,) = of_kind(variant, "VirtualService").values()

    assert authn["metadata"]["namespace"] == merged["gateway"]["namespace"]
    assert authn["spec"]["jwtRules"][0]["issuer"] == merged["oidc"]["issuer"]
    assert authn["spec"]["jwtRules"][0]["jwksUri"] == merged["oidc"]["jwksUri"]
    assert deny["spec"]["action"] == "DENY"
    assert deny["spec"]["rules"][0]["from"] == [{"source": {"notRequestPrincipals": ["*"]}}]
    assert {r["name"] for r in route["spec"]["http"]} == EXPOSED


@variants
def test_network_policies_deny_by_default_and_allow_only_listed_paths(variant):
    policies = of_kind(variant, "NetworkPolicy")
    merged = _merged(variant)
    deny = policies[f"{RELEASE}-default-deny"]["spec"]

    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for service in SERVICES:
        spec = policies[component(service)]["spec"]
        sources = [
            peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            for rule in spec["ingress"]
            for peer in rule["from"]
        ]
        expected = ["monitoring"] + (["istio-system"] if service in EXPOSED else [])
        assert sources == expected, service
        dependencies = merged["services"][service]["dependencies"]
        assert len(spec["egress"]) == 2 + len(dependencies), service
        assert spec["egress"][0]["ports"] == [
            {"port": 53, "protocol": "UDP"},
            {"port": 53, "protocol": "TCP"},
        ]
        for rule in spec["ingress"] + spec["egress"]:
            assert rule.get("ports"), f"{service}: a rule open on every port"
            assert rule.get("to", rule.get("from")), f"{service}: a rule open to everyone"


# --- Training ----------------------------------------------------------------------------------


@variants
def test_kueue_queues_reference_real_flavors_and_priorities_order_retrains_first(variant):
    flavors = of_kind(variant, "ResourceFlavor")
    cluster_queues = of_kind(variant, "ClusterQueue")
    local_queues = of_kind(variant, "LocalQueue")
    priorities = {n: p["value"] for n, p in of_kind(variant, "WorkloadPriorityClass").items()}
    training = {q["name"] for q in _merged(variant)["training"]["clusterQueues"]}

    assert set(flavors) == {"bronze", "silver", "gold"}
    assert {lq["spec"]["clusterQueue"] for lq in local_queues.values()} == set(cluster_queues)
    assert set(cluster_queues) == training | {"flywheel-dev"}
    for name in training:
        queue = cluster_queues[name]
        (group,) = queue["spec"]["resourceGroups"]
        assert group["coveredResources"] == ["cpu", "memory", "nvidia.com/gpu"], name
        for flavor in group["flavors"]:
            assert flavor["name"] in flavors
            assert [r["name"] for r in flavor["resources"]] == group["coveredResources"]
        selector = queue["spec"]["namespaceSelector"]["matchLabels"]
        assert selector == {"kubernetes.io/metadata.name": NAMESPACE}
    assert priorities["flywheel-production-retrain"] > priorities["flywheel-experiment"]


@variants
def test_training_runs_land_in_the_charts_queues_and_policies(variant):
    prefix = "FLYWHEEL_TRAINER_DISPATCH_KUBERNETES__"
    config = of_kind(variant, "ConfigMap")[f"{component('trainer-dispatch')}-config"]["data"]
    backend = {k.removeprefix(prefix): v for k, v in config.items() if k.startswith(prefix)}
    selector = of_kind(variant, "NetworkPolicy")[component("training")]["spec"]["podSelector"]
    run_labels = {"app.kubernetes.io/component": "training"} | yaml.safe_load(backend["LABELS"])

    assert config["FLYWHEEL_TRAINER_DISPATCH_BACKEND"] == "kubernetes"
    assert backend["NAMESPACE"] == NAMESPACE
    assert backend["QUEUE_NAME"] in of_kind(variant, "LocalQueue")
    assert backend["PRIORITY_CLASS"] in of_kind(variant, "WorkloadPriorityClass")
    assert backend["SERVICE_ACCOUNT"] in of_kind(variant, "ServiceAccount")
    assert backend["SECRETS__S3_SECRET"] == _merged(variant)["secrets"]["existingSecret"]
    assert backend["IMAGE"].rsplit(":", 1)[0].endswith("/flywheel-trainer")
    assert matches(selector["matchLabels"], run_labels)


# --- Workspaces ----------------------------------------------------------------------------------


def _workspaces_options(variant, catalog, settings_from):
    """The workspaces service's Kubernetes options as the chart's ConfigMap sets them."""
    config = of_kind(variant, "ConfigMap")[f"{component('workspaces')}-config"]["data"]
    settings = settings_from(catalog["workspaces"], config)
    assert settings.backend == "kubernetes"
    return settings.kubernetes


def _workspace(mode, profile=None):
    return Workspace(
        workspace_id=uuid.UUID("00000000-0000-4000-8000-0000000000aa"),
        owner="alice@example.com",
        spec=WorkspaceSpec(
            image="registry.local/flywheel-ide:1",
            gpu_type="a100",
            mode=mode,
            mig_profile=profile,
        ),
        state=WorkspaceState.PROVISIONING,
        requested_at=datetime(2025, 1, 1, tzinfo=UTC),
    )


@variants
def test_dev_environments_rank_below_every_training_priority(variant):
    merged = _merged(variant)
    pod_class = of_kind(variant, "PriorityClass")[DEV_NAMESPACE]
    workload_classes = {n: p["value"] for n, p in of_kind(variant, "WorkloadPriorityClass").items()}
    training = {c["name"] for c in merged["training"]["priorityClasses"]}

    # Training pods carry no PriorityClass (0): any of them outranks an environment's pod.
    assert pod_class["value"] < 0
    assert pod_class["preemptionPolicy"] == "Never"
    assert pod_class["globalDefault"] is False
    assert workload_classes[DEV_NAMESPACE] < min(workload_classes[n] for n in training)


@variants
def test_the_dev_queue_shares_the_training_pools_and_never_borrows_or_preempts(variant):
    queue = of_kind(variant, "ClusterQueue")[DEV_NAMESPACE]["spec"]
    [local] = [
        q
        for q in of_kind(variant, "LocalQueue").values()
        if q["spec"]["clusterQueue"] == DEV_NAMESPACE
    ]
    flavors = of_kind(variant, "ResourceFlavor")
    (group,) = queue["resourceGroups"]

    assert queue["cohortName"] == _merged(variant)["training"]["cohort"]
    assert queue["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": DEV_NAMESPACE
    }
    assert queue["preemption"] == {"withinClusterQueue": "Never", "reclaimWithinCohort": "Never"}
    assert local["metadata"]["namespace"] == DEV_NAMESPACE
    assert {"cpu", "memory", "nvidia.com/gpu"} <= set(group["coveredResources"])
    for flavor in group["flavors"]:
        assert flavor["name"] in flavors
        assert [r["name"] for r in flavor["resources"]] == group["coveredResources"]
        assert all(r["borrowingLimit"] == "0" for r in flavor["resources"]), flavor["name"]


@variants
def test_the_dev_namespace_is_restricted_kept_and_denies_by_default(variant):
    namespace = of_kind(variant, "Namespace")[DEV_NAMESPACE]
    deny = of_kind(variant, "NetworkPolicy")[f"{RELEASE}-workspaces-default-deny"]

    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert namespace["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert deny["metadata"]["namespace"] == DEV_NAMESPACE
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


@variants
def test_environments_land_in_the_charts_namespace_queue_and_priority(
    variant, catalog, settings_from
):
    options = _workspaces_options(variant, catalog, settings_from)
    local_queues = of_kind(variant, "LocalQueue")
    merged = _merged(variant)

    assert options.namespace == DEV_NAMESPACE
    assert local_queues[options.kueue_queue]["metadata"]["namespace"] == DEV_NAMESPACE
    assert options.priority_class in of_kind(variant, "PriorityClass")
    assert options.priority_class in of_kind(variant, "WorkloadPriorityClass")
    assert options.ingress_namespace == merged["gateway"]["namespace"]
    assert options.ingress_pod_labels == merged["gateway"]["podLabels"]
    assert options.route_kind == "virtual-service"
    assert options.ingress_gateway == merged["gateway"]["gatewayRef"]
    assert options.labels == {"app.kubernetes.io/instance": RELEASE}


@variants
@pytest.mark.parametrize(
    ("mode", "profile"),
    [
        (AllocationMode.FULL, None),
        (AllocationMode.MIG, "1g.10gb"),
        (AllocationMode.TIME_SLICED, None),
        (AllocationMode.MPS, None),
    ],
)
def test_environments_pass_the_schemas_and_the_dev_queue_covers_their_gpus(
    variant, catalog, settings_from, mode, profile
):
    require_crds()  # the dev queue and priority are Kueue objects
    options = _workspaces_options(variant, catalog, settings_from).model_copy(
        update={"ingress_host": "dev.example.com"}
    )
    workspace = _workspace(mode, profile)
    built = workspace_manifests.workspace_objects(workspace, options)
    assert built.route is not None
    objects = [built.claim, built.network_policy, built.service, built.route, built.pod]
    (group,) = of_kind(variant, "ClusterQueue")[options.kueue_queue]["spec"]["resourceGroups"]

    for kube_version in KUBE_VERSIONS:
        validate_manifests(objects, kube_version=kube_version)
    requested = set(built.pod["spec"]["containers"][0]["resources"]["requests"])
    assert requested <= set(group["coveredResources"]), "Kueue would never admit it"
    assert all(o["metadata"]["namespace"] == DEV_NAMESPACE for o in objects)


async def test_the_workspaces_role_grants_exactly_what_its_backend_calls(
    kube_api, catalog, settings_from
):
    # With an ingress host, so the backend makes every call it can (the IDE's route too).
    options = _workspaces_options("default", catalog, settings_from).model_copy(
        update={"api_host": kube_api.url, "ingress_host": "dev.example.com"}
    )
    backend = KubernetesBackend(options)
    workspace = _workspace(AllocationMode.FULL)
    ready = workspace.model_copy(update={"expires_at": datetime(2025, 1, 1, 8, tzinfo=UTC)})
    await backend.create(workspace)
    await backend.create(workspace)
    await backend.status(ready)
    await backend.stop(workspace)
    await backend.delete(workspace)
    await backend.close()
    verbs = {"GET": "get", "POST": "create", "PATCH": "patch", "DELETE": "delete"}
    called = set()
    for request in kube_api.requests:
        parts = request.path.strip("/").split("/")
        group = "" if parts[0] == "api" else parts[1]
        namespace_at = parts.index("namespaces")
        assert parts[namespace_at + 1] == DEV_NAMESPACE, request.path
        called.add((group, parts[namespace_at + 2], verbs[request.method]))
    [role] = [
        r
        for r in of_kind("default", "Role").values()
        if r["metadata"]["name"] == component("workspaces")
    ]
    [binding] = [
        b
        for b in of_kind("default", "RoleBinding").values()
        if b["metadata"]["name"] == component("workspaces")
    ]
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }

    assert role["metadata"]["namespace"] == DEV_NAMESPACE
    assert binding["metadata"]["namespace"] == DEV_NAMESPACE
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": component("workspaces"), "namespace": NAMESPACE}
    ]
    assert ("networking.istio.io", "virtualservices", "create") in called
    assert called == granted


# --- RabbitMQ users ------------------------------------------------------------------------------


@variants
def test_each_service_connects_as_its_own_rabbitmq_user(variant):
    deployments = of_kind(variant, "Deployment")
    for service in provision.load_access():
        container = deployments[component(service)]["spec"]["template"]["spec"]["containers"][0]
        [url] = [v for v in container["env"] if v["name"] == "FLYWHEEL_RABBIT_URL"]
        assert url["valueFrom"]["secretKeyRef"]["key"] == f"rabbit-url-{service}"


@variants
def test_a_hook_job_provisions_the_users_with_the_charts_copy_of_the_script(variant):
    [job] = of_kind(variant, "Job").values()
    config = of_kind(variant, "ConfigMap")[component("rabbitmq-provision")]
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    variables = {v["name"]: v["valueFrom"]["secretKeyRef"]["key"] for v in container["env"][1:]}
    policy = of_kind(variant, "NetworkPolicy")[component("rabbitmq-provision")]
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}

    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert config["data"]["provision.py"] == PROVISION_SCRIPT.read_text()
    assert config["data"]["access.json"] == PROVISION_SCRIPT.with_name("access.json").read_text()
    assert container["command"] == ["python", "/provision/provision.py"]
    assert {
        provision.password_env(service): f"rabbitmq-password-{service}"
        for service in provision.load_access()
    }.items() <= variables.items()
    assert {"RABBITMQ_ADMIN_USER", "RABBITMQ_ADMIN_PASSWORD"} <= set(variables)
    assert pod["automountServiceAccountToken"] is False
    assert job["spec"]["template"]["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert egress_ports == {53, 15012, 15672}
    assert policy["spec"]["ingress"] == []
