"""``ImageFetcher`` over http(s), guarded against server-side request forgery.

A task image URL comes from whoever can edit a Label Studio task, so it is fetched only when
its host is allow-listed. An exact entry (``images.internal``, ``10.0.0.5``) is trusted
wherever it points; a pattern (``*.cdn.example.com``) admits a host only while every address
it resolves to is public. The connection goes to the address that was checked (the name is
not resolved a second time, so DNS rebinding cannot swap it), redirects are followed only
within the same host, and the body is streamed with a size limit.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import httpx

from flywheel_labeling.errors import (
    ImageFetchFailedError,
    ImageNotFoundError,
    ImageSourceRefusedError,
    ImageTooLargeError,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]
"""Addresses of a host name (for a connection to a port)."""

DEFAULT_PORTS = {"http": 80, "https": 443}


async def resolve_system(host: str, port: int) -> list[IPAddress]:
    """The host's addresses, as the machine's resolver gives them."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


def is_public(address: IPAddress) -> bool:
    """Routable on the internet: not private, loopback, link-local, shared, reserved …"""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


@dataclass(frozen=True)
class HostAllowList:
    """``image_fetch_allowed_hosts``: exact names and ``*.suffix`` patterns."""

    entries: tuple[str, ...]

    @classmethod
    def of(cls, hosts: list[str]) -> HostAllowList:
        return cls(tuple(h.strip().lower().rstrip(".") for h in hosts if h.strip()))

    def match(self, host: str) -> Literal["exact", "pattern"] | None:
        host = host.lower().rstrip(".")
        if host in self.entries:
            return "exact"
        for entry in self.entries:
            if entry.startswith("*.") and host.endswith(entry[1:]) and host != entry[2:]:
                return "pattern"
        return None


@dataclass(frozen=True)
class Admitted:
    """A URL that passed the guard, and the address to connect to."""

    url: httpx.URL
    address: IPAddress


class HttpImageFetcher:
    """Fetches task images from allow-listed hosts."""

    def __init__(
        self,
        allowed_hosts: list[str],
        *,
        timeout_s: float = 10.0,
        resolver: Resolver = resolve_system,
        transport: httpx.AsyncBaseTransport | None = None,
        max_redirects: int = 3,
    ) -> None:
        self._allowed = HostAllowList.of(allowed_hosts)
        self._resolver = resolver
        self._max_redirects = max_redirects
        # trust_env=False: a proxy from the environment would connect by name, not by the
        # address checked here.
        self._client = httpx.AsyncClient(
            timeout=timeout_s, follow_redirects=False, trust_env=False, transport=transport
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def admit(self, url: str, field: str) -> Admitted:
        """Check a URL against the allow-list; the address it may be fetched from."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as error:
            raise ImageSourceRefusedError(f"not a valid URL: {error}", field=field) from error
        if parsed.scheme not in DEFAULT_PORTS or not parsed.host:
            raise ImageSourceRefusedError("only http(s) URLs with a host are fetched", field=field)
        if parsed.userinfo:
            raise ImageSourceRefusedError("URLs with credentials are not fetched", field=field)
        host = parsed.host
        match = self._allowed.match(host)
        if match is None:
            raise ImageSourceRefusedError(
                f"host {host!r} is not in image_fetch_allowed_hosts", field=field
            )
        addresses = await self._addresses(host, parsed.port or DEFAULT_PORTS[parsed.scheme], field)
        if match == "pattern":
            private = [str(a) for a in addresses if not is_public(a)]
            if private:
                raise ImageSourceRefusedError(
                    f"host {host!r} resolves to a non-public address ({', '.join(private)}); "
                    "list it exactly in image_fetch_allowed_hosts to allow that",
                    field=field,
                )
        return Admitted(parsed, addresses[0])

    async def fetch(self, url: str, *, max_bytes: int, field: str) -> bytes:
        """The body at ``url``: at most ``max_bytes``, same-host redirects only."""
        admitted = await self.admit(url, field)
        for _ in range(self._max_redirects + 1):
            body_or_redirect = await self._get(admitted, max_bytes, field)
            if isinstance(body_or_redirect, bytes):
                return body_or_redirect
            target = body_or_redirect
            if target.host != admitted.url.host or target.scheme != admitted.url.scheme:
                raise ImageSourceRefusedError(
                    f"image URL redirects to another host ({target.host!r}); not followed",
                    field=field,
                )
            admitted = await self.admit(str(target), field)
        raise ImageSourceRefusedError("image URL redirects too often", field=field)

    async def _addresses(self, host: str, port: int, field: str) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        try:
            addresses = await self._resolver(host, port)
        except OSError as error:
            raise ImageFetchFailedError(f"cannot resolve {host!r}", field=field) from error
        if not addresses:
            raise ImageFetchFailedError(f"cannot resolve {host!r}", field=field)
        return addresses

    async def _get(self, admitted: Admitted, max_bytes: int, field: str) -> bytes | httpx.URL:
        """The body, or where a redirect points."""
        url = admitted.url
        pinned = url.copy_with(host=str(admitted.address))
        host_header = url.netloc.decode("ascii")
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        try:
            async with self._client.stream(
                "GET", pinned, headers={"Host": host_header}, extensions=extensions
            ) as response:
                if response.is_redirect and "location" in response.headers:
                    return url.join(response.headers["location"])
                if response.status_code in (404, 410):
                    raise ImageNotFoundError(f"no image at {url}", field=field)
                if response.status_code != 200:
                    raise ImageFetchFailedError(
                        f"image host answered {response.status_code}",
                        field=field,
                        details={"status": response.status_code},
                    )
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                    raise _too_large(max_bytes, field)
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        raise _too_large(max_bytes, field)
                return bytes(body)
        except httpx.TimeoutException as error:
            raise ImageFetchFailedError("image host timed out", field=field) from error
        except httpx.TransportError as error:
            raise ImageFetchFailedError(
                f"image host unreachable: {type(error).__name__}", field=field
            ) from error


def _too_large(max_bytes: int, field: str) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"image is more than the limit of {max_bytes} bytes",
        field=field,
        details={"limit_bytes": max_bytes},
    )
