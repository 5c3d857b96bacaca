"""Kubernetes objects of one development environment, as plain dicts: pure functions, no I/O.

An environment is four objects in ``KubernetesOptions.namespace`` (five behind an ingress host),
all named from its id (``flywheel-ws-<id>``, a DNS-1035 label, so it is a valid Service name
too):

* a **PersistentVolumeClaim** (``…-home``) for the home directory. Nothing owns it: stopping
  the environment (TTL expiry, idle shutdown) deletes the compute only, and the next start of
  the same environment mounts the same claim; only ``delete`` removes it.
* a bare **Pod** rather than a one-replica StatefulSet. The service is the controller: its
  policy decides when an environment stops, and a preempted or evicted environment must be
  reported (``gone``/``failed``) rather than silently recreated on some other GPU, which is
  what a StatefulSet would do behind the service's back, holding a GPU the quota no longer
  counts. The home volume is ours too (a StatefulSet's claim templates would name and keep
  it their own way), and Kueue's plain-Pod integration admits a Pod as one workload.
* a **Service** with the IDE and SSH ports.
* a **NetworkPolicy**: ingress only from the platform's ingress gateway (IDE and SSH ports)
  and from the same owner's pods; egress to the same owner's pods, to every other namespace
  and outside the cluster, never to other engineers' environments. The other environments'
  own ingress rules are what really keeps them apart; ``pod_cidrs`` closes the egress path
  through pod IPs that some CNIs let ``ipBlock`` match.
* with ``ingress_host`` (and ``route_kind`` ``virtual-service``, the chart's gateway), an Istio
  **VirtualService** bound to the platform's Gateway: ``https://<ingress_host>/workspaces/<id>/``
  to the Service's IDE port. Istio merges the VirtualServices of one host on a gateway, so each
  environment adds its own path without touching anyone else's. code-server serves everything
  under relative URLs and has no base-path option, so its prefix is rewritten to ``/``;
  JupyterLab builds absolute URLs from its ``base_url``, so its path is passed on as is and the
  image starts it with ``--ServerApp.base_url=$FLYWHEEL_WORKSPACE_BASE_PATH``. An ``ssh``
  environment has no browser IDE and gets no route.

GPUs are requested by allocation mode (``gpu_resource``): whole GPUs, a MIG slice, a
time-sliced replica or an MPS share, each the device plugin's resource name, on a node of the
asked GPU product (``gpu_products``). With a Kueue queue the Pod carries
``kueue.x-k8s.io/queue-name`` and ``kueue.x-k8s.io/priority-class``, and always the
``priorityClassName`` of the (lower) development PriorityClass, so environments neither take
quota from nor keep nodes from production retrains.

Owners are token subjects, which are not label values: ``flywheel.dev/owner`` carries a
readable prefix and a hash of the full subject (two owners never share it, which the
NetworkPolicy relies on); the subject itself is in an annotation.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from flywheel_clients.kubernetes import POD, KubeConnection, Resource
from flywheel_workspaces.ports import AllocationMode, Connection, Workspace

PERSISTENT_VOLUME_CLAIM: Final = Resource("v1", "PersistentVolumeClaim", "persistentvolumeclaims")
SERVICE: Final = Resource("v1", "Service", "services")
NETWORK_POLICY: Final = Resource("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies")
VIRTUAL_SERVICE: Final = Resource("networking.istio.io/v1", "VirtualService", "virtualservices")

NAME_PREFIX: Final = "flywheel-ws-"
HOME_SUFFIX: Final = "-home"
APP_NAME: Final = "flywheel-workspace"
COMPONENT: Final = "workspace"
MANAGED_BY: Final = "flywheel-workspaces"
CONTAINER: Final = "workspace"

WORKSPACE_ID_LABEL: Final = "flywheel.dev/workspace-id"
OWNER_LABEL: Final = "flywheel.dev/owner"
OWNER_ANNOTATION: Final = "flywheel.dev/owner"
TTL_LABEL: Final = "flywheel.dev/ttl-seconds"
EXPIRES_AT_LABEL: Final = "flywheel.dev/expires-at"
"""Epoch seconds (a label value cannot hold an RFC 3339 time); the annotation of the same
name has the readable time."""
EXPIRES_AT_ANNOTATION: Final = "flywheel.dev/expires-at"
GPU_TYPE_LABEL: Final = "flywheel.dev/gpu-type"
ALLOCATION_MODE_LABEL: Final = "flywheel.dev/allocation-mode"
LAST_ACTIVITY_ANNOTATION: Final = "flywheel.dev/last-activity-at"
"""Set by the IDE's sidecar on its own Pod (RFC 3339 or epoch seconds) when it sees use."""
QUEUE_LABEL: Final = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL: Final = "kueue.x-k8s.io/priority-class"

