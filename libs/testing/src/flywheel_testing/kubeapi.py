"""A stand-in Kubernetes API server for tests: objects stored per path, on a free local port.

It is not a cluster: no controller runs, nothing is validated against a schema. Tests play the
controllers (``set_status``, ``put`` a pod, ``patch``, ``set_log``) and check what clients sent
(``requests``, ``objects``). The official client talks to it through
``Configuration.host = server.url``. What it answers, with real status codes and ``Status``
bodies:

* ``/api/v1/...`` and ``/apis/<group>/<version>/...``, namespaced and cluster-scoped;
* POST on a collection creates (409 ``AlreadyExists`` when the name is taken), filling in
  ``uid``, ``resourceVersion``, ``generation``, ``creationTimestamp`` and the namespace;
* GET of an object or a collection (``labelSelector`` with ``=``, ``==``, ``!=``, ``key``,
  ``!key``), 404 ``NotFound``;
* PATCH as merge patch or strategic merge patch (both applied as an RFC 7386 JSON merge
  patch), and PUT; a ``metadata.resourceVersion`` that is not the current one is a 409
  ``Conflict``; a spec change bumps ``generation``; ``.../status`` writes only ``status``;
  JSON Patch (a list of operations) is refused with 415, so a client sending the wrong content
  type is caught;
* DELETE, taking objects whose ``ownerReferences`` name it along (unless ``Orphan``);
* ``/api/v1/namespaces/<ns>/pods/<name>/log`` from ``set_log`` (``tailLines``, ``container``).
"""

from __future__ import annotations

import copy
import itertools
import json
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from flywheel_testing.net import LOCALHOST

__all__ = ["KubeApiServer", "RecordedRequest", "kube_api", "merge_patch"]

_MERGE_TYPES = frozenset({"application/merge-patch+json", "application/strategic-merge-patch+json"})


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str | None
    body: Any


@dataclass(frozen=True)
class _Path:
    prefix: str
    """``api/v1`` or ``apis/<group>/<version>``."""
    namespace: str | None
    plural: str
    name: str | None
    subresource: str | None

    @property
    def collection(self) -> tuple[str, str | None, str]:
        return (self.prefix, self.namespace, self.plural)


@dataclass(frozen=True)
class _Failure:
    method: str
    path_contains: str
    status: int


@dataclass
class _State:
    objects: dict[tuple[str, str | None, str], dict[str, dict[str, Any]]] = field(
        default_factory=dict
    )
    logs: dict[tuple[str, str, str | None], str] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    failures: list[_Failure] = field(default_factory=list)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, ``null`` removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _parse(raw_path: str) -> _Path | None:
    parts = [unquote(p) for p in raw_path.strip("/").split("/") if p]
    if len(parts) >= 2 and parts[0] == "api" and parts[1] == "v1":
        prefix, rest = "api/v1", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        prefix, rest = f"apis/{parts[1]}/{parts[2]}", parts[3:]
    else:
        return None
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest or len(rest) > 3:
        return None
    return _Path(
        prefix,
        namespace,
        rest[0],
        rest[1] if len(rest) > 1 else None,
        rest[2] if len(rest) > 2 else None,
    )


