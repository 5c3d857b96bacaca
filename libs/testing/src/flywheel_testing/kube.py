"""Offline validation of Kubernetes manifests: built-in kinds and custom resources.

Built-in kinds are checked with ``kubernetes-validate`` in strict mode (unknown fields are
errors). Custom resources are checked against the ``openAPIV3Schema`` of their
CustomResourceDefinition, read from a folder of upstream CRDs stored as JSON (one
``apiextensions.k8s.io/v1`` object per file): ``FLYWHEEL_CRD_DIR`` when set, else
``<repo root>/../shared/crds``. A CRD schema is made as strict as the built-ins: an object that
declares ``properties`` rejects other keys unless the CRD preserves unknown fields there, so a
misspelt field fails here instead of being pruned silently by the API server.

On top of the schemas every object gets the checks the API server makes on metadata (name
syntax, label keys and values) and, for custom resources, on scope: a cluster-scoped kind
carries no namespace. CEL rules (``x-kubernetes-validations``) and admission webhooks are not
evaluated.

    docs = [d for d in yaml.safe_load_all(text) if d]
    validate_manifests(docs)            # raises ManifestError listing every problem
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Final

import jsonschema
import kubernetes_validate
import pytest
from referencing import Registry, Resource

__all__ = [
    "CRD_DIR_ENV",
    "KUBE_VERSION",
    "CrdSchema",
    "ManifestError",
    "crd_dir",
    "is_builtin",
    "load_crd_schemas",
    "validate_manifest",
    "validate_manifests",
]

CRD_DIR_ENV: Final = "FLYWHEEL_CRD_DIR"
"""Environment variable naming the folder of CRD JSON files; overrides the default."""

KUBE_VERSION: Final = "1.30"
"""Kubernetes version manifests are validated against unless a caller asks for another."""

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

# Kinds whose name the API server checks as a DNS-1035 label (it becomes a DNS name).
_DNS1035_KINDS: Final = frozenset({"Service"})
# Kinds whose name must be a DNS-1123 label rather than a subdomain.
_DNS1123_LABEL_KINDS: Final = frozenset({"Namespace"})

_OBJECT_META: Final[dict[str, Any]] = {
    "type": "object",
    "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}],
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
    "additionalProperties": False,
}
"""What a custom resource's ``metadata`` may hold when applied (the CRDs only say ``object``)."""


