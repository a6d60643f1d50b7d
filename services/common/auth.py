"""Bearer JWTs (PyJWT) and the roles of DESIGN.md.

In development the HS256 secret is a random one kept in `.data/dev-jwt-secret`, shared by the
services and `make token`; in production it comes from `TANDEM_JWT_SECRET`.
"""

from __future__ import annotations

import argparse
import enum
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import jwt
from fastapi import Depends
from starlette.requests import HTTPConnection

from services.common.problems import Problem
from services.common.settings import DATA_DIR, ServiceSettings

ALGORITHM = "HS256"
DEV_SECRET_FILE = DATA_DIR / "dev-jwt-secret"


class Role(enum.StrEnum):
    admin = "admin"
    member = "member"
    hr_sync = "hr_sync"
    auditor = "auditor"
    service = "service"


WRITERS = (Role.admin, Role.member, Role.service)
READERS = tuple(Role)


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
    def __init__(self, settings: ServiceSettings):
        self.secret = signing_secret(settings)
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience

    def verify(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token, self.secret, algorithms=[ALGORITHM], audience=self.audience,
                issuer=self.issuer, options={"require": ["exp", "sub"]},
            )
        except jwt.PyJWTError as e:
            raise _unauthorized(f"Invalid bearer token: {e}.") from e
        try:
            roles = frozenset(Role(r) for r in claims.get("roles", []))
        except ValueError as e:
            raise _unauthorized("The token names an unknown role.") from e
        return Principal(subject=str(claims["sub"]), roles=roles, token=token)


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