INGRESS_PATH_PREFIX: Final = "/workspaces"
"""With ``ingress_host``, an environment's IDE is at ``https://<host>/workspaces/<id>/``."""
POD_SHM: Final = "/dev/shm"  # noqa: S108 - a memory-backed emptyDir of the pod's own
PREFIX_STRIPPED_IDES: Final = frozenset({"code-server"})
"""IDEs that serve under relative URLs: the route strips ``/workspaces/<id>`` before them."""
IDE_PORT_NAME: Final = "ide"
SSH_PORT_NAME: Final = "ssh"
_OWNER_HASH_CHARS: Final = 16
_LABEL_LIMIT: Final = 63
_NOT_LABEL: Final = re.compile(r"[^A-Za-z0-9_.-]+")
_LABEL_VALUE: Final = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_GATEWAY_REF: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-.a-z0-9]*[a-z0-9])?$"
_GPU_TOLERATION: Final = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


class KubernetesOptions(BaseModel):
    """Where and how environments run in the cluster."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    namespace: str = "flywheel-dev"
    """Namespace of every environment's Pod, PVC, Service and NetworkPolicy."""
    in_cluster: bool = True
    """Use the pod's service account; False reads ``kubeconfig`` (or the default one)."""
    kubeconfig: str | None = None
    context: str | None = None
    """Kubeconfig context; None: the file's current one."""
    api_host: str | None = None
    """API server URL used as is, without credentials (``kubectl proxy``, a test server);
    wins over ``in_cluster`` and ``kubeconfig``."""
    request_timeout_s: float = Field(default=15.0, gt=0)
    """Longest one API request may take."""
    storage_class: str | None = None
    """StorageClass of home volumes; None (or empty) takes the cluster's default."""
    ide_port: int = Field(default=8443, ge=1, le=65535)
    ssh_port: int = Field(default=2222, ge=1, le=65535)
    ssh_user: str = "workspace"
    """User of the ``ssh`` command line reported to the engineer."""
    time_sliced_resource: str = "nvidia.com/gpu.shared"
    """Resource name the NVIDIA device plugin advertises for time-sliced replicas."""
    mps_resource: str = "nvidia.com/gpu.shared"
    """Resource name the NVIDIA device plugin advertises for MPS shares."""
    gpu_node_label: str = "nvidia.com/gpu.product"
    """Node label that names a node's GPU product (set by GPU feature discovery)."""
    gpu_products: dict[str, str] = Field(default_factory=dict)
    """GPU kind → product label value (``{"a100": "NVIDIA-A100-SXM4-80GB"}``); a kind missing
    here is not pinned to a product."""
    kueue_queue: str | None = "flywheel-dev"
    """Kueue LocalQueue of environments (``kueue.x-k8s.io/queue-name``); None (or empty): no
    Kueue."""
    priority_class: str = "flywheel-dev"
    """PriorityClass below the production retrains', so environments never starve them: the
    Pod's ``priorityClassName`` and, with Kueue, its WorkloadPriorityClass (the chart creates
    both under this name)."""
    ingress_host: str | None = None
    """External host for IDE URLs; None (or empty) reports the in-cluster Service address."""
    route_kind: Literal["virtual-service", "none"] = "virtual-service"
    """What routes an environment's ``ingress_host`` path to it: ``virtual-service``, an Istio
    VirtualService per environment bound to ``ingress_gateway`` (how the chart's gateway
    routes); ``none``, something outside the service does."""
    ingress_gateway: str = Field(default="istio-system/flywheel-gateway", pattern=_GATEWAY_REF)
    """The Istio Gateway (``<namespace>/<name>``) the routes bind to; its servers must accept
    ``ingress_host`` from ``namespace``."""
    ingress_namespace: str = "istio-system"
    """Namespace of the platform's ingress gateway, the only outside caller admitted."""
    ingress_pod_labels: dict[str, str] = Field(default_factory=lambda: {"istio": "ingressgateway"})
    """Labels of the ingress gateway's pods in ``ingress_namespace``."""
    pod_cidrs: list[str] = Field(default_factory=list)
    """The cluster's pod address ranges, left out of the "anywhere outside the cluster" egress
    rule, for CNIs whose ``ipBlock`` also matches pod IPs."""
    service_account: str | None = None
    """ServiceAccount of environment pods (its token is never mounted); None: ``default``."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    run_as_user: int = Field(default=1000, ge=1)
    """Non-root user (and group, and the home volume's fsGroup) the environment runs as."""
    home_path: str = "/home/workspace"
    """Where the home volume is mounted (and ``$HOME``)."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Further labels of every object (never overriding the environment's own)."""

    def connection(self) -> KubeConnection:
        """How to reach the API server."""
        if self.api_host:
            return KubeConnection(host=self.api_host, request_timeout_s=self.request_timeout_s)
        return KubeConnection(
            mode="in_cluster" if self.in_cluster else "kubeconfig",
            kubeconfig=Path(self.kubeconfig) if self.kubeconfig else None,
            context=self.context,
            request_timeout_s=self.request_timeout_s,
        )


@dataclass(frozen=True)
class WorkspaceObjects:
    """The objects of one environment, in the order they are created: isolation before the
    Pod, so it never runs unprotected."""

    claim: dict[str, Any]
    network_policy: dict[str, Any]
    service: dict[str, Any]
    route: dict[str, Any] | None
    """The VirtualService; None without one (no ingress host, or an ``ssh`` environment)."""
    pod: dict[str, Any]


# --- names and labels ----------------------------------------------------------------------


def object_name(workspace_id: uuid.UUID) -> str:
    """Name of the environment's Pod, Service and NetworkPolicy (a DNS-1035 label)."""
    return f"{NAME_PREFIX}{workspace_id}"


def claim_name(workspace_id: uuid.UUID) -> str:
    """Name of the environment's home-directory claim."""
    return f"{object_name(workspace_id)}{HOME_SUFFIX}"


def owner_label(owner: str) -> str:
    """The owner as a label value: a readable prefix and a hash of the whole subject.

    The NetworkPolicy admits pods by this value, so it must be distinct for distinct owners
    even where the readable part is not (``a@b`` and ``a-b`` sanitise alike).
    """
    digest = hashlib.sha256(owner.encode()).hexdigest()[:_OWNER_HASH_CHARS]
    room = _LABEL_LIMIT - len(digest) - 1
    readable = _NOT_LABEL.sub("-", owner).strip("-_.")[:room].rstrip("-_.")
    return f"{readable}-{digest}" if readable else digest


def selector_labels(workspace_id: uuid.UUID) -> dict[str, str]:
    """What selects the environment's Pod (its Service and NetworkPolicy use them)."""
    return {"app.kubernetes.io/name": APP_NAME, WORKSPACE_ID_LABEL: str(workspace_id)}


def workspace_labels(workspace: Workspace, options: KubernetesOptions) -> dict[str, str]:
    """Labels of every object of the environment (``options.labels`` may add the chart's
    ``app.kubernetes.io/instance``)."""
    return {
        **options.labels,
        **selector_labels(workspace.workspace_id),
        "app.kubernetes.io/component": COMPONENT,
        "app.kubernetes.io/part-of": "flywheel",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        OWNER_LABEL: owner_label(workspace.owner),
    }


def expires_at_label(expires_at: datetime) -> str:
    """Expiry as a label value: whole epoch seconds."""
    return str(int(expires_at.timestamp()))


def _metadata(
    name: str, workspace: Workspace, options: KubernetesOptions, labels: dict[str, str]
) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": options.namespace,
        "labels": labels,
        "annotations": {OWNER_ANNOTATION: workspace.owner},
    }


