"""Bearer JWTs (PyJWT) and the roles of DESIGN.md.

Two modes, chosen by the settings:

- Shared secret (the default): HS256 tokens. In development the secret is a random one kept in
  `.data/dev-jwt-secret`, shared by the services and `make token`; otherwise it comes from
  `TANDEM_JWT_SECRET`.
- OIDC (`TANDEM_OIDC_ISSUER` set): tokens signed by the issuer, verified with the public key
  its JWKS names by the token's `kid` (`TANDEM_OIDC_JWKS_URL`, or the `jwks_uri` of the
  issuer's discovery document). The key set is cached; a token whose `kid` is not in it makes
  the verifier fetch the set again (at most once per cooldown), which is how the issuer's key
  rotation reaches us. Only the asymmetric algorithm the key declares (or its key type allows)
  is accepted: never `none`, never HS* with a public key. `iss`, `aud`, `exp` and `sub` are
  required and checked.

Roles come from the claim `TANDEM_ROLES_CLAIM` (default `roles`). A refused token is a 401
whose detail says why in fixed words: never the token, never a secret.
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import secrets
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import jwt
from fastapi import Depends
from starlette.requests import HTTPConnection

from services.common.problems import Problem
from services.common.settings import DATA_DIR, ServiceSettings

log = logging.getLogger(__name__)

ALGORITHM = "HS256"
DEV_SECRET_FILE = DATA_DIR / "dev-jwt-secret"

# What a key of each type may sign with, when the JWK does not name its `alg`.
ASYMMETRIC_ALGORITHMS: dict[str, tuple[str, ...]] = {
    "RSA": ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    "EC": ("ES256", "ES384", "ES512", "ES256K"),
    "OKP": ("EdDSA",),
}
_ALL_ASYMMETRIC = frozenset(a for algs in ASYMMETRIC_ALGORITHMS.values() for a in algs)


class Role(enum.StrEnum):
    admin = "admin"
    member = "member"
    hr_sync = "hr_sync"
    auditor = "auditor"
    service = "service"


WRITERS = (Role.admin, Role.member, Role.service)
"""Who may write at all; a member only their own and their unit's goals (services.goals.access)."""
READERS = tuple(Role)
DATA_READERS = (Role.admin, Role.member, Role.auditor, Role.service)
"""Who reads goal and KPI data: hr_sync reads only SCIM and the feeds."""
OPERATORS = (Role.admin, Role.service)
"""Who writes what no member may: units, people, cycles and grades, KPIs and measurements."""


@dataclass(frozen=True)
class Principal:
    subject: str
    roles: frozenset[Role]
    token: str

    def has_any(self, roles: tuple[Role, ...]) -> bool:
        return bool(self.roles.intersection(roles))


