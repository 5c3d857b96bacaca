"""Bearer-token (JWT) authentication for HTTP services, as FastAPI dependencies.

A service's app factory builds one ``TokenVerifier`` from its ``AuthSettings`` and puts it on
``app.state.token_verifier``; routes then ask for a ``CurrentPrincipal`` or for
``Depends(require_roles(...))``::

    app.state.token_verifier = TokenVerifier(settings.auth)   # closed in the lifespan

    AdminPrincipal = Annotated[Principal, Depends(require_roles("admin"))]

    @router.post("/models/{name}/promote")
    async def promote(name: str, principal: AdminPrincipal) -> ...: ...

Signing keys come from the identity provider's JWKS endpoint (Keycloak:
``{realm}/protocol/openid-connect/certs``), or, for local development and tests, from
``dev_signing_key``: a PEM private key whose public half verifies tokens made with
``issue_dev_token``. Only asymmetric algorithms are accepted, so neither ``alg=none`` nor an
HMAC token signed with a public key (algorithm confusion) can pass.

Dependencies that authenticate carry a ``declares_auth`` mark (``get_current_principal`` and
``require_roles`` do already); ``route_auth`` reads a route's roles and schemes back from its
dependency tree, so audits and route tests never restate them.

Every rejected token raises ``AuthenticationError`` (401) with ``details["reason"]`` saying why;
the service's error handler must answer 401s with ``WWW-Authenticate: Bearer``. A missing role
raises ``PermissionDeniedError`` (403); an unreachable JWKS endpoint with no usable cached key
raises ``DependencyUnavailableError`` (503).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Annotated, Any, Literal, Self, TypeVar

import httpx
import jwt
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from jwt.types import Options
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from flywheel_runtime.errors import (
    AuthenticationError,
    DependencyUnavailableError,
    PermissionDeniedError,
)

__all__ = [
    "AuthRequirement",
    "AuthSettings",
    "CachingTokenVerifier",
    "CurrentPrincipal",
    "Principal",
    "TokenVerifier",
    "declares_auth",
    "generate_dev_key",
    "get_current_principal",
    "issue_dev_token",
    "jwks_from_private_key",
    "require_roles",
    "roles_from_claims",
    "route_auth",
]

_log = structlog.get_logger(__name__)

ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
"""Algorithms a token may be signed with; ``none`` and ``HS*`` are never among them."""


class AuthSettings(BaseModel):
    """How an HTTP service checks bearer tokens; nested in the service's settings as ``auth``."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    jwks_url: str | None = None
    """JWKS endpoint of the identity provider
    (Keycloak: ``http://keycloak:8080/realms/flywheel/protocol/openid-connect/certs``)."""

    issuer: str | None = None
    """Required ``iss`` claim (Keycloak: the realm URL); unset skips the issuer check."""

    audience: str | None = None
    """Required entry of the ``aud`` claim; unset skips the audience check."""

    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"])
    """Accepted signature algorithms; asymmetric ones only (no ``none``, no ``HS*``)."""

    roles_claim: str = "realm_access.roles"
    """Claim holding the caller's roles: a dotted path into nested claims
    (Keycloak realm roles) or a flat claim name such as ``roles``."""

    dev_signing_key: SecretStr | None = None
    """PEM private key for local development: tokens signed with it (``issue_dev_token``) are
    accepted. Never set it in a deployed environment."""

    leeway_s: int = Field(default=30, ge=0)
    """Clock skew tolerated when checking ``exp``, ``nbf`` and ``iat``, in seconds."""

    jwks_cache_s: int = Field(default=300, ge=0)
    """How long fetched signing keys are trusted before the JWKS is fetched again, in seconds."""

    jwks_refetch_min_s: int = Field(default=10, ge=0)
    """Least time between two JWKS fetches, in seconds: a flood of tokens with made-up key ids
    costs the identity provider at most one request per interval."""

    jwks_timeout_s: float = Field(default=5.0, gt=0)
    """Timeout of one JWKS request, in seconds."""

    @field_validator("algorithms")
    @classmethod
    def _only_asymmetric(cls, algorithms: list[str]) -> list[str]:
        if not algorithms:
            raise ValueError("at least one algorithm is required")
        refused = sorted(set(algorithms) - ASYMMETRIC_ALGORITHMS)
        if refused:
            raise ValueError(
                f"algorithms {refused} are not accepted; use asymmetric ones only "
                f"({', '.join(sorted(ASYMMETRIC_ALGORITHMS))})"
            )
        return algorithms


