"""Triton model repositories built from registered model versions.

One Triton model per registered model, one numbered folder per version, and a ``config.pbtxt``
whose ``version_policy`` lists exactly the versions in service: champion and challenger share
one server and a request picks its version. Triton reads the repository only when asked to
(explicit model control), so a rebuild followed by ``TritonControl.load`` swaps versions
without a restart.

Writes are ordered for a Triton that may read at any moment: every file goes to a temporary
name and is renamed into place, version folders are complete before the config names them, and
folders of retired versions go only after the config stopped naming them. Files whose bytes
are already in place are not rewritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Final, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flywheel_clients.registry import CHALLENGER, CHAMPION, ModelFiles, ModelRegistry
from flywheel_runtime.errors import InvalidInputError, NotFoundError
from flywheel_runtime.storage import ObjectStorage
from flywheel_vision.contract import ModelSignature, signature_or_reference
from flywheel_vision.export import (
    CONFIG_FILE,
    LABELS_FILE,
    ONNX_FILE,
    TritonFlavour,
    labels_json,
    triton_config,
)
from flywheel_vision.preprocess import INPUT_SHAPE

__all__ = [
    "CONFIG_FILE",
    "MODEL_PY_FILE",
    "THREADS_PARAMETER",
    "ServingOptions",
    "build_model_repository",
    "embedding_size",
    "input_dims",
    "python_backend_source",
    "render_config",
    "sync_from_registry",
    "triton_s3_uri",
    "upload_repository",
    "validate_model_name",
]

MODEL_PY_FILE: Final = "model.py"
"""The Python backend's entry point inside each version folder."""

THREADS_PARAMETER: Final = "intra_op_threads"
"""``config.pbtxt`` parameter the Python backend's ``model.py`` reads its thread count from."""

# Triton names a model by its folder, and clients put the name in URL paths: keep it plain.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_VERSION = re.compile(r"^[1-9][0-9]{0,17}$")
_CONTENT_TYPES: Final = {
    ONNX_FILE: "application/octet-stream",
    LABELS_FILE: "application/json",
    MODEL_PY_FILE: "text/x-python",
    CONFIG_FILE: "text/plain",
}