def dev_secret(path: Path = DEV_SECRET_FILE) -> str:
    """The development secret, created on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        candidate = secrets.token_urlsafe(32)
        try:
            with path.open("x") as f:
                f.write(candidate)
        except FileExistsError:
            pass
    return path.read_text().strip()


def signing_secret(settings: ServiceSettings) -> str:
    if settings.jwt_secret is not None:
        return settings.jwt_secret.get_secret_value()
    return dev_secret()


def mint_token(
    *, secret: str, role: str, subject: str, issuer: str = "tandem-dev", audience: str = "tandem",
    ttl_seconds: int = 12 * 3600,
) -> str:
    now = int(time.time())
    claims = {"sub": subject, "roles": [Role(role).value], "iss": issuer, "aud": audience,
              "iat": now, "exp": now + ttl_seconds}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


class TokenVerifier:
    """Verifies a bearer token in the mode the settings choose (the module's docstring)."""

    def __init__(self, settings: ServiceSettings):
        self.roles_claim = settings.roles_claim
        self.oidc: OidcKeys | None = None
        if settings.oidc_issuer:
            self.oidc = OidcKeys(settings)
            self.issuer = settings.oidc_issuer
            self.audience = settings.oidc_audience or settings.jwt_audience
            self.secret = None
        else:
            self.secret = signing_secret(settings)
            self.issuer = settings.jwt_issuer
            self.audience = settings.jwt_audience

    def verify(self, token: str) -> Principal:
        try:
            if self.oidc is None:
                key: Any = self.secret
                algorithms = [ALGORITHM]
            else:
                key, algorithms = self.oidc.key_for(token)
            claims = jwt.decode(
                token, key, algorithms=algorithms, audience=self.audience, issuer=self.issuer,
                options={"require": ["exp", "sub", "iss", "aud"]}, leeway=5,
            )
        except jwt.PyJWKClientConnectionError as e:
            log.warning("the OIDC issuer's keys could not be fetched: %s", type(e).__name__)
            raise Problem(503, "Service Unavailable", "The token issuer's keys cannot be fetched now; retry later.",
                          kind="token-keys-unavailable", headers={"Retry-After": "5"}) from None
        except jwt.PyJWTError as e:
            raise _unauthorized(_reason(e)) from None
        return Principal(subject=str(claims["sub"]), roles=self._roles(claims), token=token)

    def _roles(self, claims: Mapping[str, Any]) -> frozenset[Role]:
        value: Any = claims
        for part in self.roles_claim.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        names = value.split() if isinstance(value, str) else value if isinstance(value, list) else []
        if self.oidc is not None:  # an issuer's tokens carry roles of other applications too
            return frozenset(Role(n) for n in names if n in Role.__members__)
        try:
            return frozenset(Role(n) for n in names)
        except ValueError:
            raise _unauthorized("The token names an unknown role.") from None


class UnknownKey(jwt.PyJWTError):
    """The token's `kid` names no key of the issuer, even after fetching its keys again."""


class OidcKeys:
    """The issuer's signing keys: found by discovery or configured, cached, fetched again when a
    token names a `kid` the cached set lacks (at most once per cooldown)."""

    def __init__(self, settings: ServiceSettings, timeout: float = 5.0):
        assert settings.oidc_issuer
        self.issuer = settings.oidc_issuer
        self.jwks_url = settings.oidc_jwks_url
        self.cache_seconds = settings.oidc_jwks_cache_seconds
        self.cooldown = settings.oidc_jwks_refresh_cooldown_seconds
        self.timeout = timeout
        self._client: jwt.PyJWKClient | None = None
        self._lock = threading.Lock()

    def client(self) -> jwt.PyJWKClient:
        with self._lock:
            if self._client is None:
                url = self.jwks_url or self._discover()
                self._client = jwt.PyJWKClient(url, cache_jwk_set=True, lifespan=self.cache_seconds,
                                               timeout=self.timeout, cooldown_duration=self.cooldown)
            return self._client

    def _discover(self) -> str:
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        if urlsplit(url).scheme not in ("http", "https"):
            raise jwt.PyJWKClientError("The OIDC issuer must be an http(s) URL.")
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:  # noqa: S310 - http(s) only
                document = json.load(response)
        except (OSError, ValueError) as e:
            raise jwt.PyJWKClientConnectionError(f"discovery failed: {type(e).__name__}") from e
        if not isinstance(document, dict) or document.get("issuer") != self.issuer:
            raise jwt.PyJWKClientConnectionError("the discovery document names another issuer")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise jwt.PyJWKClientConnectionError("the discovery document has no jwks_uri")
        return jwks_uri

    def key_for(self, token: str) -> tuple[Any, list[str]]:
        """The public key the token's `kid` names, and the algorithms it may have signed with."""
        header = jwt.get_unverified_header(token)
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise jwt.InvalidTokenError("no kid")
        try:
            jwk = self.client().get_signing_key(kid)
        except jwt.PyJWKClientConnectionError:
            raise
        except jwt.PyJWKClientError as e:
            raise UnknownKey("unknown kid") from e
        declared = jwk._jwk_data.get("alg")  # noqa: SLF001 - what the JWK itself says, if anything
        allowed = ASYMMETRIC_ALGORITHMS.get(jwk.key_type, ())
        algorithms = [declared] if declared in allowed else [] if declared else list(allowed)
        if not algorithms:  # a symmetric (`oct`) key, or one whose alg does not fit its type
            raise jwt.InvalidAlgorithmError("key not usable")
        return jwk.key, algorithms


def _reason(e: jwt.PyJWTError) -> str:
    """Why a token was refused, in words of our own (PyJWT's messages may quote the token)."""
    if isinstance(e, jwt.ExpiredSignatureError):
        return "The bearer token has expired."
    if isinstance(e, jwt.ImmatureSignatureError):
        return "The bearer token is not valid yet."
    if isinstance(e, jwt.InvalidAudienceError):
        return "The bearer token is not meant for this audience."
    if isinstance(e, jwt.InvalidIssuerError):
        return "The bearer token comes from another issuer."
    if isinstance(e, jwt.MissingRequiredClaimError):
        return f"The bearer token lacks the '{e.claim}' claim."
    if isinstance(e, jwt.InvalidSignatureError):
        return "The bearer token's signature does not verify."
    if isinstance(e, jwt.InvalidAlgorithmError):
        return "The bearer token's algorithm is not accepted."
    if isinstance(e, UnknownKey):
        return "The bearer token names a key (kid) the issuer does not have."
    if isinstance(e, jwt.DecodeError):
        return "The bearer token is not a well-formed JWT."
    return "The bearer token is not valid."


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "Unauthorized", detail, kind="unauthorized",
                   headers={"WWW-Authenticate": 'Bearer realm="tandem"'})


def authenticate(request: HTTPConnection) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("A bearer token is required.")
    verifier: TokenVerifier = request.app.state.token_verifier
    return verifier.verify(token.strip())


def require(*roles: Role):  # noqa: ANN201 - a FastAPI dependency
    """A dependency that authenticates and lets only the given roles through."""

    def dependency(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if not principal.has_any(roles):
            raise Problem(403, "Forbidden",
                          f"This operation needs one of the roles: {', '.join(r.value for r in roles)}.",
                          kind="forbidden")
        return principal

    return dependency


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tandem-auth")
    sub = parser.add_subparsers(dest="command", required=True)
    token = sub.add_parser("token", help="print a development bearer token")
    token.add_argument("--role", default="admin", choices=[r.value for r in Role])
    token.add_argument("--subject", default="dev")
    token.add_argument("--ttl", type=int, default=12 * 3600)
    args = parser.parse_args(argv)
    import os

    secret = os.environ.get("TANDEM_JWT_SECRET") or dev_secret()
    print(mint_token(secret=secret, role=args.role, subject=args.subject, ttl_seconds=args.ttl,
                     issuer=os.environ.get("TANDEM_JWT_ISSUER", "tandem-dev"),
                     audience=os.environ.get("TANDEM_JWT_AUDIENCE", "tandem")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
