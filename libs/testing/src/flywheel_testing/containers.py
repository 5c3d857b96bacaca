"""Whether containers can back the test servers on this machine."""

from __future__ import annotations

import functools

__all__ = ["docker_available"]


@functools.cache
def docker_available(timeout_s: float = 2.0) -> bool:
    """Whether a Docker engine answers; checked once per process, quickly, never raising.

    Fixtures use it to choose between a container and a locally started server, so a machine
    without Docker (or with a stopped daemon) must get a fast ``False``, not an error.
    """
    try:
        import docker

        client = docker.from_env(timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # any failure means "no usable engine"
        return False