# --- GPUs --------------------------------------------------------------------------------------


def gpu_resource(workspace: Workspace, options: KubernetesOptions) -> str | None:
    """The extended resource the environment's GPUs are requested as; None without GPUs."""
    spec = workspace.spec
    if spec.gpu_count < 1:
        return None
    if spec.mode is AllocationMode.FULL:
        return "nvidia.com/gpu"
    if spec.mode is AllocationMode.MIG:
        return f"nvidia.com/mig-{spec.mig_profile}"
    if spec.mode is AllocationMode.TIME_SLICED:
        return options.time_sliced_resource
    return options.mps_resource


def resources(workspace: Workspace, options: KubernetesOptions) -> dict[str, dict[str, str]]:
    """Requests equal to limits: what Kueue admits is what the environment gets (extended
    resources require it anyway), and one engineer cannot eat a shared node's spare CPU."""
    spec = workspace.spec
    amounts = {"cpu": spec.cpu, "memory": spec.memory}
    if (resource := gpu_resource(workspace, options)) is not None:
        amounts[resource] = str(spec.gpu_count)
    return {"requests": dict(amounts), "limits": dict(amounts)}


# --- the objects ---------------------------------------------------------------------------


def home_claim(workspace: Workspace, options: KubernetesOptions) -> dict[str, Any]:
    """The home-directory claim. No owner reference and no expiry label: it outlives every
    Pod of the environment, and only ``delete`` removes it."""
    labels = workspace_labels(workspace, options)
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": workspace.spec.storage}},
    }
    if options.storage_class:
        spec["storageClassName"] = options.storage_class
    return {
        "apiVersion": PERSISTENT_VOLUME_CLAIM.api_version,
        "kind": PERSISTENT_VOLUME_CLAIM.kind,
        "metadata": _metadata(claim_name(workspace.workspace_id), workspace, options, labels),
        "spec": spec,
    }


