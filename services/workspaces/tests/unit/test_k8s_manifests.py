import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from flywheel_testing.kube import ManifestError, require_crds, validate_manifest
from flywheel_workspaces.adapters import k8s_manifests as manifests
from flywheel_workspaces.adapters.k8s_manifests import KubernetesOptions
from flywheel_workspaces.ports import (
    AllocationMode,
    Workspace,
    WorkspaceSpec,
    WorkspaceState,
)

WORKSPACE_ID = uuid.UUID("00000000-0000-4000-8000-0000000000aa")
OWNER = "alice@example.com"
OPTIONS = KubernetesOptions(
    storage_class="fast-ssd",
    time_sliced_resource="nvidia.com/gpu.shared",
    mps_resource="nvidia.com/gpu.mps",
    gpu_products={"a100": "NVIDIA-A100-SXM4-80GB"},
    pod_cidrs=["10.244.0.0/16", "fd00:10:244::/56"],
    labels={"app.kubernetes.io/instance": "flywheel"},
)
ROUTED = OPTIONS.model_copy(update={"ingress_host": "dev.example.com"})
KUBE_VERSIONS = ["1.29", "1.37"]


def _workspace(
    *,
    mode: AllocationMode = AllocationMode.FULL,
    gpu_count: int = 2,
    mig_profile: str | None = None,
    owner: str = OWNER,
    workspace_id: uuid.UUID = WORKSPACE_ID,
    expires_at: datetime | None = None,
    ide: str = "code-server",
) -> Workspace:
    return Workspace(
        workspace_id=workspace_id,
        owner=owner,
        spec=WorkspaceSpec(
            image="registry.local/flywheel-ide:1",
            gpu_type="a100",
            gpu_count=gpu_count,
            mode=mode,
            mig_profile=mig_profile,
            cpu="8",
            memory="64Gi",
            storage="100Gi",
            ide=ide,
        ),
        state=WorkspaceState.PROVISIONING,
        requested_at=datetime(2025, 1, 1, tzinfo=UTC),
        expires_at=expires_at,
    )


def _objects(workspace: Workspace) -> list[dict[str, Any]]:
    built = manifests.workspace_objects(workspace, OPTIONS)
    return [built.claim, built.network_policy, built.service, built.pod]


MODES = [
    pytest.param(AllocationMode.FULL, None, "nvidia.com/gpu", id="full"),
    pytest.param(AllocationMode.MIG, "1g.10gb", "nvidia.com/mig-1g.10gb", id="mig"),
    pytest.param(AllocationMode.TIME_SLICED, None, "nvidia.com/gpu.shared", id="time-sliced"),
    pytest.param(AllocationMode.MPS, None, "nvidia.com/gpu.mps", id="mps"),
]


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize(("mode", "profile", "resource"), MODES)
def test_every_allocation_mode_passes_the_strict_kubernetes_schemas(
    mode: AllocationMode, profile: str | None, resource: str, kube_version: str
) -> None:
    for obj in _objects(_workspace(mode=mode, mig_profile=profile)):
        validate_manifest(obj, kube_version=kube_version)


@pytest.mark.parametrize(("mode", "profile", "resource"), MODES)
def test_gpus_are_requested_as_the_allocation_modes_resource(
    mode: AllocationMode, profile: str | None, resource: str
) -> None:
    pod = manifests.pod(_workspace(mode=mode, mig_profile=profile, gpu_count=3), OPTIONS)

    (container,) = pod["spec"]["containers"]
    amounts = {"cpu": "8", "memory": "64Gi", resource: "3"}
    assert container["resources"] == {"requests": amounts, "limits": amounts}
    assert pod["metadata"]["labels"][manifests.ALLOCATION_MODE_LABEL] == mode.value
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]


def test_no_gpus_asks_for_none_and_needs_no_gpu_node() -> None:
    pod = manifests.pod(_workspace(gpu_count=0), OPTIONS)

    validate_manifest(pod)
    assert set(pod["spec"]["containers"][0]["resources"]["limits"]) == {"cpu", "memory"}
    assert "tolerations" not in pod["spec"]
    assert "nodeSelector" not in pod["spec"]


