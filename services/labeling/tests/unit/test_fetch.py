import ipaddress
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from flywheel_labeling.adapters.fetch import (
    HostAllowList,
    HttpImageFetcher,
    IPAddress,
    is_public,
)
from flywheel_labeling.errors import (
    ImageFetchFailedError,
    ImageNotFoundError,
    ImageSourceRefusedError,
    ImageTooLargeError,
)

PUBLIC = ipaddress.ip_address("93.184.216.34")
PRIVATE = ipaddress.ip_address("10.0.0.7")


def _resolver(table: dict[str, list[str]]) -> Callable[[str, int], object]:
    async def resolve(host: str, port: int) -> list[IPAddress]:
        if host not in table:
            raise OSError(f"unknown host {host}")
        return [ipaddress.ip_address(a) for a in table[host]]

    return resolve


def _fetcher(
    allowed: list[str],
    handler: Callable[[httpx.Request], httpx.Response] | None = None,
    dns: dict[str, list[str]] | None = None,
) -> HttpImageFetcher:
    return HttpImageFetcher(
        allowed,
        resolver=_resolver(dns or {}),  # type: ignore[arg-type]
        transport=httpx.MockTransport(handler or (lambda _: httpx.Response(200, content=b"x"))),
    )


def test_allow_list_matches_exact_names_and_subdomain_patterns() -> None:
    allowed = HostAllowList.of(["Images.Example.com", "*.cdn.example.net", "10.0.0.5"])

    assert allowed.match("images.example.com.") == "exact"
    assert allowed.match("10.0.0.5") == "exact"
    assert allowed.match("eu.cdn.example.net") == "pattern"
    assert allowed.match("cdn.example.net") is None
    assert allowed.match("evil-cdn.example.net") is None
    assert allowed.match("example.com") is None


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("10.1.2.3", False),
        ("127.0.0.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("::1", False),
        ("::ffff:10.0.0.1", False),
        ("fd00::1", False),
        ("2606:4700::1111", True),
    ],
)
def test_only_routable_addresses_are_public(address: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(address)) is public


async def test_a_host_not_on_the_list_is_refused_without_resolving_it() -> None:
    fetcher = _fetcher(["images.example.com"])

    with pytest.raises(ImageSourceRefusedError, match="not in image_fetch_allowed_hosts") as raised:
        await fetcher.fetch("http://evil.example.org/x.png", max_bytes=100, field="task.data.image")

    assert raised.value.details["field"] == "task.data.image"


@pytest.mark.parametrize(
    "url",
    ["ftp://images.example.com/x.png", "file:///etc/passwd", "http://user:pw@images.example.com/x"],
)
async def test_other_schemes_and_credentials_are_refused(url: str) -> None:
    with pytest.raises(ImageSourceRefusedError):
        await _fetcher(["images.example.com"]).fetch(url, max_bytes=100, field="f")


async def test_a_pattern_host_resolving_to_a_private_address_is_refused() -> None:
    fetcher = _fetcher(["*.example.com"], dns={"internal.example.com": [str(PUBLIC), str(PRIVATE)]})

    with pytest.raises(ImageSourceRefusedError, match="non-public address"):
        await fetcher.fetch("https://internal.example.com/x.png", max_bytes=100, field="f")


async def test_an_exact_host_may_be_private_and_the_connection_goes_to_the_checked_address() -> (
    None
):
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"image-bytes")

    fetcher = _fetcher(["minio.internal"], handler, dns={"minio.internal": [str(PRIVATE)]})

    body = await fetcher.fetch("http://minio.internal:9000/b/x.png", max_bytes=100, field="f")

    assert body == b"image-bytes"
    assert seen[0].url.host == str(PRIVATE)
    assert seen[0].url.port == 9000
    assert seen[0].headers["host"] == "minio.internal:9000"


async def test_https_keeps_the_name_for_sni() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"ok")

    fetcher = _fetcher(["*.example.com"], handler, dns={"img.example.com": [str(PUBLIC)]})

    await fetcher.fetch("https://img.example.com/x.png", max_bytes=100, field="f")

    assert seen[0].url.host == str(PUBLIC)
    assert seen[0].extensions["sni_hostname"] == "img.example.com"


async def test_a_redirect_to_another_host_is_not_followed() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"location": "http://169.254.169.254/latest/meta-data"})

    fetcher = _fetcher(["images.example.com"], handler, dns={"images.example.com": [str(PUBLIC)]})

    with pytest.raises(ImageSourceRefusedError, match="redirects to another host"):
        await fetcher.fetch("http://images.example.com/x.png", max_bytes=100, field="f")


async def test_a_redirect_within_the_host_is_followed() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/old.png":
            return httpx.Response(301, headers={"location": "/new.png"})
        return httpx.Response(200, content=b"moved")

    fetcher = _fetcher(["images.example.com"], handler, dns={"images.example.com": [str(PUBLIC)]})

    assert await fetcher.fetch("http://images.example.com/old.png", max_bytes=100, field="f") == (
        b"moved"
    )


async def test_a_body_over_the_limit_is_413_even_without_content_length() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(2):
            yield b"x" * 60

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=chunks())

    fetcher = _fetcher(["images.example.com"], handler, dns={"images.example.com": [str(PUBLIC)]})

    with pytest.raises(ImageTooLargeError):
        await fetcher.fetch("http://images.example.com/x.png", max_bytes=100, field="f")


async def test_a_declared_length_over_the_limit_is_413() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"x" * 500)

    fetcher = _fetcher(["images.example.com"], handler, dns={"images.example.com": [str(PUBLIC)]})

    with pytest.raises(ImageTooLargeError):
        await fetcher.fetch("http://images.example.com/x.png", max_bytes=100, field="f")


@pytest.mark.parametrize(
    ("status", "error"), [(404, ImageNotFoundError), (503, ImageFetchFailedError)]
)
async def test_origin_errors_are_named(status: int, error: type[Exception]) -> None:
    fetcher = _fetcher(
        ["images.example.com"],
        lambda _: httpx.Response(status),
        dns={"images.example.com": [str(PUBLIC)]},
    )

    with pytest.raises(error):
        await fetcher.fetch("http://images.example.com/x.png", max_bytes=100, field="f")


async def test_an_unresolvable_host_fails_the_fetch() -> None:
    with pytest.raises(ImageFetchFailedError, match="cannot resolve"):
        await _fetcher(["*.example.com"]).fetch(
            "http://gone.example.com/x.png", max_bytes=100, field="f"
        )