class Principal(BaseModel):
    """Who made the request, as the verified token says."""

    model_config = ConfigDict(frozen=True)

    subject: str
    """The token's ``sub``: a stable user or client id."""

    username: str
    """``preferred_username`` when the token has one, else the subject."""

    roles: frozenset[str] = frozenset()
    """Roles read from the configured roles claim."""

    claims: dict[str, Any] = Field(default_factory=dict)
    """Every verified claim of the token."""


def roles_from_claims(claims: Mapping[str, Any], roles_claim: str) -> frozenset[str]:
    """The roles found at ``roles_claim``: a flat claim name or a dotted path into nested claims.

    A list of strings or one space-separated string is accepted; anything else gives no roles.
    """
    value: Any = claims.get(roles_claim)
    if value is None and "." in roles_claim:
        value = claims
        for part in roles_claim.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list | tuple | set | frozenset):
        return frozenset(item for item in value if isinstance(item, str))
    return frozenset()


def _rejected(message: str, reason: str) -> AuthenticationError:
    return AuthenticationError(message, details={"reason": reason})


# Most specific first: InvalidSignatureError is a DecodeError, every other one an InvalidTokenError.
_TOKEN_ERRORS: tuple[tuple[type[jwt.PyJWTError], str, str], ...] = (
    (jwt.ExpiredSignatureError, "token has expired", "expired"),
    (jwt.ImmatureSignatureError, "token is not valid yet", "not_yet_valid"),
    (jwt.InvalidSignatureError, "token signature is invalid", "bad_signature"),
    (jwt.InvalidIssuerError, "token issuer is not accepted", "invalid_issuer"),
    (jwt.InvalidAudienceError, "token audience is not accepted", "invalid_audience"),
    (jwt.InvalidIssuedAtError, "token 'iat' claim is invalid", "malformed"),
    (jwt.InvalidAlgorithmError, "token algorithm is not accepted", "algorithm_not_allowed"),
    (jwt.InvalidKeyError, "token signing key cannot verify it", "bad_signature"),
    (jwt.DecodeError, "token is malformed", "malformed"),
)


def _map_token_error(error: jwt.PyJWTError) -> AuthenticationError:
    if isinstance(error, jwt.MissingRequiredClaimError):
        return _rejected(f"token has no '{error.claim}' claim", "missing_claim")
    for error_type, message, reason in _TOKEN_ERRORS:
        if isinstance(error, error_type):
            return _rejected(message, reason)
    return _rejected("token is invalid", "invalid_token")