def _matches(labels: Mapping[str, str], selector: str) -> bool:
    for raw in selector.split(","):
        term = raw.strip()
        if not term:
            continue
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def _first(query: Mapping[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[0] if values else None


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure" if code >= 400 else "Success",
        "message": message,
        "reason": reason,
        "code": code,
    }


class KubeApiServer:
    """A threaded HTTP server answering the Kubernetes API paths clients call."""

    def __init__(self, host: str = LOCALHOST, port: int = 0) -> None:
        self._lock = threading.RLock()
        self._state = _State()
        self._versions = itertools.count(1)
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> KubeApiServer:
        # A short poll interval: shutdown() waits for it, once per test.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="kube-api", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> KubeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what tests use -------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._state.requests)

    def requests_to(self, method: str, path_contains: str = "") -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == method and path_contains in r.path]

    def get(self, path: str) -> dict[str, Any] | None:
        """The stored object at an API path (a copy), or None."""
        where = self._where(path)
        with self._lock:
            found = self._state.objects.get(where.collection, {}).get(where.name or "")
            return copy.deepcopy(found) if found is not None else None

    def objects(self, path: str) -> list[dict[str, Any]]:
        """Every stored object of a collection path, e.g. ``/apis/batch/v1/namespaces/ns/jobs``."""
        where = self._where(path, collection=True)
        with self._lock:
            return [
                copy.deepcopy(o) for o in self._state.objects.get(where.collection, {}).values()
            ]

    def put(self, path: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Store an object at its collection path (as a controller would create it)."""
        where = self._where(path, collection=True)
        with self._lock:
            stored = self._create(where, dict(copy.deepcopy(obj)))
            return copy.deepcopy(stored)

    def set_status(self, path: str, status: Mapping[str, Any]) -> dict[str, Any]:
        """Replace an object's ``status`` (what its controller would report)."""
        where = self._where(path)
        with self._lock:
            obj = self._state.objects[where.collection][where.name or ""]
            obj["status"] = copy.deepcopy(dict(status))
            obj["metadata"]["resourceVersion"] = str(next(self._versions))
            return copy.deepcopy(obj)

    def patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """Merge-patch a stored object as another client would (a sidecar annotating its pod)."""
        where = self._where(path)
        with self._lock:
            obj = self._state.objects[where.collection][where.name or ""]
            updated = merge_patch(obj, dict(patch))
            updated["metadata"]["resourceVersion"] = str(next(self._versions))
            self._state.objects[where.collection][where.name or ""] = updated
            return copy.deepcopy(updated)

    def set_log(self, namespace: str, pod: str, text: str, container: str | None = None) -> None:
        """The log a pod's container (or any container, when None) returns."""
        with self._lock:
            self._state.logs[(namespace, pod, container)] = text

    def fail(self, method: str, path_contains: str, status: int) -> None:
        """Answer the next matching request with ``status`` (once per call)."""
        with self._lock:
            self._state.failures.append(_Failure(method, path_contains, status))

    def delete(self, path: str) -> bool:
        where = self._where(path)
        with self._lock:
            return self._delete(where, "Background")

    # --- the API --------------------------------------------------------------------------

    def _where(self, path: str, *, collection: bool = False) -> _Path:
        where = _parse(path)
        if where is None or (where.name is None) != collection:
            kind = "collection" if collection else "object"
            raise ValueError(f"not an API {kind} path: {path}")
        return where

    def _create(self, where: _Path, obj: dict[str, Any]) -> dict[str, Any]:
        metadata = obj.setdefault("metadata", {})
        name = metadata.get("name")
        if not name and metadata.get("generateName"):
            name = f"{metadata['generateName']}{uuid.uuid4().hex[:5]}"
        metadata.update(
            name=name,
            uid=str(uuid.uuid4()),
            resourceVersion=str(next(self._versions)),
            generation=1,
            creationTimestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        if where.namespace is not None:
            metadata["namespace"] = where.namespace
        self._state.objects.setdefault(where.collection, {})[str(name)] = obj
        return obj

    def _delete(self, where: _Path, propagation: str) -> bool:
        collection = self._state.objects.get(where.collection, {})
        obj = collection.pop(where.name or "", None)
        if obj is None:
            return False
        if propagation != "Orphan":
            self._delete_dependents(str(obj["metadata"]["uid"]))
        return True

    def _delete_dependents(self, uid: str) -> None:
        for objects in self._state.objects.values():
            for name, obj in list(objects.items()):
                owners = obj.get("metadata", {}).get("ownerReferences") or []
                if any(owner.get("uid") == uid for owner in owners):
                    del objects[name]
                    self._delete_dependents(str(obj["metadata"]["uid"]))

    def _handle(
        self, method: str, raw: str, content_type: str | None, data: bytes
    ) -> tuple[int, str, bytes]:
        url = urlsplit(raw)
        query = parse_qs(url.query)
        body: Any = None
        if data:
            try:
                body = json.loads(data)
            except ValueError:
                return self._error(400, "BadRequest", "the body is not JSON")
        with self._lock:
            self._state.requests.append(
                RecordedRequest(method, url.path, query, content_type, copy.deepcopy(body))
            )
            for failure in self._state.failures:
                if failure.method == method and failure.path_contains in url.path:
                    self._state.failures.remove(failure)
                    return self._error(failure.status, "InternalError", "injected failure")
            where = _parse(url.path)
            if where is None:
                return self._error(404, "NotFound", f"no API at {url.path}")
            if where.subresource == "log" and method == "GET":
                return self._log(where, query)
            return self._dispatch(method, where, query, content_type, body)

    def _dispatch(
        self,
        method: str,
        where: _Path,
        query: dict[str, list[str]],
        content_type: str | None,
        body: Any,
    ) -> tuple[int, str, bytes]:
        collection = self._state.objects.setdefault(where.collection, {})
        if where.name is None:
            if method == "GET":
                selector = _first(query, "labelSelector") or ""
                items = [
                    o
                    for o in collection.values()
                    if _matches(o.get("metadata", {}).get("labels") or {}, selector)
                ]
                return self._json(200, {"kind": "List", "apiVersion": "v1", "items": items})
            if method == "POST":
                if not isinstance(body, dict):
                    return self._error(400, "BadRequest", "an object is required")
                name = body.get("metadata", {}).get("name")
                if name in collection:
                    return self._error(
                        409, "AlreadyExists", f'{where.plural} "{name}" already exists'
                    )
                return self._json(201, self._create(where, copy.deepcopy(body)))
            return self._error(405, "MethodNotAllowed", f"{method} on a collection")
        obj = collection.get(where.name)
        if obj is None:
            return self._error(404, "NotFound", f'{where.plural} "{where.name}" not found')
        if method == "GET":
            return self._json(200, obj)
        if method == "DELETE":
            policy = _first(query, "propagationPolicy")
            if isinstance(body, dict):
                policy = body.get("propagationPolicy") or policy
            self._delete(where, policy or "Background")
            return self._json(200, _status(200, "", f'{where.plural} "{where.name}" deleted'))
        if method in ("PATCH", "PUT"):
            return self._write(method, where, obj, content_type, body)
        return self._error(405, "MethodNotAllowed", f"{method} on an object")

    def _write(
        self,
        method: str,
        where: _Path,
        obj: dict[str, Any],
        content_type: str | None,
        body: Any,
    ) -> tuple[int, str, bytes]:
        media = (content_type or "").split(";")[0].strip()
        if method == "PATCH" and media not in _MERGE_TYPES:
            return self._error(415, "UnsupportedMediaType", f"patch type {media!r} not served")
        if not isinstance(body, dict):
            return self._error(400, "BadRequest", "an object is required")
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        current = obj["metadata"]["resourceVersion"]
        if wanted is not None and str(wanted) != current:
            return self._error(409, "Conflict", "the object has been modified")
        if where.subresource == "status":
            updated = dict(obj)
            status = body.get("status")
            updated["status"] = (
                merge_patch(obj.get("status"), status) if method == "PATCH" else status
            )
        else:
            updated = merge_patch(obj, body) if method == "PATCH" else copy.deepcopy(body)
            updated["status"] = obj.get("status")
            if updated.get("status") is None:
                updated.pop("status", None)
        metadata = updated.setdefault("metadata", {})
        for key in ("name", "namespace", "uid", "creationTimestamp", "generation"):
            if key in obj["metadata"]:
                metadata[key] = obj["metadata"][key]
        if updated.get("spec") != obj.get("spec"):
            metadata["generation"] = int(obj["metadata"].get("generation", 1)) + 1
        metadata["resourceVersion"] = str(next(self._versions))
        self._state.objects[where.collection][where.name or ""] = updated
        return self._json(200, updated)

    def _log(self, where: _Path, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        if where.namespace is None or where.name is None:
            return self._error(404, "NotFound", "no such pod")
        if where.name not in self._state.objects.get(where.collection, {}):
            return self._error(404, "NotFound", f'pods "{where.name}" not found')
        container = _first(query, "container")
        logs = self._state.logs
        text = logs.get((where.namespace, where.name, container))
        if text is None:
            text = logs.get((where.namespace, where.name, None), "")
        tail = _first(query, "tailLines")
        if tail is not None:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-int(tail) :]) if int(tail) > 0 else ""
        return 200, "text/plain", text.encode()

    @staticmethod
    def _json(code: int, payload: Any) -> tuple[int, str, bytes]:
        return code, "application/json", json.dumps(payload).encode()

    def _error(self, code: int, reason: str, message: str) -> tuple[int, str, bytes]:
        return self._json(code, _status(code, reason, message))

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body leave in two writes; with Nagle on, each response waits for
            # the client's delayed ACK (~40 ms).
            disable_nagle_algorithm = True

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length) if length else b""
                code, media, payload = server._handle(
                    self.command, self.path, self.headers.get("Content-Type"), data
                )
                self.send_response(code, HTTPStatus(code).phrase)
                self.send_header("Content-Type", media)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

            def log_message(self, *args: Any) -> None:
                """Quiet: tests read ``requests`` instead."""

        return Handler


@pytest.fixture
def kube_api() -> Iterator[KubeApiServer]:
    """A fresh stand-in Kubernetes API server for one test; ``.url`` is its host."""
    with KubeApiServer() as server:
        yield server
