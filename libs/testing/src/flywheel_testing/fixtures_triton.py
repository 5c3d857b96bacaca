"""Pytest fixture for Triton: one real server per session, on a repository tests write into.

The server runs with explicit model control, so a test writes its model (under a name of its
own) into ``triton_server.repository`` and loads it through ``TritonControl``; other tests'
models stay out of its way. Import it where it is needed (the plugin, a ``conftest.py``).
``flywheel_serving`` is imported only when the fixture runs, so suites that never ask for
Triton do not need it installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from flywheel_serving.triton import TritonServer

__all__ = ["triton_server"]


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """Triton from the ``nvidia-pytriton`` wheel on an empty repository (``.repository``)."""
    from flywheel_serving.triton import TritonServer

    repository = tmp_path_factory.mktemp("triton-repository")
    log_path = tmp_path_factory.mktemp("triton-logs") / "tritonserver.log"
    with TritonServer.start(repository, log_path=log_path) as server:
        yield server