def test_a_gpu_kind_without_a_known_product_is_not_pinned() -> None:
    pod = manifests.pod(_workspace(), OPTIONS.model_copy(update={"gpu_products": {}}))

    assert "nodeSelector" not in pod["spec"]
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_every_object_carries_owner_id_and_app_labels_and_the_full_owner() -> None:
    for obj in _objects(_workspace()):
        metadata = obj["metadata"]
        labels = metadata["labels"]
        assert metadata["namespace"] == "flywheel-dev"
        assert labels[manifests.WORKSPACE_ID_LABEL] == str(WORKSPACE_ID)
        assert labels[manifests.OWNER_LABEL] == manifests.owner_label(OWNER)
        assert labels["app.kubernetes.io/name"] == "flywheel-workspace"
        assert labels["app.kubernetes.io/component"] == "workspace"
        assert labels["app.kubernetes.io/part-of"] == "flywheel"
        assert labels["app.kubernetes.io/managed-by"] == "flywheel-workspaces"
        assert labels["app.kubernetes.io/instance"] == "flywheel"
        assert metadata["annotations"][manifests.OWNER_ANNOTATION] == OWNER


@pytest.mark.parametrize(
    "owner",
    [
        "alice@example.com",
        "auth0|5f7c8ec7c33c6c004bbafe82",
        "CN=Alice Smith,OU=ML,O=Example",
        "___",
        "x" * 300,
        "ünïcödé",
    ],
)
def test_owners_become_valid_label_values(owner: str) -> None:
    value = manifests.owner_label(owner)
    pod = manifests.pod(_workspace(owner=owner), OPTIONS)

    validate_manifest(pod)
    assert len(value) <= 63
    assert pod["metadata"]["annotations"][manifests.OWNER_ANNOTATION] == owner


def test_owners_that_sanitise_alike_keep_distinct_labels() -> None:
    # The NetworkPolicy admits pods by this label: a collision would join two engineers.
    assert manifests.owner_label("a@b.com") != manifests.owner_label("a-b.com")
    assert manifests.owner_label("a@b.com") == manifests.owner_label("a@b.com")
    assert manifests.owner_label("alice@example.com").startswith("alice-example.com-")


def test_ttl_and_expiry_are_label_safe() -> None:
    expires = datetime(2025, 1, 1, 18, 30, tzinfo=UTC)
    pod = manifests.pod(_workspace(expires_at=expires), OPTIONS)

    validate_manifest(pod)
    labels = pod["metadata"]["labels"]
    assert labels[manifests.TTL_LABEL] == str(8 * 3600)
    assert labels[manifests.EXPIRES_AT_LABEL] == str(int(expires.timestamp())) == "1735756200"
    assert pod["metadata"]["annotations"][manifests.EXPIRES_AT_ANNOTATION] == expires.isoformat()
    unknown = manifests.pod(_workspace(), OPTIONS)["metadata"]["labels"]
    assert manifests.EXPIRES_AT_LABEL not in unknown


def test_kueue_queue_and_a_lower_priority_class_keep_retrains_first() -> None:
    pod = manifests.pod(_workspace(), OPTIONS)

    assert pod["metadata"]["labels"][manifests.QUEUE_LABEL] == "flywheel-dev"
    assert pod["metadata"]["labels"][manifests.PRIORITY_LABEL] == "flywheel-dev"
    assert pod["spec"]["priorityClassName"] == "flywheel-dev"


def test_without_kueue_the_pod_still_has_its_priority_class() -> None:
    pod = manifests.pod(_workspace(), OPTIONS.model_copy(update={"kueue_queue": None}))

    assert manifests.QUEUE_LABEL not in pod["metadata"]["labels"]
    assert manifests.PRIORITY_LABEL not in pod["metadata"]["labels"]
    assert pod["spec"]["priorityClassName"] == "flywheel-dev"