class ServingOptions(BaseModel):
    """How Triton serves a model: backend flavour, dynamic batching and instances."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    flavour: TritonFlavour = "onnxruntime_onnx"
    """Triton's ONNX Runtime backend (production), or the Python backend running onnxruntime
    (the Triton bundled with ``nvidia-pytriton`` has only that one)."""

    max_batch_size: int = Field(default=64, ge=1)
    """Largest batch the dynamic batcher forms (and a client may send)."""

    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)
    """Batch sizes the batcher sends as soon as it has them, without waiting further."""

    max_queue_delay_microseconds: int = Field(default=500, ge=0)
    """How long a request may wait for others to fill a batch: latency traded for throughput."""

    instance_count: int = Field(default=1, ge=1)
    """Model instances per version; each runs one batch at a time."""

    instance_kind: Literal["KIND_CPU", "KIND_GPU", "KIND_AUTO", "KIND_MODEL"] = "KIND_CPU"
    """Where the instances run."""

    intra_op_threads: int = Field(default=1, ge=1)
    """onnxruntime threads per instance (Python flavour only): instances and versions share
    the CPUs, so each keeps to a few."""

    @model_validator(mode="after")
    def _batch_sizes_fit(self) -> Self:
        if any(size < 1 or size > self.max_batch_size for size in self.preferred_batch_sizes):
            raise ValueError("preferred batch sizes must lie in 1..max_batch_size")
        return self


def validate_model_name(name: str) -> str:
    """``name`` if Triton can serve a model under it (it is the registered model's name too)."""
    if not _MODEL_NAME.match(name):
        raise InvalidInputError(
            "model name must be 1-128 letters, digits, '_', '.' or '-', starting with a "
            "letter or digit",
            details={"model": name},
        )
    return name


def python_backend_source() -> bytes:
    """The ``model.py`` that every version folder of a Python-flavour repository carries."""
    return (
        resources.files("flywheel_serving").joinpath("python_backend", MODEL_PY_FILE).read_bytes()
    )


def build_model_repository(
    root: Path, model_name: str, versions: Sequence[ModelFiles], options: ServingOptions
) -> Path:
    """Write ``<root>/<model_name>`` serving exactly ``versions``; return that folder.

    Each version folder gets ``model.onnx`` and ``labels.json`` (and ``model.py`` for the
    Python flavour); folders of versions not listed are removed. All versions must have the
    same number of classes, since one config declares the output shape for all of them; their
    input shapes come from each version's ``model.json`` (``input_dims``), and so does the
    ``embedding`` output, declared when every version has one of the same size
    (``embedding_size``).
    """
    validate_model_name(model_name)
    numbers = _version_numbers(model_name, versions)
    num_classes = _num_classes(model_name, versions)
    config = render_config(
        model_name,
        num_classes,
        numbers,
        options,
        input_dims=input_dims(model_name, versions),
        embedding_size=embedding_size(model_name, versions),
    )
    model_dir = root / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    model_py = python_backend_source() if options.flavour == "python" else None
    for number, files in zip(numbers, versions, strict=True):
        _write_version(model_dir / str(number), files, model_py)
    write_atomic(model_dir / CONFIG_FILE, config.encode())
    for stale in _version_dirs(model_dir):
        if int(stale.name) not in numbers:
            shutil.rmtree(stale)
    return model_dir


def render_config(
    model_name: str,
    num_classes: int,
    versions: Sequence[int],
    options: ServingOptions,
    *,
    input_dims: Sequence[int] = INPUT_SHAPE,
    embedding_size: int | None = None,
) -> str:
    """The ``config.pbtxt`` serving ``versions`` of ``model_name`` as ``options`` say; with an
    ``embedding_size`` it declares the ``embedding`` output beside ``logits``."""
    return triton_config(
        model_name,
        num_classes=num_classes,
        max_batch_size=options.max_batch_size,
        platform=options.flavour,
        preferred_batch_sizes=options.preferred_batch_sizes,
        max_queue_delay_microseconds=options.max_queue_delay_microseconds,
        instance_count=options.instance_count,
        instance_kind=options.instance_kind,
        versions=versions,
        parameters=(
            {THREADS_PARAMETER: str(options.intra_op_threads)}
            if options.flavour == "python"
            else None
        ),
        input_dims=input_dims,
        embedding_size=embedding_size,
    )


def input_dims(model_name: str, versions: Sequence[ModelFiles]) -> tuple[int, ...]:
    """One image's shape as the served versions declare it, ``-1`` where they differ.

    Triton has one ``config.pbtxt`` for every version of a model, so a line that changed its
    model (28 x 28 grayscale champion, 32 x 32 RGB candidate) is served with variable
    dimensions, and each request carries its version's own shape.
    """
    shapes = {
        signature.preprocessing.input_shape for signature in _signatures(model_name, versions)
    }
    if len(shapes) == 1:
        (shape,) = shapes
        return shape
    # One rank for all (channels, height, width); a dimension that differs becomes -1.
    return tuple(d[0] if len(set(d)) == 1 else -1 for d in zip(*shapes, strict=True))


def embedding_size(model_name: str, versions: Sequence[ModelFiles]) -> int | None:
    """Size of the ``embedding`` output the served versions share; None when one of them
    declares none or they differ.

    One config declares the outputs of every version, and a client asking for an output that
    one version lacks would fail on that version only: the embedding is served when all have it.
    """
    sizes = {signature.embedding_size for signature in _signatures(model_name, versions)}
    if len(sizes) != 1:
        return None
    (size,) = sizes
    return size


def _signatures(model_name: str, versions: Sequence[ModelFiles]) -> list[ModelSignature]:
    """Each version's ``model.json`` (the reference signature for versions without one)."""
    signatures = []
    for files in versions:
        try:
            signatures.append(signature_or_reference(files.model_json, len(files.labels)))
        except InvalidInputError as error:
            raise InvalidInputError(
                f"version {files.version} has an invalid model.json: {error.message}",
                details={"model": model_name, "version": files.version},
            ) from error
    return signatures


async def sync_from_registry(
    registry: ModelRegistry,
    registered_model: str,
    root: Path,
    options: ServingOptions,
    *,
    versions: Sequence[str] | None = None,
    aliases: Sequence[str] = (CHAMPION, CHALLENGER),
) -> list[int]:
    """Build the repository of ``registered_model`` from the registry; return the versions.

    Without ``versions`` the ones ``aliases`` point at are served (champion and challenger:
    the canary runs on the same server). ``NotFoundError`` when there is nothing to serve.

    When a served version carries a golden serving configuration (``flywheel tune``), its
    knobs replace those of ``options``. Triton has one ``config.pbtxt`` for all versions of a
    model, so the newest served version that has one wins: it is the version traffic is moving
    to (the challenger of a canary), so the configuration does not change again when it is
    promoted, and a rollback falls back to the champion's own.
    """
    # tuning builds on this module, so it is imported where it is used.
    from flywheel_serving.tuning import golden_options

    validate_model_name(registered_model)
    if versions is None:
        found = await asyncio.gather(
            *(registry.get_alias(registered_model, alias) for alias in aliases)
        )
        infos = [info for info in found if info is not None]
    else:
        for version in versions:
            _check_version(registered_model, version)
        infos = list(
            await asyncio.gather(
                *(registry.get_version(registered_model, version) for version in set(versions))
            )
        )
    wanted = {info.version for info in infos}
    if not wanted:
        raise NotFoundError(
            "no model version to serve",
            details={"model": registered_model, "aliases": list(aliases)},
        )
    for version in wanted:
        _check_version(registered_model, version)
    ordered = sorted(wanted, key=int)
    files = await asyncio.gather(
        *(registry.download_model_files(registered_model, version) for version in ordered)
    )
    options = golden_options(infos, options)
    await asyncio.to_thread(build_model_repository, root, registered_model, files, options)
    return [int(version) for version in ordered]


async def upload_repository(
    storage: ObjectStorage,
    bucket: str,
    prefix: str,
    root: Path,
    model_name: str,
    *,
    secure: bool = False,
) -> str:
    """Copy ``<root>/<model_name>`` to ``<prefix>/<model_name>/`` in ``bucket``; return its URI.

    The URI names the repository (``prefix``), in the form Triton's ``--model-repository``
    takes (see ``triton_s3_uri``). Version files go first and ``config.pbtxt`` last, so a
    Triton reading meanwhile never sees a config naming a version that is not there yet;
    objects of this model that the local folder no longer has are deleted afterwards.
    """
    validate_model_name(model_name)
    model_dir = root / model_name
    if not (model_dir / CONFIG_FILE).is_file():
        raise NotFoundError(
            "no model repository to upload", details={"model": model_name, "path": str(root)}
        )
    base = "/".join(part for part in (prefix.strip("/"), model_name) if part) + "/"
    # Dot files are a concurrent build's temporaries, never part of the repository.
    files = sorted(
        path for path in model_dir.rglob("*") if path.is_file() and not path.name.startswith(".")
    )
    files.sort(key=lambda path: path.name == CONFIG_FILE)
    uploaded: set[str] = set()
    for path in files:
        key = base + path.relative_to(model_dir).as_posix()
        content_type = _CONTENT_TYPES.get(path.name, "application/octet-stream")
        data = await asyncio.to_thread(path.read_bytes)
        await storage.put(bucket, key, data, content_type=content_type)
        uploaded.add(key)
    stale = [key for key in await storage.list_keys(bucket, base) if key not in uploaded]
    if stale:
        await storage.delete_many(bucket, stale)
    return triton_s3_uri(bucket, prefix, endpoint=storage.endpoint, secure=secure)


def triton_s3_uri(
    bucket: str, prefix: str = "", *, endpoint: str | None = None, secure: bool = False
) -> str:
    """Triton's spelling of an S3 repository: ``s3://[https://]host:port/bucket/prefix``.

    Triton reads a host only when it carries a port; without one (AWS) the URI is
    ``s3://bucket/prefix`` and the region comes from Triton's environment.
    """
    path = "/".join(part for part in (bucket, prefix.strip("/")) if part)
    if endpoint and ":" in endpoint:
        scheme = "https://" if secure else ""
        return f"s3://{scheme}{endpoint}/{path}"
    return f"s3://{path}"


def write_atomic(path: Path, data: bytes) -> bool:
    """Replace ``path`` with ``data`` in one rename; return False when it already held it."""
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        # mkstemp makes the file private; Triton may run as another user.
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return True


def _write_version(folder: Path, files: ModelFiles, model_py: bytes | None) -> None:
    folder.mkdir(exist_ok=True)
    wanted = {ONNX_FILE: files.onnx, LABELS_FILE: labels_json(files.labels)}
    if model_py is not None:
        wanted[MODEL_PY_FILE] = model_py
    for name, data in wanted.items():
        write_atomic(folder / name, data)
    for entry in folder.iterdir():
        # A flavour switch leaves model.py behind; Triton must see exactly this version's files.
        if entry.name not in wanted:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _version_dirs(model_dir: Path) -> list[Path]:
    return [entry for entry in model_dir.iterdir() if entry.is_dir() and entry.name.isdigit()]


def _check_version(model_name: str, version: str) -> int:
    if not _VERSION.match(version):
        raise InvalidInputError(
            "a served model version must be a positive integer",
            details={"model": model_name, "version": version},
        )
    return int(version)


def _version_numbers(model_name: str, versions: Sequence[ModelFiles]) -> list[int]:
    if not versions:
        raise InvalidInputError("a model repository needs at least one version")
    numbers = []
    for files in versions:
        if files.name != model_name:
            raise InvalidInputError(
                "model files belong to another model",
                details={"model": model_name, "files_of": files.name, "version": files.version},
            )
        numbers.append(_check_version(model_name, files.version))
    if len(set(numbers)) != len(numbers):
        raise InvalidInputError(
            "a version is listed twice", details={"model": model_name, "versions": numbers}
        )
    return numbers


def _num_classes(model_name: str, versions: Sequence[ModelFiles]) -> int:
    counts = {files.version: len(files.labels) for files in versions}
    if len(set(counts.values())) != 1:
        raise InvalidInputError(
            "versions served side by side must have the same number of classes",
            details={"model": model_name, "classes_per_version": counts},
        )
    (count,) = set(counts.values())
    if count < 1:
        raise InvalidInputError("a model needs at least one class", details={"model": model_name})
    return count
