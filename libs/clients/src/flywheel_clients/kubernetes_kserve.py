"""A KServe ``InferenceService`` canary driver: deploy, split traffic, promote, roll back.

KServe (``serving.kserve.io/v1beta1``, serverless mode) keeps one predictor spec and tracks the
last revision that had 100 % of the traffic (``latestRolledoutRevision``). A canary is the spec
moved to the new ``storageUri`` with ``canaryTrafficPercent`` set: the newest ready revision
gets that share and the last rolled-out one the rest. So:

* **start** patches the new ``storageUri`` and the percentage together, remembering the stable
  ``storageUri`` (and model version) in annotations, so a rollback needs no outside state;
* **step** patches only ``canaryTrafficPercent``;
* **promote** removes ``canaryTrafficPercent`` (``null`` in a merge patch) with the spec on the
  new ``storageUri``: the newest revision takes 100 % and becomes the rolled-out one;
* **roll back** sets ``canaryTrafficPercent: 0`` and puts the previous ``storageUri`` back: all
  traffic returns at once to the last rolled-out revision (which serves the previous model),
  and the spec says what is served again. The service stays pinned at 0 % until the next
  canary starts, which is harmless: the newest revision then serves the same model.

Every change is one merge patch; the read-then-write in ``start`` carries the
``resourceVersion`` it read, so a concurrent writer makes it fail with ``ConflictError`` rather
than be overwritten. Canary traffic needs KServe's serverless (Knative) mode, which the built
service asks for in its annotations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from flywheel_clients.kubernetes import (
    KubeConnection,
    KubeObjects,
    Resource,
    object_key,
)
from flywheel_runtime.errors import InvalidInputError, NotFoundError

__all__ = [
    "DEPLOYMENT_MODE",
    "INFERENCE_SERVICE",
    "MODEL_VERSION",
    "PREVIOUS_MODEL_VERSION",
    "PREVIOUS_STORAGE_URI",
    "InferenceServiceSpec",
    "KServeCanary",
    "ServiceStatus",
    "TrafficTarget",
    "inference_service",
    "service_status",
]

INFERENCE_SERVICE: Final = Resource(
    "serving.kserve.io/v1beta1", "InferenceService", "inferenceservices"
)

DEPLOYMENT_MODE: Final = "serving.kserve.io/deploymentMode"
PREVIOUS_STORAGE_URI: Final = "flywheel.dev/previous-storage-uri"
"""Annotation: the ``storageUri`` that served 100 % before the canary started."""
MODEL_VERSION: Final = "flywheel.dev/model-version"
"""Annotation: the registry version the spec's ``storageUri`` holds, when the caller says."""
PREVIOUS_MODEL_VERSION: Final = "flywheel.dev/previous-model-version"

DNS_1035: Final = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