def test_the_pod_is_non_root_without_privilege_escalation_or_a_token() -> None:
    spec = manifests.pod(_workspace(), OPTIONS)["spec"]

    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 1000
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = spec["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["privileged"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert spec["automountServiceAccountToken"] is False


def test_the_home_claim_is_sized_by_the_spec_and_owned_by_nothing() -> None:
    claim = manifests.home_claim(_workspace(expires_at=datetime(2025, 1, 2, tzinfo=UTC)), OPTIONS)
    pod = manifests.pod(_workspace(), OPTIONS)

    assert claim["metadata"]["name"] == f"flywheel-ws-{WORKSPACE_ID}-home"
    assert "ownerReferences" not in claim["metadata"]
    assert manifests.EXPIRES_AT_LABEL not in claim["metadata"]["labels"]
    assert claim["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "100Gi"}},
        "storageClassName": "fast-ssd",
    }
    (home,) = [v for v in pod["spec"]["volumes"] if v["name"] == "home"]
    assert home == {
        "name": "home",
        "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]},
    }
    mounts = {m["name"]: m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["home"] == "/home/workspace"


def test_without_a_storage_class_the_claim_takes_the_clusters_default() -> None:
    claim = manifests.home_claim(_workspace(), KubernetesOptions())

    validate_manifest(claim)
    assert "storageClassName" not in claim["spec"]


def test_the_service_exposes_the_ide_and_ssh_ports_of_this_pod_only() -> None:
    pod = manifests.pod(_workspace(), OPTIONS)
    service = manifests.service(_workspace(), OPTIONS)

    selector = service["spec"]["selector"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert selector[manifests.WORKSPACE_ID_LABEL] == str(WORKSPACE_ID)
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"ide": (8443, "ide"), "ssh": (2222, "ssh")}
    container_ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert container_ports == {"ide": 8443, "ssh": 2222}


def _peers(rule: dict[str, Any], key: str) -> list[dict[str, Any]]:
    peers: list[dict[str, Any]] = rule[key]
    return peers


def test_the_network_policy_admits_only_the_gateway_and_the_owners_own_pods() -> None:
    policy = manifests.network_policy(_workspace(), OPTIONS)["spec"]
    pod = manifests.pod(_workspace(), OPTIONS)
    same_owner = {
        "podSelector": {"matchLabels": {manifests.OWNER_LABEL: manifests.owner_label(OWNER)}}
    }

    assert policy["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    gateway, owners = policy["ingress"]
    assert _peers(gateway, "from") == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "istio-system"}},
            "podSelector": {"matchLabels": {"istio": "ingressgateway"}},
        }
    ]
    assert {p["port"] for p in gateway["ports"]} == {8443, 2222}
    assert _peers(owners, "from") == [same_owner]