class TokenVerifier:
    """Checks bearer tokens against the identity provider's keys and returns their principal.

    JWKS keys are cached by key id for ``jwks_cache_s``. A token with an unknown key id
    (the provider rotated its keys) triggers a refetch, at most once per ``jwks_refetch_min_s``.
    When a refetch fails, keys already known keep verifying tokens until the provider is back.
    """

    def __init__(
        self,
        settings: AuthSettings,
        *,
        http_client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if settings.jwks_url is None and settings.dev_signing_key is None:
            raise ValueError(
                "authentication is not configured: set auth.jwks_url or auth.dev_signing_key"
            )
        self._settings = settings
        self._algorithms = list(settings.algorithms)
        self._clock = clock
        self._owns_client = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=settings.jwks_timeout_s)
        self._static_keys: dict[str, jwt.PyJWK] = {}
        self._dev_key: jwt.PyJWK | None = None
        if settings.dev_signing_key is not None:
            jwk = _public_jwk(_load_private_key(settings.dev_signing_key))
            self._dev_key = jwt.PyJWK(jwk)
            self._static_keys[jwk["kid"]] = self._dev_key
        self._jwks_keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._last_fetch_failed = False
        self._lock = asyncio.Lock()

    @property
    def settings(self) -> AuthSettings:
        return self._settings

    async def verify(self, token: str) -> Principal:
        """Verify signature and claims of ``token``; raise ``AuthenticationError`` if any fails."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise _rejected("token is malformed", "malformed") from error
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise _rejected(f"token algorithm {alg!r} is not accepted", "algorithm_not_allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _rejected("token header 'kid' is not a string", "malformed")
        key = await self._signing_key(kid)
        if alg != key.algorithm_name:
            raise _rejected(
                f"token algorithm {alg!r} does not match its signing key", "algorithm_not_allowed"
            )
        settings = self._settings
        options: Options = {
            "require": ["exp", "sub"],
            "verify_aud": settings.audience is not None,
            "verify_iss": settings.issuer is not None,
        }
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                options=options,
                audience=settings.audience,
                issuer=settings.issuer,
                leeway=settings.leeway_s,
            )
        except jwt.PyJWTError as error:
            raise _map_token_error(error) from error
        subject = claims["sub"]
        username = claims.get("preferred_username")
        return Principal(
            subject=subject,
            username=username if isinstance(username, str) and username else subject,
            roles=roles_from_claims(claims, settings.roles_claim),
            claims=claims,
        )

    async def refresh(self) -> None:
        """Fetch the JWKS now (startup warm-up); raise ``DependencyUnavailableError`` on failure."""
        async with self._lock:
            await self._fetch_jwks()

    async def aclose(self) -> None:
        """Close the HTTP client if this verifier created it."""
        if self._owns_client:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _signing_key(self, kid: str | None) -> jwt.PyJWK:
        if kid is None:
            # Only the dev key may sign without a key id: JWKS keys are looked up by it.
            if self._dev_key is not None:
                return self._dev_key
            raise _rejected("token header has no 'kid'", "malformed")
        static = self._static_keys.get(kid)
        if static is not None:
            return static
        if self._settings.jwks_url is None:
            raise _rejected("token is signed with an unknown key", "unknown_key")
        key = self._jwks_keys.get(kid)
        if key is not None and self._cache_fresh():
            return key
        async with self._lock:
            key = self._jwks_keys.get(kid)
            if key is not None and self._cache_fresh():
                return key  # another request refreshed the cache while this one waited
            if self._may_fetch():
                try:
                    await self._fetch_jwks()
                except DependencyUnavailableError:
                    if key is None:
                        raise
                    _log.warning("jwks_refresh_failed_using_cached_key", kid=kid)
                    return key
                key = self._jwks_keys.get(kid)
            elif key is None and self._last_fetch_failed:
                raise self._unavailable()
        if key is None:
            raise _rejected("token is signed with an unknown key", "unknown_key")
        return key

    def _cache_fresh(self) -> bool:
        return (
            self._fetched_at is not None
            and self._clock() - self._fetched_at < self._settings.jwks_cache_s
        )

    def _may_fetch(self) -> bool:
        return (
            self._attempted_at is None
            or self._clock() - self._attempted_at >= self._settings.jwks_refetch_min_s
        )

    def _unavailable(self) -> DependencyUnavailableError:
        return DependencyUnavailableError("the identity provider's signing keys are unavailable")

    async def _fetch_jwks(self) -> None:
        url = self._settings.jwks_url
        if url is None:
            return
        self._attempted_at = self._clock()
        try:
            response = await self._http.get(url, headers={"Accept": "application/json"})
            response.raise_for_status()
            document = response.json()
        except (httpx.HTTPError, ValueError) as error:
            self._last_fetch_failed = True
            _log.warning("jwks_fetch_failed", url=url, error=repr(error))
            raise self._unavailable() from error
        keys = _parse_jwks(document)
        if keys is None:
            self._last_fetch_failed = True
            _log.warning("jwks_document_invalid", url=url)
            raise self._unavailable()
        self._jwks_keys = keys
        self._fetched_at = self._attempted_at
        self._last_fetch_failed = False
        _log.info("jwks_fetched", url=url, kids=sorted(keys))


class CachingTokenVerifier(TokenVerifier):
    """A ``TokenVerifier`` that remembers verified tokens for a short while.

    A client sends the same bearer token with every request (a label, a prediction), so checking
    its signature once per token rather than once per request takes authentication off the hot
    path. An entry lives ``max_age_s`` at most and never past the token's own ``exp``.
    """

    def __init__(
        self, settings: AuthSettings, *, max_age_s: float = 60.0, max_entries: int = 4096
    ) -> None:
        super().__init__(settings)
        self._max_age_s = max_age_s
        self._max_entries = max_entries
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    async def verify(self, token: str) -> Principal:
        now = time.time()
        cached = self._verified.get(token)
        if cached is not None and cached[1] > now:
            return cached[0]
        principal = await super().verify(token)
        expires = principal.claims.get("exp")
        until = now + self._max_age_s
        if isinstance(expires, int | float):
            until = min(until, float(expires))
        self._verified[token] = (principal, until)
        self._verified.move_to_end(token)
        while len(self._verified) > self._max_entries:
            self._verified.popitem(last=False)
        return principal


def _parse_jwks(document: Any) -> dict[str, jwt.PyJWK] | None:
    """Signing keys of a JWKS document by key id; ``None`` if it is not a JWKS at all."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        return None
    keys: dict[str, jwt.PyJWK] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict):
            continue
        kid = entry.get("kid")
        # Keycloak also publishes encryption keys (use=enc); they never sign tokens.
        if not isinstance(kid, str) or entry.get("use", "sig") != "sig":
            continue
        if entry.get("alg") is not None and entry["alg"] not in ASYMMETRIC_ALGORITHMS:
            continue
        try:
            keys[kid] = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            _log.warning("jwks_key_skipped", kid=kid)
    return keys


