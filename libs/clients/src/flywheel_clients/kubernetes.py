"""Kubernetes API access for Flywheel's adapters: one connection model, async calls, plain dicts.

The official ``kubernetes`` client is synchronous, so each request runs in a worker thread and
the event loop keeps serving. Objects travel as plain dicts in the API's own JSON form, which is
what the manifest builders produce and what CRD schemas validate, for built-in kinds and custom
resources alike. The client's model classes are not used: they drop fields they do not know,
and the generated log reader turns a log that happens to be valid JSON into a Python repr. The
client still does what it is good at: kubeconfig and in-cluster credentials, TLS, token refresh.

Failures become the platform's errors: an API server that does not answer, or answers 5xx or
429, is ``DependencyUnavailableError`` (retryable); 404 is ``NotFoundError``; 409 is
``ConflictError``; anything else is ``KubernetesError`` carrying the API server's message (an
admission webhook's refusal, a schema error), which is what an operator needs to fix it.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import quote

import urllib3
from kubernetes import config as kube_config
from kubernetes.client import ApiClient, Configuration
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from pydantic import BaseModel, ConfigDict, Field

from flywheel_runtime.errors import (
    ConflictError,
    DependencyUnavailableError,
    FlywheelError,
    NotFoundError,
)

__all__ = [
    "CONFIG_MAP",
    "JOB",
    "LOCAL_QUEUE",
    "MERGE_PATCH",
    "POD",
    "PYTORCH_JOB",
    "STRATEGIC_MERGE_PATCH",
    "KubeConnection",
    "KubeObjects",
    "KubernetesError",
    "Propagation",
    "Resource",
    "api_client",
    "object_key",
]

MERGE_PATCH: Final = "application/merge-patch+json"
"""RFC 7386 JSON merge patch: what custom resources accept; ``null`` removes a field."""

STRATEGIC_MERGE_PATCH: Final = "application/strategic-merge-patch+json"
"""Built-in kinds only: lists merge by key instead of being replaced."""

Propagation = Literal["Foreground", "Background", "Orphan"]


class KubernetesError(FlywheelError):
    """The API server refused a request for a reason retrying will not fix."""

    code = "kubernetes_error"
    http_status = 502


class KubeConnection(BaseModel):
    """How to reach one cluster's API server."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    mode: Literal["auto", "in_cluster", "kubeconfig"] = "auto"
    """``auto``: the pod's service account when running in a cluster, else the kubeconfig."""

    kubeconfig: Path | None = None
    """Kubeconfig file; unset: ``$KUBECONFIG`` or ``~/.kube/config``."""

    context: str | None = None
    """Kubeconfig context; unset: the file's current context."""

    host: str | None = None
    """API server URL used as is, without credentials (``kubectl proxy``, a test server);
    wins over ``mode``."""

    request_timeout_s: float = Field(default=15.0, gt=0)
    """Longest one API request may take."""


def api_client(connection: KubeConnection) -> ApiClient:
    """An official ``ApiClient`` for the connection; reads files, connects to nothing."""
    configuration = Configuration()
    try:
        if connection.host:
            configuration.host = connection.host.rstrip("/")
        elif connection.mode == "in_cluster" or (
            connection.mode == "auto" and os.environ.get("KUBERNETES_SERVICE_HOST")
        ):
            kube_config.load_incluster_config(client_configuration=configuration)
        else:
            kube_config.load_kube_config(
                config_file=str(connection.kubeconfig) if connection.kubeconfig else None,
                context=connection.context,
                client_configuration=configuration,
                persist_config=False,
            )
    except (ConfigException, OSError) as error:
        raise KubernetesError(f"cannot load the Kubernetes configuration: {error}") from error
    return ApiClient(configuration)


