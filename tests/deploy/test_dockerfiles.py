import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICE_DIRS = sorted(p.parent.name for p in ROOT.glob("services/*/pyproject.toml"))
TRAINER = ROOT / "deploy" / "docker" / "trainer.Dockerfile"
MLFLOW = ROOT / "deploy" / "docker" / "mlflow.Dockerfile"
HEALTHZ = "http://127.0.0.1:8080/healthz"
TMP = "/tmp"  # noqa: S108 - the writable HOME of a read-only container
ANY_INTERFACE = "0.0.0.0"  # noqa: S104 - what a server in a container listens on


def _local_closure(project: Path) -> set[str]:
    """Folders of the flywheel-* distributions ``project`` needs, itself included."""
    folders = {
        tomllib.loads(p.read_text())["project"]["name"]: p.parent.relative_to(ROOT).as_posix()
        for p in [*ROOT.glob("libs/*/pyproject.toml"), *ROOT.glob("services/*/pyproject.toml")]
    }
    needed: set[str] = set()
    todo = [project.relative_to(ROOT).as_posix()]
    while todo:
        folder = todo.pop()
        if folder in needed:
            continue
        needed.add(folder)
        meta = tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["project"]
        for requirement in meta.get("dependencies", []):
            name = re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0]
            if name in folders:
                todo.append(folders[name])
    return needed


def _copied(instructions) -> list[tuple[int, str]]:
    copies = []
    for index, instruction in enumerate(instructions):
        if instruction.keyword == "COPY":
            words = [w for w in instruction.args.split() if not w.startswith("--")]
            copies += [(index, source) for source in words[:-1]]
    return copies


def _first_pip_install(instructions) -> int:
    return next(
        i
        for i, ins in enumerate(instructions)
        if ins.keyword == "RUN" and "pip install" in ins.args
    )


def _user(instructions) -> str:
    users = [ins.args for ins in instructions if ins.keyword == "USER"]
    assert users, "no USER: the image would run as root"
    return users[-1]


def test_every_service_has_a_dockerfile():
    assert {"labeling", "data-monitor", "trainer-dispatch", "validator", "rollout"} <= set(
        SERVICE_DIRS
    )
    assert "inference-bff" in SERVICE_DIRS
    for service in SERVICE_DIRS:
        assert (ROOT / "services" / service / "Dockerfile").is_file(), service


@pytest.mark.parametrize("service", SERVICE_DIRS)
def test_service_image_is_slim_python_with_dependencies_before_source(
    service, dockerfile, base_image
):
    instructions = dockerfile(ROOT / "services" / service / "Dockerfile")

    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base_image(instructions))
    first_install = _first_pip_install(instructions)
    source_copies = [
        i
        for i, source in _copied(instructions)
        if not source.endswith(("pyproject.toml", "constraints.txt"))
    ]
    assert source_copies, "no source copied"
    assert min(source_copies) > first_install, "source is copied before dependencies install"
    for _, source in _copied(instructions):
        assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"


@pytest.mark.parametrize("service", SERVICE_DIRS)
def test_service_image_installs_every_local_library_it_needs(service, dockerfile):
    instructions = dockerfile(ROOT / "services" / service / "Dockerfile")
    copied = {source.rstrip("/") for _, source in _copied(instructions)}
    installs = " ".join(i.args for i in instructions if i.keyword == "RUN")

    for folder in _local_closure(ROOT / "services" / service):
        assert folder in copied, f"{folder} is not copied into the image"
        assert f"{folder}/pyproject.toml" in copied, f"{folder}'s dependencies are not layered"
        assert f"./{folder}" in installs, f"{folder} is not installed"


@pytest.mark.parametrize("service", SERVICE_DIRS)
def test_service_image_runs_as_non_root_with_healthcheck_and_module_entry(
    service, dockerfile, image_env, catalog
):
    instructions = dockerfile(ROOT / "services" / service / "Dockerfile")
    keywords = [i.keyword for i in instructions]
    env = image_env(instructions)
    package = "flywheel_" + service.replace("-", "_")
    cmd = next(i for i in reversed(instructions) if i.keyword == "CMD").exec_form()
    healthcheck = next(i for i in instructions if i.keyword == "HEALTHCHECK").exec_form()

    user = _user(instructions)
    assert user not in {"root", "0"}
    assert not user.startswith("0:")
    assert keywords.index("USER") < keywords.index("CMD")
    assert cmd == ["python", "-m", package]
    assert (ROOT / "services" / service / "src" / package / "__main__.py").is_file()
    assert HEALTHZ in " ".join(healthcheck)
    assert "8080" in [i.args for i in instructions if i.keyword == "EXPOSE"]
    assert env["HOME"] == TMP, "HOME must be writable with a read-only root filesystem"
    for process in (d for d in catalog.values() if d.service_dir == service):
        assert env[f"{process.env_prefix}HTTP_HOST"] == ANY_INTERFACE
        assert env[f"{process.env_prefix}HTTP_PORT"] == "8080"


def test_bff_image_also_runs_the_log_worker(catalog):
    worker = catalog["log-worker"]

    assert worker.service_dir == "inference-bff"
    assert (
        ROOT / "services/inference-bff/src" / worker.module.replace(".", "/") / "__main__.py"
    ).is_file()


@pytest.mark.parametrize("service", SERVICE_DIRS)
def test_torch_comes_from_the_cpu_index_in_service_images(service, dockerfile):
    instructions = dockerfile(ROOT / "services" / service / "Dockerfile")
    installs = [i.args for i in instructions if i.keyword == "RUN" and "pip install" in i.args]
    needs_torch = "libs/vision" in _local_closure(ROOT / "services" / service)

    if needs_torch:
        assert any("download.pytorch.org/whl/cpu" in args for args in installs)
    assert not any("/whl/cu" in args for args in installs)


def test_trainer_image_is_cpu_by_default_and_cuda_by_build_arg(dockerfile, base_image):
    instructions = dockerfile(TRAINER)
    args = dict(
        i.args.partition("=")[::2] for i in instructions if i.keyword == "ARG" and "=" in i.args
    )
    installs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    entry = next(i for i in instructions if i.keyword == "ENTRYPOINT").exec_form()

    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base_image(instructions))
    assert instructions[0].keyword == "ARG"
    assert instructions[0].args.startswith("BASE_IMAGE=")
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert '--index-url "${TORCH_INDEX}"' in installs
    assert "cu126" in TRAINER.read_text(), "the header shows how to build the CUDA variant"
    assert entry == ["python", "-m", "flywheel_vision.train"]
    assert (ROOT / "libs/vision/src/flywheel_vision/train.py").is_file()
    assert _user(instructions) not in {"root", "0"}
    for folder in _local_closure(ROOT / "libs" / "vision"):
        assert f"./{folder}" in installs


def test_mlflow_image_has_the_store_and_artifact_drivers(dockerfile, base_image):
    instructions = dockerfile(MLFLOW)
    installs = " ".join(i.args for i in instructions if i.keyword == "RUN")

    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base_image(instructions))
    assert all(package in installs for package in ("mlflow", "psycopg2-binary", "boto3"))
    assert "-c constraints.txt" in installs
    assert _user(instructions) not in {"root", "0"}
    assert any(i.keyword == "HEALTHCHECK" and "/health" in i.args for i in instructions)