# --- FastAPI wiring -------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, bearerFormat="JWT")


def _token_verifier(request: Request) -> TokenVerifier:
    verifier = getattr(request.app.state, "token_verifier", None)
    if not isinstance(verifier, TokenVerifier):
        raise RuntimeError("app.state.token_verifier is not set; the app factory must set it")
    return verifier


async def get_current_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller of this request, from its ``Authorization: Bearer`` token."""
    verifier = _token_verifier(request)
    if credentials is None:
        if request.headers.get("Authorization"):
            raise _rejected("Authorization header must be 'Bearer <token>'", "invalid_scheme")
        raise _rejected("missing bearer token", "missing_token")
    return await verifier.verify(credentials.credentials)


# --- What a route demands, readable from the route itself ---------------------------------

_D = TypeVar("_D", bound=Callable[..., Any])


@dataclass(frozen=True)
class AuthRequirement:
    """What a route asks of its caller, as its dependencies declare it (``route_auth``)."""

    roles: frozenset[str] = frozenset()
    """Roles a bearer token must hold, every one of them; empty: any valid token will do."""

    schemes: frozenset[str] = frozenset({"bearer"})
    """How a caller may prove who they are: ``bearer`` (a JWT) and service-specific schemes
    such as ``basic`` or ``webhook_secret``."""


@dataclass(frozen=True)
class _Declaration:
    roles: frozenset[str]
    roles_from: Callable[[Any], Iterable[str]] | None
    schemes: frozenset[str]


# Weak keys: require_roles makes a closure per call, which may be dropped with its router.
_declarations: weakref.WeakKeyDictionary[Callable[..., Any], _Declaration] = (
    weakref.WeakKeyDictionary()
)


def declares_auth(
    *roles: str,
    roles_from: Callable[[Any], Iterable[str]] | None = None,
    schemes: Iterable[str] = ("bearer",),
) -> Callable[[_D], _D]:
    """Mark a FastAPI dependency as the one that authenticates (and authorises) a route.

    Route audits read the mark with ``route_auth`` instead of restating each route's roles.
    ``roles_from`` gives roles known only once the app is built (from ``app.state``, e.g. a
    role name in the settings); they add to ``roles``.
    """
    declaration = _Declaration(frozenset(roles), roles_from, frozenset(schemes))

    def mark(dependency: _D) -> _D:
        _declarations[dependency] = declaration
        return dependency

    return mark


def route_auth(dependant: Dependant, state: Any) -> AuthRequirement | None:
    """The authentication a route's dependency tree declares, ``None`` if nothing does.

    ``dependant`` is a route's: ``APIRoute.dependant``, or for an included router's route the
    ``dependant`` of its context from ``fastapi.routing.iter_route_contexts(app.routes)``, which
    holds the router-level dependencies too. ``state`` is the built app's ``app.state``, for
    ``roles_from``. The outermost declared dependency on each branch speaks for it; several
    branches add their roles and schemes up.
    """
    found: list[_Declaration] = []

    def walk(node: Dependant) -> None:
        for sub in node.dependencies:
            declaration = _declarations.get(sub.call) if sub.call is not None else None
            if declaration is not None:
                found.append(declaration)
            else:
                walk(sub)

    walk(dependant)
    if not found:
        return None
    roles: set[str] = set()
    schemes: set[str] = set()
    for declaration in found:
        roles |= declaration.roles
        if declaration.roles_from is not None:
            roles |= set(declaration.roles_from(state))
        schemes |= declaration.schemes
    return AuthRequirement(frozenset(roles), frozenset(schemes))


declares_auth()(get_current_principal)

CurrentPrincipal = Annotated[Principal, Depends(get_current_principal)]
"""The authenticated caller; any valid token will do."""


def require_roles(*roles: str) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency giving the caller if their token holds every one of ``roles``, else 403."""
    required = tuple(dict.fromkeys(roles))

    async def principal_with_roles(principal: CurrentPrincipal) -> Principal:
        missing = [role for role in required if role not in principal.roles]
        if missing:
            raise PermissionDeniedError(
                f"missing required role '{missing[0]}'"
                if len(missing) == 1
                else f"missing required roles {', '.join(repr(r) for r in missing)}",
                details={"missing_roles": missing},
            )
        return principal

    return declares_auth(*required)(principal_with_roles)