class InferenceServiceSpec(BaseModel):
    """What to serve and how: the parts of an ``InferenceService`` Flywheel sets."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=DNS_1035, max_length=45)
    """KServe derives Knative and Istio names from it; longer names break those."""
    namespace: str = Field(pattern=DNS_1035, max_length=63)
    storage_uri: str = Field(pattern=r"^[a-z][a-z0-9+.-]*://.+")
    """For Triton: a model repository (``s3://flywheel-models/triton/<line>/``) holding
    ``<model>/config.pbtxt`` and ``<model>/<version>/model.onnx``."""
    model_format: Literal["triton", "onnx"] = "triton"
    runtime: str | None = None
    """ServingRuntime to use; unset: KServe picks one that supports the format."""
    protocol_version: Literal["v1", "v2", "grpc-v2"] = "v2"
    service_account: str | None = None
    """Service account carrying the S3 credentials KServe's storage initializer uses."""
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int | None = Field(default=None, ge=1)
    cpu: str = "1"
    memory: str = "2Gi"
    gpus: int = Field(default=0, ge=0)
    model_version: str | None = None
    """Registry version being served; recorded in an annotation."""
    labels: Mapping[str, str] = Field(default_factory=dict)
    annotations: Mapping[str, str] = Field(default_factory=dict)


def inference_service(
    spec: InferenceServiceSpec, *, canary_percent: int | None = None
) -> dict[str, Any]:
    """The ``InferenceService`` object for a spec (what ``KServeCanary.deploy`` creates)."""
    resources: dict[str, str] = {"cpu": spec.cpu, "memory": spec.memory}
    if spec.gpus:
        resources["nvidia.com/gpu"] = str(spec.gpus)
    model: dict[str, Any] = {
        "modelFormat": {"name": spec.model_format},
        "protocolVersion": spec.protocol_version,
        "storageUri": spec.storage_uri,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
    }
    if spec.runtime:
        model["runtime"] = spec.runtime
    predictor: dict[str, Any] = {"minReplicas": spec.min_replicas, "model": model}
    if spec.max_replicas is not None:
        predictor["maxReplicas"] = spec.max_replicas
    if spec.service_account:
        predictor["serviceAccountName"] = spec.service_account
    if canary_percent is not None:
        predictor["canaryTrafficPercent"] = _percent(canary_percent)
    annotations = {DEPLOYMENT_MODE: "Serverless", **spec.annotations}
    if spec.model_version is not None:
        annotations[MODEL_VERSION] = spec.model_version
    return {
        "apiVersion": INFERENCE_SERVICE.api_version,
        "kind": INFERENCE_SERVICE.kind,
        "metadata": {
            "name": spec.name,
            "namespace": spec.namespace,
            "labels": {"app.kubernetes.io/managed-by": "flywheel", **spec.labels},
            "annotations": annotations,
        },
        "spec": {"predictor": predictor},
    }


class TrafficTarget(BaseModel):
    """One entry of the predictor's traffic split."""

    model_config = ConfigDict(frozen=True)

    revision: str | None
    percent: int
    latest: bool = False
    tag: str | None = None


class ServiceStatus(BaseModel):
    """What an ``InferenceService`` says about its spec, readiness, revisions and traffic."""

    model_config = ConfigDict(frozen=True)

    name: str
    namespace: str | None
    generation: int | None
    observed_generation: int | None
    ready: bool
    """The ``Ready`` condition is ``True``."""
    message: str | None = None
    """Why it is not ready, as the ``Ready`` condition says."""
    url: str | None = None
    storage_uri: str | None
    """What the spec serves (during a canary: the canary)."""
    canary_percent: int | None
    """``canaryTrafficPercent`` of the spec; None when no split is asked for."""
    model_version: str | None = None
    previous_storage_uri: str | None = None
    previous_model_version: str | None = None
    latest_created_revision: str | None = None
    latest_ready_revision: str | None = None
    latest_rolledout_revision: str | None = None
    previous_rolledout_revision: str | None = None
    traffic: tuple[TrafficTarget, ...] = ()

    @property
    def up_to_date(self) -> bool:
        """The status describes the current spec (KServe has seen the last change)."""
        return self.generation is not None and self.observed_generation == self.generation

    @property
    def newest_ready(self) -> bool:
        """The revision of the current spec is ready to take traffic."""
        return (
            self.up_to_date
            and self.latest_ready_revision is not None
            and self.latest_ready_revision == self.latest_created_revision
        )

    @property
    def canary_traffic(self) -> int:
        """Percent of traffic the newest ready revision gets while it is not rolled out."""
        canary = self.latest_ready_revision
        if canary is None or canary == self.latest_rolledout_revision:
            return 0
        return sum(t.percent for t in self.traffic if t.revision == canary)

    @property
    def rolled_out(self) -> bool:
        """No split asked for, and the newest revision is ready and serves everything."""
        return (
            self.canary_percent is None
            and self.newest_ready
            and self.latest_rolledout_revision == self.latest_ready_revision
        )


def service_status(obj: Mapping[str, Any]) -> ServiceStatus:
    """Read an ``InferenceService`` object (as the API returns it) into a ``ServiceStatus``."""
    metadata = obj.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    predictor = (obj.get("spec") or {}).get("predictor") or {}
    model = predictor.get("model") or {}
    status = obj.get("status") or {}
    component = (status.get("components") or {}).get("predictor") or {}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    percent = predictor.get("canaryTrafficPercent")
    return ServiceStatus(
        name=str(metadata.get("name", "")),
        namespace=metadata.get("namespace"),
        generation=metadata.get("generation"),
        observed_generation=status.get("observedGeneration"),
        ready=bool(ready and ready.get("status") == "True"),
        message=(ready or {}).get("message")
        if not (ready and ready.get("status") == "True")
        else None,
        url=status.get("url"),
        storage_uri=model.get("storageUri"),
        canary_percent=int(percent) if percent is not None else None,
        model_version=annotations.get(MODEL_VERSION),
        previous_storage_uri=annotations.get(PREVIOUS_STORAGE_URI),
        previous_model_version=annotations.get(PREVIOUS_MODEL_VERSION),
        latest_created_revision=component.get("latestCreatedRevision"),
        latest_ready_revision=component.get("latestReadyRevision"),
        latest_rolledout_revision=component.get("latestRolledoutRevision"),
        previous_rolledout_revision=component.get("previousRolledoutRevision"),
        traffic=tuple(
            TrafficTarget(
                revision=t.get("revisionName"),
                percent=int(t.get("percent") or 0),
                latest=bool(t.get("latestRevision", False)),
                tag=t.get("tag"),
            )
            for t in component.get("traffic") or []
        ),
    )


class KServeCanary:
    """Moves one ``InferenceService`` from model version to model version through a canary.

    Every method is a coroutine and returns the service's status right after its change;
    readiness and traffic follow as KServe reconciles, so callers poll ``status()``.
    """

    def __init__(self, objects: KubeObjects, *, namespace: str, name: str) -> None:
        self._objects = objects
        self._namespace = namespace
        self._name = name

    @classmethod
    def connect(cls, connection: KubeConnection, *, namespace: str, name: str) -> KServeCanary:
        return cls(KubeObjects(connection), namespace=namespace, name=name)

    @property
    def name(self) -> str:
        return self._name

    async def deploy(self, spec: InferenceServiceSpec) -> ServiceStatus:
        """Create the service serving ``spec`` at 100 %, or return the one already there."""
        if (spec.namespace, spec.name) != (self._namespace, self._name):
            raise InvalidInputError(
                "the spec names another InferenceService",
                details={"expected": f"{self._namespace}/{self._name}"},
            )
        obj, _ = await self._objects.create_or_get(
            INFERENCE_SERVICE, inference_service(spec), namespace=self._namespace
        )
        return service_status(obj)

    async def status(self) -> ServiceStatus:
        """Where the service stands; ``NotFoundError`` when it does not exist."""
        obj = await self._objects.get(INFERENCE_SERVICE, self._name, namespace=self._namespace)
        if obj is None:
            raise NotFoundError(
                f"{object_key(INFERENCE_SERVICE, self._name, self._namespace)} not found"
            )
        return service_status(obj)

    async def start(
        self, storage_uri: str, percent: int, *, model_version: str | None = None
    ) -> ServiceStatus:
        """Send ``percent`` of the traffic to a revision serving ``storage_uri``.

        Idempotent: starting the same canary again only sets the percentage. Starting another
        canary while one runs keeps the stable ``storageUri`` as the one to roll back to.
        """
        percent = _percent(percent)
        obj = await self._objects.get(INFERENCE_SERVICE, self._name, namespace=self._namespace)
        if obj is None:
            raise NotFoundError(
                f"{object_key(INFERENCE_SERVICE, self._name, self._namespace)} not found: "
                "deploy it first"
            )
        current = service_status(obj)
        predictor: dict[str, Any] = {"canaryTrafficPercent": percent}
        metadata: dict[str, Any] = {"resourceVersion": obj["metadata"].get("resourceVersion")}
        if current.storage_uri != storage_uri:
            in_canary = current.canary_percent is not None and current.previous_storage_uri
            stable_uri = current.previous_storage_uri if in_canary else current.storage_uri
            stable_version = current.previous_model_version if in_canary else current.model_version
            predictor["model"] = {"storageUri": storage_uri}
            metadata["annotations"] = {
                PREVIOUS_STORAGE_URI: stable_uri,
                PREVIOUS_MODEL_VERSION: stable_version,
                MODEL_VERSION: model_version,
            }
        elif model_version is not None:
            metadata["annotations"] = {MODEL_VERSION: model_version}
        return await self._patch({"metadata": metadata, "spec": {"predictor": predictor}})

    async def set_traffic(self, percent: int) -> ServiceStatus:
        """Move the canary to ``percent`` of the traffic (a step of the rollout)."""
        return await self._patch(
            {"spec": {"predictor": {"canaryTrafficPercent": _percent(percent)}}}
        )

    async def promote(self, storage_uri: str | None = None) -> ServiceStatus:
        """Give the canary all the traffic: the spec stays on (or moves to) its
        ``storage_uri`` and ``canaryTrafficPercent`` is removed."""
        predictor: dict[str, Any] = {"canaryTrafficPercent": None}
        if storage_uri is not None:
            predictor["model"] = {"storageUri": storage_uri}
        return await self._patch(
            {
                "metadata": {
                    "annotations": {PREVIOUS_STORAGE_URI: None, PREVIOUS_MODEL_VERSION: None}
                },
                "spec": {"predictor": predictor},
            }
        )

    async def rollback(self, previous_storage_uri: str | None = None) -> ServiceStatus:
        """All traffic back to the last rolled-out revision, and the spec back on the
        previous ``storageUri`` (given, or the one ``start`` remembered)."""
        current = await self.status()
        previous = previous_storage_uri or current.previous_storage_uri
        predictor: dict[str, Any] = {"canaryTrafficPercent": 0}
        annotations: dict[str, Any] = {PREVIOUS_STORAGE_URI: None, PREVIOUS_MODEL_VERSION: None}
        if previous is not None:
            predictor["model"] = {"storageUri": previous}
            annotations[MODEL_VERSION] = current.previous_model_version
        return await self._patch(
            {"metadata": {"annotations": annotations}, "spec": {"predictor": predictor}}
        )

    async def delete(self) -> bool:
        """Remove the service; False when there was none."""
        return await self._objects.delete(
            INFERENCE_SERVICE, self._name, namespace=self._namespace, propagation="Background"
        )

    async def _patch(self, patch: Mapping[str, Any]) -> ServiceStatus:
        obj = await self._objects.patch(
            INFERENCE_SERVICE, self._name, patch, namespace=self._namespace
        )
        return service_status(obj)


def _percent(value: int) -> int:
    if isinstance(value, bool) or not 0 <= value <= 100:
        raise InvalidInputError(
            "canary traffic is a whole percentage from 0 to 100", details={"percent": value}
        )
    return value