def base_path(workspace: Workspace) -> str:
    """The environment's path on the ingress host."""
    return f"{INGRESS_PATH_PREFIX}/{workspace.workspace_id}/"


def routed(options: KubernetesOptions) -> bool:
    """Whether the backend routes the ingress host's paths to environments itself."""
    return bool(options.ingress_host) and options.route_kind == "virtual-service"


def pod(workspace: Workspace, options: KubernetesOptions) -> dict[str, Any]:
    """The environment's Pod: its IDE on ``ide_port``, sshd on ``ssh_port``, the home volume
    mounted, hardened, with the GPUs of its allocation mode."""
    spec = workspace.spec
    labels = workspace_labels(workspace, options) | {
        TTL_LABEL: str(spec.ttl_s),
        ALLOCATION_MODE_LABEL: spec.mode.value,
    }
    if _LABEL_VALUE.match(spec.gpu_type):
        labels[GPU_TYPE_LABEL] = spec.gpu_type
    metadata = _metadata(object_name(workspace.workspace_id), workspace, options, labels)
    if workspace.expires_at is not None:
        labels[EXPIRES_AT_LABEL] = expires_at_label(workspace.expires_at)
        metadata["annotations"][EXPIRES_AT_ANNOTATION] = workspace.expires_at.isoformat()
    if options.kueue_queue:
        labels[QUEUE_LABEL] = options.kueue_queue
        labels[PRIORITY_LABEL] = options.priority_class
    env = {
        "FLYWHEEL_WORKSPACE_ID": str(workspace.workspace_id),
        "FLYWHEEL_WORKSPACE_OWNER": workspace.owner,
        "FLYWHEEL_WORKSPACE_IDE": spec.ide,
        "FLYWHEEL_WORKSPACE_IDE_PORT": str(options.ide_port),
        "FLYWHEEL_WORKSPACE_SSH_PORT": str(options.ssh_port),
        "HOME": options.home_path,
    }
    if options.ingress_host:
        env["FLYWHEEL_WORKSPACE_BASE_PATH"] = base_path(workspace)
    # The environment is up when what the engineer connects to answers.
    probe_port = SSH_PORT_NAME if spec.ide == "ssh" else IDE_PORT_NAME
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "imagePullPolicy": options.image_pull_policy,
        "env": [{"name": name, "value": value} for name, value in env.items()],
        "ports": [
            {"name": IDE_PORT_NAME, "containerPort": options.ide_port, "protocol": "TCP"},
            {"name": SSH_PORT_NAME, "containerPort": options.ssh_port, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "tcpSocket": {"port": probe_port},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "resources": resources(workspace, options),
        # The root filesystem stays writable: engineers install packages in their session.
        # What must survive lives in the home volume.
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "home", "mountPath": options.home_path},
            {"name": "dshm", "mountPath": POD_SHM},
        ],
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Always",
        # Engineers' code must not act with the cluster identity of the namespace.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,
        "priorityClassName": options.priority_class,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": options.run_as_user,
            "runAsGroup": options.run_as_user,
            "fsGroup": options.run_as_user,
            # A big home volume is not walked and re-owned at every start.
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {
                "name": "home",
                "persistentVolumeClaim": {"claimName": claim_name(workspace.workspace_id)},
            },
            # CUDA IPC, DataLoader workers and NCCL need more than the runtime's 64 MiB.
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if options.service_account:
        pod_spec["serviceAccountName"] = options.service_account
    if gpu_resource(workspace, options) is not None:
        # GPU node pools are commonly tainted nvidia.com/gpu.
        pod_spec["tolerations"] = [dict(_GPU_TOLERATION)]
        product = options.gpu_products.get(spec.gpu_type)
        if product is not None:
            pod_spec["nodeSelector"] = {options.gpu_node_label: product}
    return {
        "apiVersion": POD.api_version,
        "kind": POD.kind,
        "metadata": metadata,
        "spec": pod_spec,
    }