@dataclass(frozen=True)
class Resource:
    """A kind of object and where the API serves it."""

    api_version: str
    """``v1`` for the core group, else ``<group>/<version>``."""
    kind: str
    plural: str
    namespaced: bool = True

    def path(
        self, namespace: str | None = None, name: str | None = None, subresource: str | None = None
    ) -> str:
        """The API path of the collection, of one object, or of one object's subresource."""
        root = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        parts = [root]
        if self.namespaced:
            if namespace is None:
                raise ValueError(f"{self.kind} is namespaced: give a namespace")
            parts.append(f"namespaces/{_segment(namespace)}")
        parts.append(self.plural)
        if name is not None:
            parts.append(_segment(name))
            if subresource is not None:
                parts.append(subresource)
        return "/".join(parts)


JOB: Final = Resource("batch/v1", "Job", "jobs")
POD: Final = Resource("v1", "Pod", "pods")
CONFIG_MAP: Final = Resource("v1", "ConfigMap", "configmaps")
PYTORCH_JOB: Final = Resource("kubeflow.org/v1", "PyTorchJob", "pytorchjobs")
LOCAL_QUEUE: Final = Resource("kueue.x-k8s.io/v1beta2", "LocalQueue", "localqueues")


def object_key(resource: Resource, name: str, namespace: str | None) -> str:
    """How errors and logs name an object: ``Job flywheel/train-1``."""
    return f"{resource.kind} {namespace}/{name}" if namespace else f"{resource.kind} {name}"


def _segment(value: str) -> str:
    if not value or "/" in value:
        raise ValueError(f"not a valid object name or namespace: {value!r}")
    return quote(value, safe="")