def test_the_network_policy_lets_traffic_out_except_to_other_environments() -> None:
    egress = manifests.network_policy(_workspace(), OPTIONS)["spec"]["egress"]

    owners, elsewhere = egress
    assert _peers(owners, "to") == [
        {"podSelector": {"matchLabels": {manifests.OWNER_LABEL: manifests.owner_label(OWNER)}}}
    ]
    namespaces, ipv4, ipv6 = _peers(elsewhere, "to")
    assert namespaces == {
        "namespaceSelector": {
            "matchExpressions": [
                {
                    "key": "kubernetes.io/metadata.name",
                    "operator": "NotIn",
                    "values": ["flywheel-dev"],
                }
            ]
        }
    }
    assert ipv4 == {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.244.0.0/16"]}}
    assert ipv6 == {"ipBlock": {"cidr": "::/0", "except": ["fd00:10:244::/56"]}}
    assert "ports" not in elsewhere


def test_another_owners_pod_matches_none_of_the_admitted_peers() -> None:
    mine = manifests.network_policy(_workspace(), OPTIONS)["spec"]
    theirs = manifests.pod(
        _workspace(owner="mallory@example.com", workspace_id=uuid.uuid4()), OPTIONS
    )
    labels = theirs["metadata"]["labels"]

    for rule, key in [(r, "from") for r in mine["ingress"]] + [(r, "to") for r in mine["egress"]]:
        for peer in rule[key]:
            selector = peer.get("podSelector", {}).get("matchLabels")
            if selector is not None and "namespaceSelector" not in peer:
                assert not selector.items() <= labels.items(), peer


def test_names_come_from_the_workspace_id_and_are_dns_labels() -> None:
    built = manifests.workspace_objects(_workspace(), OPTIONS)
    name = f"flywheel-ws-{WORKSPACE_ID}"

    assert built.pod["metadata"]["name"] == name
    assert built.service["metadata"]["name"] == name
    assert built.network_policy["metadata"]["name"] == name
    assert len(built.claim["metadata"]["name"]) <= 63


def test_the_validator_refuses_a_pod_with_a_misspelt_field() -> None:
    pod = manifests.pod(_workspace(), OPTIONS)
    pod["spec"]["containers"][0]["resource"] = {}

    with pytest.raises(ManifestError, match="resource"):
        validate_manifest(pod)


def test_the_connection_is_the_services_address_or_the_ingress_host() -> None:
    workspace = _workspace()
    host = f"flywheel-ws-{WORKSPACE_ID}.flywheel-dev.svc.cluster.local"

    inside = manifests.connection(workspace, OPTIONS)
    outside = manifests.connection(workspace, ROUTED)
    ssh_only = manifests.connection(_workspace(ide="ssh"), OPTIONS)

    assert inside.url == f"http://{host}:8443/"
    assert inside.ide == "code-server"
    assert inside.ssh == f"ssh -p 2222 workspace@{host}"
    assert inside.ssh_tunnel is None
    assert outside.url == f"https://dev.example.com/workspaces/{WORKSPACE_ID}/"
    assert ssh_only.url is None
    assert ssh_only.ide is None
    assert ssh_only.ssh == inside.ssh


def test_behind_an_ingress_host_ssh_goes_through_a_port_forward_of_the_service() -> None:
    outside = manifests.connection(_workspace(ide="ssh"), ROUTED)
    name = f"flywheel-ws-{WORKSPACE_ID}"

    assert outside.url is None
    assert outside.ssh_tunnel == f"kubectl -n flywheel-dev port-forward service/{name} 2222:ssh"
    assert outside.ssh == f"ssh -p 2222 -o HostKeyAlias={name} workspace@localhost"


# --- the route -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ide", ["code-server", "jupyter"])
def test_the_route_passes_the_virtual_service_crd(ide: str) -> None:
    require_crds()
    route = manifests.route(_workspace(ide=ide), ROUTED)

    assert route is not None
    assert (route["apiVersion"], route["kind"]) == ("networking.istio.io/v1", "VirtualService")
    validate_manifest(route)
    route["spec"]["http"][1]["rewrites"] = {"uri": "/"}
    with pytest.raises(ManifestError, match="rewrites"):
        validate_manifest(route)


def test_the_route_takes_the_environments_path_on_the_gateway_to_its_ide_port() -> None:
    route = manifests.route(_workspace(), ROUTED)
    service = manifests.service(_workspace(), ROUTED)

    assert route is not None
    assert route["metadata"]["name"] == f"flywheel-ws-{WORKSPACE_ID}"
    assert route["metadata"]["namespace"] == "flywheel-dev"
    assert route["metadata"]["labels"] == service["metadata"]["labels"]
    spec = route["spec"]
    assert spec["hosts"] == ["dev.example.com"]
    assert spec["gateways"] == ["istio-system/flywheel-gateway"]
    redirect, forward = spec["http"]
    assert redirect["match"] == [{"uri": {"exact": f"/workspaces/{WORKSPACE_ID}"}}]
    assert redirect["redirect"] == {"uri": f"/workspaces/{WORKSPACE_ID}/"}
    assert forward["match"] == [{"uri": {"prefix": f"/workspaces/{WORKSPACE_ID}/"}}]
    (destination,) = forward["route"]
    assert destination["destination"] == {
        "host": f"flywheel-ws-{WORKSPACE_ID}.flywheel-dev.svc.cluster.local",
        "port": {"number": 8443},
    }
    ide_port = {p["name"]: p["port"] for p in service["spec"]["ports"]}["ide"]
    assert destination["destination"]["port"]["number"] == ide_port


def test_code_server_gets_its_prefix_stripped_and_jupyter_its_full_base_path() -> None:
    code_server = manifests.route(_workspace(ide="code-server"), ROUTED)
    jupyter = manifests.route(_workspace(ide="jupyter"), ROUTED)
    env = {
        e["name"]: e["value"]
        for e in manifests.pod(_workspace(ide="jupyter"), ROUTED)["spec"]["containers"][0]["env"]
    }

    assert code_server is not None
    assert jupyter is not None
    assert code_server["spec"]["http"][1]["rewrite"] == {"uri": "/"}
    assert "rewrite" not in jupyter["spec"]["http"][1]
    assert (
        env["FLYWHEEL_WORKSPACE_BASE_PATH"]
        == jupyter["spec"]["http"][1]["match"][0]["uri"]["prefix"]
    )


@pytest.mark.parametrize(
    ("ide", "update"),
    [
        pytest.param("code-server", {}, id="no-ingress-host"),
        pytest.param("code-server", {"ingress_host": ""}, id="empty-ingress-host"),
        pytest.param(
            "code-server",
            {"ingress_host": "dev.example.com", "route_kind": "none"},
            id="routed-elsewhere",
        ),
        pytest.param("ssh", {"ingress_host": "dev.example.com"}, id="ssh-only"),
    ],
)
def test_no_route_without_an_ingress_host_of_ours_or_a_browser_ide(
    ide: str, update: dict[str, Any]
) -> None:
    options = OPTIONS.model_copy(update=update)

    assert manifests.route(_workspace(ide=ide), options) is None
    assert manifests.workspace_objects(_workspace(ide=ide), options).route is None


def test_the_network_policy_admits_the_routes_gateway_to_the_ide_port() -> None:
    options = ROUTED.model_copy(
        update={"ingress_namespace": "gateways", "ingress_pod_labels": {"app": "edge"}}
    )
    route = manifests.route(_workspace(), options)
    (gateway_rule, _) = manifests.network_policy(_workspace(), options)["spec"]["ingress"]

    assert route is not None
    port = route["spec"]["http"][1]["route"][0]["destination"]["port"]["number"]
    assert {"port": port, "protocol": "TCP"} in gateway_rule["ports"]
    assert gateway_rule["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateways"}},
            "podSelector": {"matchLabels": {"app": "edge"}},
        }
    ]