class ManifestError(Exception):
    """One or more manifests would be refused by the API server; ``problems`` says why."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, eq=False)
class CrdSchema:
    """One served version of a CustomResourceDefinition, with its schema made strict."""

    group: str
    version: str
    kind: str
    namespaced: bool
    deprecated: bool
    schema: dict[str, Any]

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


def _repo_root() -> Path:
    """The checkout holding this file (editable install), else the one around the cwd."""
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        for folder in (start, *start.parents):
            if (folder / "libs").is_dir() and (folder / "pyproject.toml").is_file():
                return folder
    raise FileNotFoundError("no Flywheel checkout found above this file or the working directory")


def crd_dir() -> Path:
    """Folder of the CRD JSON files: ``$FLYWHEEL_CRD_DIR``, else ``<repo root>/../shared/crds``.

    The folder may be missing (a checkout without ``shared/``); callers skip custom-resource
    checks then, saying where they looked.
    """
    override = os.environ.get(CRD_DIR_ENV)
    if override:
        return Path(override)
    return _repo_root().parent / "shared" / "crds"


def require_crds() -> Path:
    """The CRD folder, or skip the calling test: a checkout away from the workspace has none."""
    directory = crd_dir()
    if not directory.is_dir():
        pytest.skip(f"CRD schemas not found at {directory} (set {CRD_DIR_ENV})")
    return directory


def load_crd_schemas(directory: Path | None = None) -> dict[tuple[str, str], CrdSchema]:
    """Every served CRD version in ``directory`` (default ``crd_dir()``) by (apiVersion, kind).

    Raises ``FileNotFoundError`` when the folder does not exist.
    """
    return _load_crd_schemas((directory or crd_dir()).resolve())


@functools.cache
def _load_crd_schemas(directory: Path) -> dict[tuple[str, str], CrdSchema]:
    if not directory.is_dir():
        raise FileNotFoundError(f"no CRD folder at {directory} (set {CRD_DIR_ENV})")
    schemas: dict[tuple[str, str], CrdSchema] = {}
    for path in sorted(directory.glob("*.json")):
        crd = json.loads(path.read_text())
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        spec = crd["spec"]
        for version in spec["versions"]:
            if not version.get("served", False):
                continue
            entry = CrdSchema(
                group=spec["group"],
                version=version["name"],
                kind=spec["names"]["kind"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                deprecated=bool(version.get("deprecated", False)),
                schema=_strict_root(version["schema"]["openAPIV3Schema"]),
            )
            schemas[(entry.api_version, entry.kind)] = entry
    return schemas


def _strict_root(schema: Mapping[str, Any]) -> dict[str, Any]:
    root = _strict(schema)
    properties = root.setdefault("properties", {})
    properties.setdefault("apiVersion", {"type": "string"})
    properties.setdefault("kind", {"type": "string"})
    declared = properties.get("metadata", {})
    meta = copy.deepcopy(_OBJECT_META)
    # Some CRDs constrain metadata further (a name pattern, a length): keep both.
    properties["metadata"] = {"allOf": [meta, declared]} if set(declared) - {"type"} else meta
    return root


def _strict(node: Mapping[str, Any], *, closed: bool = True) -> dict[str, Any]:
    """An OpenAPI v3 structural schema as the JSON Schema the API server effectively applies.

    ``nullable`` admits null, ``x-kubernetes-int-or-string`` admits both, and an object with
    declared ``properties`` (and no ``x-kubernetes-preserve-unknown-fields``) admits no other
    keys, as kubectl's strict field validation reports them. Inside ``anyOf``/``allOf``/
    ``oneOf``/``not`` a structural schema only adds value checks to fields declared outside,
    so objects there stay open (``closed=False``).
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: _strict(child, closed=closed) for name, child in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, Mapping):
            out[key] = _strict(value, closed=closed)
        elif key == "not" and isinstance(value, Mapping):
            out[key] = _strict(value, closed=False)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [_strict(child, closed=False) for child in value]
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string") and "type" not in node and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable"):
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if (
        closed
        and "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _describe(obj: Mapping[str, Any]) -> str:
    metadata = obj.get("metadata") or {}
    name = metadata.get("name", "?") if isinstance(metadata, Mapping) else "?"
    return f"{obj.get('kind', '?')}/{name}"


def is_builtin(obj: Mapping[str, Any], kube_version: str = KUBE_VERSION) -> bool:
    """Whether ``kubernetes-validate`` has a schema for the object's apiVersion and kind."""
    return _builtin_file(obj) in _builtin_files(kube_version)


def _builtin_file(obj: Mapping[str, Any]) -> str:
    # kubernetes-validate's own file naming: apps/v1 Deployment -> deployment-apps-v1.json.
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", str(obj.get("apiVersion", "")))
    return f"{str(obj.get('kind', '')).lower()}-{api}.json"


@functools.cache
def _builtin_files(kube_version: str) -> frozenset[str]:
    return frozenset(path.name for path in _builtin_folder(kube_version).iterdir())


def _builtin_folder(kube_version: str) -> Traversable:
    """``kubernetes-validate``'s strict schemas of the newest version not above the one asked."""
    wanted = _major_minor(kube_version.removeprefix("v"))
    candidates = [v for v in kubernetes_validate.utils.all_versions() if _major_minor(v) <= wanted]
    if not candidates:
        raise ManifestError([f"kubernetes-validate has no schemas for Kubernetes {kube_version}"])
    chosen = max(candidates, key=_major_minor)
    root = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    return root / f"v{chosen}-local-strict"


@functools.cache
def _builtin_validator(kube_version: str, filename: str) -> Any:
    folder = _builtin_folder(kube_version)
    schema = json.loads((folder / filename).read_text())
    definitions = json.loads((folder / "_definitions.json").read_text())
    registry: Registry[Any] = Resource.from_contents(schema) @ Registry()
    registry = Resource.from_contents(definitions) @ registry
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def _metadata_problems(obj: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    metadata = obj.get("metadata")
    if not isinstance(metadata, Mapping):
        return ["metadata is missing"]
    kind = str(obj.get("kind", ""))
    name = metadata.get("name")
    if isinstance(name, str):
        if kind in _DNS1035_KINDS:
            if len(name) > 63 or not _DNS1035_LABEL.match(name):
                problems.append(f"name {name!r} is not a DNS-1035 label (63 chars, a-z first)")
        elif kind in _DNS1123_LABEL_KINDS:
            if len(name) > 63 or not _DNS1123_LABEL.match(name):
                problems.append(f"name {name!r} is not a DNS-1123 label")
        elif len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
            problems.append(f"name {name!r} is not a DNS-1123 subdomain")
    namespace = metadata.get("namespace")
    if isinstance(namespace, str) and (len(namespace) > 63 or not _DNS1123_LABEL.match(namespace)):
        problems.append(f"namespace {namespace!r} is not a DNS-1123 label")
    for key, value in (metadata.get("labels") or {}).items():
        if not _qualified_name_ok(str(key)):
            problems.append(f"label key {key!r} is not a qualified name")
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            problems.append(f"label {key}={value!r} is not a valid label value")
    for key in metadata.get("annotations") or {}:
        if not _qualified_name_ok(str(key)):
            problems.append(f"annotation key {key!r} is not a qualified name")
    return problems


def _qualified_name_ok(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_LABEL_NAME.match(name))


def _schema_problems(error: Any) -> str:
    path = ".".join(str(part) for part in error.absolute_path) or "<root>"
    return f"{path}: {error.message}"


def validate_manifest(
    obj: Mapping[str, Any],
    *,
    kube_version: str = KUBE_VERSION,
    crds: Mapping[tuple[str, str], CrdSchema] | None = None,
    allow_deprecated: bool = False,
) -> None:
    """Raise ``ManifestError`` unless ``obj`` would pass the API server's schema checks.

    Built-in kinds are validated for ``kube_version``; any other kind against its CRD in
    ``crds`` (default: ``load_crd_schemas()``, read only when a custom resource shows up).
    A deprecated CRD version is a problem unless ``allow_deprecated``.
    """
    for key in ("apiVersion", "kind"):
        if not isinstance(obj.get(key), str) or not obj.get(key):
            raise ManifestError([f"{_describe(obj)}: {key} is missing"])
    label = _describe(obj)
    problems = [f"{label}: {problem}" for problem in _metadata_problems(obj)]
    if is_builtin(obj, kube_version):
        validator = _builtin_validator(kube_version, _builtin_file(obj))
        problems += [f"{label}: {_schema_problems(e)}" for e in _errors(validator, obj)]
    else:
        problems += [f"{label}: {problem}" for problem in _custom_problems(obj, crds)]
    if problems:
        raise ManifestError(problems)
    if not allow_deprecated:
        _refuse_deprecated(obj, crds, kube_version)


def _custom_problems(
    obj: Mapping[str, Any], crds: Mapping[tuple[str, str], CrdSchema] | None
) -> list[str]:
    schemas = load_crd_schemas() if crds is None else crds
    entry = schemas.get((str(obj["apiVersion"]), str(obj["kind"])))
    if entry is None:
        known = sorted(f"{a} {k}" for a, k in schemas if k == obj["kind"])
        hint = f" (served: {', '.join(known)})" if known else " (no CRD of that kind)"
        return [f"no schema for {obj['apiVersion']} {obj['kind']}{hint}"]
    problems: list[str] = []
    namespace = (obj.get("metadata") or {}).get("namespace")
    if not entry.namespaced and namespace:
        problems.append(f"{entry.kind} is cluster-scoped but has namespace {namespace!r}")
    validator = _crd_validator(entry)
    return problems + [_schema_problems(error) for error in _errors(validator, obj)]


@functools.cache
def _crd_validator(entry: CrdSchema) -> Any:
    # Draft 4 is the JSON Schema that OpenAPI 3.0 schemas (and so CRDs) are written in.
    return jsonschema.Draft4Validator(entry.schema)


def _errors(validator: Any, obj: Mapping[str, Any]) -> list[Any]:
    errors = list(validator.iter_errors(dict(obj)))
    return sorted(errors, key=lambda e: [str(part) for part in e.absolute_path])


def _refuse_deprecated(
    obj: Mapping[str, Any], crds: Mapping[tuple[str, str], CrdSchema] | None, kube_version: str
) -> None:
    if is_builtin(obj, kube_version):
        return
    schemas = load_crd_schemas() if crds is None else crds
    entry = schemas[(str(obj["apiVersion"]), str(obj["kind"]))]
    if entry.deprecated:
        raise ManifestError([f"{_describe(obj)}: {entry.api_version} is deprecated"])


def validate_manifests(
    docs: Iterable[Mapping[str, Any] | None],
    *,
    kube_version: str = KUBE_VERSION,
    crds: Mapping[tuple[str, str], CrdSchema] | None = None,
    allow_deprecated: bool = False,
) -> None:
    """Validate every document (``None`` ones, empty YAML documents, are skipped).

    Raises one ``ManifestError`` listing the problems of all documents, including two
    documents naming the same object (an install would fail on the second).
    """
    problems: list[str] = []
    seen: set[tuple[str, str, str, str]] = set()
    for obj in docs:
        if not obj:
            continue
        try:
            validate_manifest(
                obj, kube_version=kube_version, crds=crds, allow_deprecated=allow_deprecated
            )
        except ManifestError as error:
            problems += error.problems
        metadata = obj.get("metadata") or {}
        group = str(obj.get("apiVersion", "")).rpartition("/")[0]
        identity = (
            group,
            str(obj.get("kind")),
            str(metadata.get("namespace", "")),
            str(metadata.get("name")),
        )
        if identity in seen:
            problems.append(f"{_describe(obj)}: defined twice")
        seen.add(identity)
    if problems:
        raise ManifestError(problems)