class KubeObjects:
    """Create, read, patch and delete objects of any kind, as dicts, without blocking the loop.

    The ``ApiClient`` is built on first use, so constructing this object reads no file and
    needs no cluster.
    """

    def __init__(self, connection: KubeConnection, *, client: ApiClient | None = None) -> None:
        self._connection = connection
        self._client = client
        self._lock = threading.Lock()

    @property
    def connection(self) -> KubeConnection:
        return self._connection

    async def create(
        self, resource: Resource, body: Mapping[str, Any], *, namespace: str | None = None
    ) -> dict[str, Any]:
        """Create an object; ``ConflictError`` when its name is taken."""
        what = object_key(resource, str(body.get("metadata", {}).get("name", "?")), namespace)
        return await self._object("POST", resource.path(namespace), what, body=body)

    async def create_or_get(
        self, resource: Resource, body: Mapping[str, Any], *, namespace: str | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Create an object, or read the one already there under its name (created: False).

        With deterministic names this makes a create idempotent: a retried or repeated create
        returns the first one's object. The caller checks that the object found is its own.
        """
        name = str(body["metadata"]["name"])
        try:
            return await self.create(resource, body, namespace=namespace), True
        except ConflictError:
            existing = await self.get(resource, name, namespace=namespace)
            if existing is None:
                # Deleted between our create and read (a finished object's TTL, say): once more.
                return await self.create(resource, body, namespace=namespace), True
            return existing, False

    async def get(
        self, resource: Resource, name: str, *, namespace: str | None = None
    ) -> dict[str, Any] | None:
        """The object, or None when there is none by that name."""
        try:
            return await self._object(
                "GET", resource.path(namespace, name), object_key(resource, name, namespace)
            )
        except NotFoundError:
            return None

    async def list_objects(
        self,
        resource: Resource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> list[dict[str, Any]]:
        """Objects of one kind in a namespace, optionally filtered by labels."""
        query = [("labelSelector", label_selector)] if label_selector else []
        listing = await self._object(
            "GET", resource.path(namespace), f"{resource.kind} list", query=query
        )
        items = listing.get("items") or []
        return [item for item in items if isinstance(item, dict)]

    async def patch(
        self,
        resource: Resource,
        name: str,
        patch: Mapping[str, Any],
        *,
        namespace: str | None = None,
        content_type: str = MERGE_PATCH,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """Patch an object (a JSON merge patch unless told otherwise); returns the result."""
        return await self._object(
            "PATCH",
            resource.path(namespace, name, subresource),
            object_key(resource, name, namespace),
            body=patch,
            content_type=content_type,
        )

    async def delete(
        self,
        resource: Resource,
        name: str,
        *,
        namespace: str | None = None,
        propagation: Propagation = "Foreground",
    ) -> bool:
        """Delete an object and, with the propagation policy, what it owns; False if absent."""
        try:
            await self._object(
                "DELETE",
                resource.path(namespace, name),
                object_key(resource, name, namespace),
                body={
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "propagationPolicy": propagation,
                },
            )
        except NotFoundError:
            return False
        return True

    async def read_log(
        self,
        pod: str,
        *,
        namespace: str,
        container: str | None = None,
        tail_lines: int | None = None,
    ) -> str | None:
        """The end of a pod's container log; None when the pod (or its log) is gone."""
        query: list[tuple[str, str]] = []
        if container:
            query.append(("container", container))
        if tail_lines is not None:
            query.append(("tailLines", str(tail_lines)))
        try:
            data = await self._send(
                "GET",
                POD.path(namespace, pod, "log"),
                object_key(POD, pod, namespace),
                query=query,
                accept="text/plain",
            )
        except NotFoundError:
            return None
        return data.decode("utf-8", errors="replace")

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # --- plumbing -------------------------------------------------------------------------

    async def _object(
        self,
        method: str,
        path: str,
        what: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        data = await self._send(
            method, path, what, query=query, body=body, content_type=content_type
        )
        try:
            decoded = json.loads(data) if data else {}
        except ValueError as error:
            raise KubernetesError(f"{what}: the API server sent something not JSON") from error
        if not isinstance(decoded, dict):
            raise KubernetesError(f"{what}: the API server sent JSON that is not an object")
        return decoded

    async def _send(
        self,
        method: str,
        path: str,
        what: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        accept: str = "application/json",
    ) -> bytes:
        return await asyncio.to_thread(
            self._send_sync, method, path, what, list(query), body, content_type, accept
        )

    def _api(self) -> ApiClient:
        with self._lock:
            if self._client is None:
                self._client = api_client(self._connection)
            return self._client

    def _send_sync(
        self,
        method: str,
        path: str,
        what: str,
        query: list[tuple[str, str]],
        body: Mapping[str, Any] | None,
        content_type: str,
        accept: str,
    ) -> bytes:
        client = self._api()
        headers = {"Accept": accept}
        if body is not None:
            headers["Content-Type"] = content_type
        try:
            response = client.call_api(
                path,
                method,
                query_params=query,
                header_params=headers,
                body=dict(body) if body is not None else None,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=self._connection.request_timeout_s,
            )
            try:
                data: bytes = response.data
            finally:
                response.release_conn()
        except ApiException as error:
            raise _translate(error, method, what) from error
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise DependencyUnavailableError(
                f"the Kubernetes API did not answer ({type(error).__name__})",
                details={"object": what},
            ) from error
        return data


def _translate(error: ApiException, method: str, what: str) -> FlywheelError:
    status = int(error.status or 0)
    message = _status_message(error.body) or str(error.reason or "")
    details = {"object": what, "status": status}
    if status == 404:
        return NotFoundError(f"{what} not found", details=details)
    if status == 409:
        return ConflictError(f"{what}: {message}", details=details)
    if status in (0, 429) or status >= 500:
        return DependencyUnavailableError(
            f"the Kubernetes API is unavailable ({status})", details=details
        )
    return KubernetesError(
        f"Kubernetes refused {method} {what} ({status}): {message}", details=details
    )


def _status_message(body: object) -> str | None:
    """The ``message`` of a ``Status`` body, when the API server sent one."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", errors="replace")
    if not isinstance(body, str) or not body:
        return None
    try:
        status = json.loads(body)
    except ValueError:
        return body[:500]
    if isinstance(status, dict) and isinstance(status.get("message"), str):
        return str(status["message"])
    return None