@pytest.mark.parametrize("gateway", ["flywheel-gateway", "istio-system/", "Istio/gw", "a/b/c"])
def test_the_gateway_must_be_namespace_slash_name(gateway: str) -> None:
    with pytest.raises(ValueError, match="ingress_gateway"):
        KubernetesOptions(ingress_gateway=gateway)


def test_behind_an_ingress_host_the_ide_is_told_its_base_path() -> None:
    options = OPTIONS.model_copy(update={"ingress_host": "dev.example.com"})
    env = {
        e["name"]: e["value"]
        for e in manifests.pod(_workspace(), options)["spec"]["containers"][0]["env"]
    }

    assert env["FLYWHEEL_WORKSPACE_BASE_PATH"] == f"/workspaces/{WORKSPACE_ID}/"
    assert env["HOME"] == "/home/workspace"
    assert env["FLYWHEEL_WORKSPACE_OWNER"] == OWNER


def test_the_pod_is_ready_when_what_the_engineer_connects_to_answers() -> None:
    ide = manifests.pod(_workspace(), OPTIONS)["spec"]["containers"][0]
    ssh = manifests.pod(_workspace(ide="ssh"), OPTIONS)["spec"]["containers"][0]

    assert ide["readinessProbe"]["tcpSocket"] == {"port": "ide"}
    assert ssh["readinessProbe"]["tcpSocket"] == {"port": "ssh"}


def test_the_api_connection_follows_the_options() -> None:
    assert KubernetesOptions(api_host="http://127.0.0.1:1").connection().host == (
        "http://127.0.0.1:1"
    )
    assert KubernetesOptions().connection().mode == "in_cluster"
    local = KubernetesOptions(in_cluster=False, kubeconfig="/etc/kube/config").connection()
    assert local.mode == "kubeconfig"
    assert str(local.kubeconfig) == "/etc/kube/config"