def service(workspace: Workspace, options: KubernetesOptions) -> dict[str, Any]:
    """A ClusterIP Service in front of the IDE and SSH ports."""
    labels = workspace_labels(workspace, options)
    return {
        "apiVersion": SERVICE.api_version,
        "kind": SERVICE.kind,
        "metadata": _metadata(object_name(workspace.workspace_id), workspace, options, labels),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(workspace.workspace_id),
            "ports": [
                {
                    "name": IDE_PORT_NAME,
                    "port": options.ide_port,
                    "targetPort": IDE_PORT_NAME,
                    "protocol": "TCP",
                    "appProtocol": "http",
                },
                {
                    "name": SSH_PORT_NAME,
                    "port": options.ssh_port,
                    "targetPort": SSH_PORT_NAME,
                    "protocol": "TCP",
                },
            ],
        },
    }


def _outside_cluster(pod_cidrs: list[str]) -> list[dict[str, Any]]:
    """``ipBlock`` peers for every address, less the pod ranges, per IP family."""
    excluded = [ipaddress.ip_network(cidr, strict=False) for cidr in pod_cidrs]
    peers: list[dict[str, Any]] = []
    for everything, version in (("0.0.0.0/0", 4), ("::/0", 6)):
        block: dict[str, Any] = {"cidr": everything}
        mine = [str(net) for net in excluded if net.version == version]
        if mine:
            block["except"] = mine
        peers.append({"ipBlock": block})
    return peers


def network_policy(workspace: Workspace, options: KubernetesOptions) -> dict[str, Any]:
    """Isolation of the environment from other engineers' ones (see the module docstring)."""
    labels = workspace_labels(workspace, options)
    same_owner = {"podSelector": {"matchLabels": {OWNER_LABEL: owner_label(workspace.owner)}}}
    ports = [
        {"port": options.ide_port, "protocol": "TCP"},
        {"port": options.ssh_port, "protocol": "TCP"},
    ]
    return {
        "apiVersion": NETWORK_POLICY.api_version,
        "kind": NETWORK_POLICY.kind,
        "metadata": _metadata(object_name(workspace.workspace_id), workspace, options, labels),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(workspace.workspace_id)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {
                                    "kubernetes.io/metadata.name": options.ingress_namespace
                                }
                            },
                            "podSelector": {"matchLabels": dict(options.ingress_pod_labels)},
                        }
                    ],
                    "ports": ports,
                },
                {"from": [same_owner]},
            ],
            "egress": [
                {"to": [same_owner]},
                {
                    "to": [
                        {
                            "namespaceSelector": {
                                "matchExpressions": [
                                    {
                                        "key": "kubernetes.io/metadata.name",
                                        "operator": "NotIn",
                                        "values": [options.namespace],
                                    }
                                ]
                            }
                        },
                        *_outside_cluster(options.pod_cidrs),
                    ]
                },
            ],
        },
    }