ANONYMOUS = Principal(subject="anonymous", username="anonymous")
"""The caller of a service whose auth is off (local runs)."""


def auth_enabled(request: Request) -> bool:
    """Whether the app factory put a ``TokenVerifier`` on ``app.state.token_verifier``."""
    return isinstance(getattr(request.app.state, "token_verifier", None), TokenVerifier)


@declares_auth()
async def get_reader(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """Whoever may read: any authenticated caller, or everyone (``ANONYMOUS``) while the
    service runs with auth off."""
    if not auth_enabled(request):
        return ANONYMOUS
    return await get_current_principal(request, credentials)


def role_or_anonymous(role: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency giving the caller if their token holds ``role`` (else 401/403), or
    ``ANONYMOUS`` while the service runs with auth off."""
    checked = require_roles(role)

    @declares_auth(role)
    async def principal_or_anonymous(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        if not auth_enabled(request):
            return ANONYMOUS
        return await checked(await get_current_principal(request, credentials))

    return principal_or_anonymous


# --- Local development: keys and tokens without Keycloak ----------------------------------


def generate_dev_key(kind: Literal["EC", "RSA"] = "EC") -> str:
    """A fresh PEM private key for ``AuthSettings.dev_signing_key``: EC P-256 or RSA 2048."""
    private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if kind == "EC":
        private_key = ec.generate_private_key(ec.SECP256R1())
    else:
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def _load_private_key(pem: str | SecretStr) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    text = pem.get_secret_value() if isinstance(pem, SecretStr) else pem
    key = serialization.load_pem_private_key(text.encode("ascii"), password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        return key
    raise ValueError(f"unsupported dev signing key type {type(key).__name__}; use EC or RSA")


def _algorithm_for(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    by_curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
    try:
        return by_curve[key.curve.name]
    except KeyError:
        raise ValueError(f"unsupported EC curve {key.curve.name}") from None


def _thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 JWK thumbprint: a key id that depends on the public key alone."""
    members = ("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _public_jwk(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, kid: str | None = None
) -> dict[str, Any]:
    public = key.public_key()
    jwk = (
        RSAAlgorithm.to_jwk(public, as_dict=True)
        if isinstance(public, rsa.RSAPublicKey)
        else ECAlgorithm.to_jwk(public, as_dict=True)
    )
    jwk.update(use="sig", alg=_algorithm_for(key), kid=kid or _thumbprint(jwk))
    return jwk


def jwks_from_private_key(private_pem: str | SecretStr, kid: str | None = None) -> dict[str, Any]:
    """The JWKS document publishing the public half of ``private_pem``.

    ``kid`` defaults to the key's RFC 7638 thumbprint, the id ``issue_dev_token`` uses too.
    """
    return {"keys": [_public_jwk(_load_private_key(private_pem), kid)]}


def issue_dev_token(
    private_pem: str | SecretStr,
    *,
    subject: str,
    roles: Iterable[str] = (),
    expires_in: int = 3600,
    issuer: str | None = None,
    audience: str | None = None,
    kid: str | None = None,
    username: str | None = None,
    roles_claim: str = "realm_access.roles",
    extra_claims: Mapping[str, Any] | None = None,
) -> str:
    """A signed access token shaped like Keycloak's, for local runs and tests.

    ``expires_in`` is in seconds from now and may be negative to make an expired token. The roles
    go at ``roles_claim`` (a dotted path makes nested objects); ``kid`` defaults to the key's
    thumbprint, which a verifier with the same ``dev_signing_key`` recognises.
    """
    key = _load_private_key(private_pem)
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": subject,
        "preferred_username": username or subject,
        "iat": now,
        "exp": now + expires_in,
    }
    if issuer is not None:
        claims["iss"] = issuer
    if audience is not None:
        claims["aud"] = audience
    *parents, leaf = roles_claim.split(".")
    target = claims
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = sorted(set(roles))
    claims.update(extra_claims or {})
    header_kid = kid or _public_jwk(key)["kid"]
    return jwt.encode(claims, key, algorithm=_algorithm_for(key), headers={"kid": header_kid})
