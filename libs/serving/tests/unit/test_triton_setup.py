import os
import socket
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

from flywheel_runtime.errors import DependencyUnavailableError
from flywheel_serving.errors import TritonNotInstalledError, TritonStartError
from flywheel_serving.triton import TritonControl, TritonInstallation, TritonProtocol, TritonServer


def test_the_wheel_provides_server_libraries_backend_and_a_stub_for_this_python() -> None:
    found = TritonInstallation.find()

    assert found.binary.name == "tritonserver"
    assert os.access(found.binary, os.X_OK)
    assert (found.python_backend / "libtriton_python.so").is_file()
    assert found.stub.parent.name == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert found.libs.name == "nvidia_pytriton.libs"


def test_a_missing_wheel_is_reported_as_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> metadata.Distribution:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)

    with pytest.raises(TritonNotInstalledError, match="nvidia-pytriton"):
        TritonInstallation.find()


def test_environment_puts_this_libpython_first_and_this_environment_on_path() -> None:
    found = TritonInstallation.find()

    env = found.environment({"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/lib", "KEEP": "1"})

    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [
        sysconfig.get_config_var("LIBDIR"),
        str(found.libs),
        "/opt/lib",
    ]
    assert env["PATH"].split(os.pathsep) == [str(Path(sys.executable).parent), "/usr/bin"]
    assert env["KEEP"] == "1"


def test_backend_directory_links_the_python_backend_and_this_pythons_stub(tmp_path: Path) -> None:
    found = TritonInstallation.find()

    backends = found.backend_directory(tmp_path / "backends")
    found.backend_directory(tmp_path / "backends")  # assembling twice is harmless

    python = backends / "python"
    assert sorted(p.name for p in python.iterdir()) == [
        "libtriton_python.so",
        "triton_python_backend_stub",
        "triton_python_backend_utils.py",
    ]
    assert (python / "triton_python_backend_stub").resolve() == found.stub.resolve()


def test_a_repository_that_is_not_a_folder_is_refused_before_starting(tmp_path: Path) -> None:
    with pytest.raises(TritonStartError, match="not a folder"):
        TritonServer.start(tmp_path / "missing")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
async def test_an_unreachable_server_is_a_dependency_outage(protocol: TritonProtocol) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port once the socket is closed.
    async with TritonControl(f"127.0.0.1:{port}", protocol=protocol, timeout=5) as control:
        with pytest.raises(DependencyUnavailableError) as raised:
            await control.server_ready()
        with pytest.raises(DependencyUnavailableError):
            await control.load("digits")

    assert raised.value.retryable
    assert raised.value.details == {"operation": "check readiness"}