def route(workspace: Workspace, options: KubernetesOptions) -> dict[str, Any] | None:
    """The VirtualService taking ``https://<ingress_host>/workspaces/<id>/`` to the IDE port
    (see the module docstring); None when the backend routes nothing for it."""
    if not routed(options) or workspace.spec.ide == "ssh":
        return None
    labels = workspace_labels(workspace, options)
    prefix = base_path(workspace)
    forward: dict[str, Any] = {
        "name": IDE_PORT_NAME,
        "match": [{"uri": {"prefix": prefix}}],
        "route": [
            {
                "destination": {
                    "host": service_host(workspace, options),
                    "port": {"number": options.ide_port},
                }
            }
        ],
    }
    if workspace.spec.ide in PREFIX_STRIPPED_IDES:
        forward["rewrite"] = {"uri": "/"}
    return {
        "apiVersion": VIRTUAL_SERVICE.api_version,
        "kind": VIRTUAL_SERVICE.kind,
        "metadata": _metadata(object_name(workspace.workspace_id), workspace, options, labels),
        "spec": {
            "hosts": [options.ingress_host],
            "gateways": [options.ingress_gateway],
            "http": [
                # Relative URLs need the trailing slash: without it the IDE's assets resolve
                # one level up, outside the environment's path.
                {
                    "name": "trailing-slash",
                    "match": [{"uri": {"exact": prefix.rstrip("/")}}],
                    "redirect": {"uri": prefix},
                },
                forward,
            ],
        },
    }


def workspace_objects(workspace: Workspace, options: KubernetesOptions) -> WorkspaceObjects:
    """Every object of the environment."""
    return WorkspaceObjects(
        claim=home_claim(workspace, options),
        network_policy=network_policy(workspace, options),
        service=service(workspace, options),
        route=route(workspace, options),
        pod=pod(workspace, options),
    )


# --- how to connect --------------------------------------------------------------------------


def service_host(workspace: Workspace, options: KubernetesOptions) -> str:
    """The Service's in-cluster DNS name."""
    return f"{object_name(workspace.workspace_id)}.{options.namespace}.svc.cluster.local"


def port_forward(workspace: Workspace, options: KubernetesOptions) -> str:
    """The ``kubectl`` command that brings the environment's SSH port to the engineer's
    machine (``localhost:<ssh_port>``)."""
    return (
        f"kubectl -n {options.namespace} port-forward "
        f"service/{object_name(workspace.workspace_id)} {options.ssh_port}:{SSH_PORT_NAME}"
    )


def connection(workspace: Workspace, options: KubernetesOptions) -> Connection:
    """The IDE's URL and the ``ssh`` command: through the ingress host and a ``kubectl
    port-forward`` when there is an ingress host (the engineer is outside the cluster), else
    the Service's in-cluster address for both."""
    host = service_host(workspace, options)
    url = None
    if workspace.spec.ide != "ssh":
        url = (
            f"https://{options.ingress_host}{base_path(workspace)}"
            if options.ingress_host
            else f"http://{host}:{options.ide_port}/"
        )
    ide = workspace.spec.ide if url is not None else None
    if not options.ingress_host:
        return Connection(
            url=url, ssh=f"ssh -p {options.ssh_port} {options.ssh_user}@{host}", ide=ide
        )
    # Every environment is localhost:<ssh_port> through its tunnel: the alias keeps each one's
    # host key apart in known_hosts.
    ssh = (
        f"ssh -p {options.ssh_port} -o HostKeyAlias={object_name(workspace.workspace_id)} "
        f"{options.ssh_user}@localhost"
    )
    return Connection(url=url, ssh=ssh, ssh_tunnel=port_forward(workspace, options), ide=ide)
