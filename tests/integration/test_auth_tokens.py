"""Bearer tokens in both modes, on a real goals app: the development shared secret (HS256), and
an OIDC issuer's JWKS served by a small HTTP server in this test (RSA keys made here with
`cryptography`), found through the issuer's discovery document.

Expired, wrongly signed, wrong issuer or audience, `alg: none`, and key-confusion (HS256 signed
with the issuer's public key) tokens get 401 problem details that never echo the token; a
rotation (new `kid`) is picked up by one refetch of the key set, and a key the issuer removed
stops working.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.common.auth import Role, TokenVerifier, mint_token
from services.common.problems import Problem
from services.goals.api import create_app
from services.goals.settings import GoalsSettings
from tests.conftest import TEST_SECRET, free_port, serve_in_process

pytestmark = pytest.mark.asyncio(loop_scope="session")

AUDIENCE = "tandem-api"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A token put together by hand (what PyJWT would refuse to make)."""
    return ".".join([b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(signature)])


class Issuer:
    """An OIDC issuer: discovery document and JWKS over HTTP, keys that can be rotated, and a
    count of how often the key set was fetched."""

    def __init__(self) -> None:
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.published: list[str] = []
        self.jwks_fetches = 0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server name
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": f"{issuer.url}/jwks.json"}
                elif self.path == "/jwks.json":
                    issuer.jwks_fetches += 1
                    body = {"keys": [issuer.jwk(kid) for kid in issuer.published]}
                else:
                    self.send_error(404)
                    return
                payload = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def new_key(self, kid: str) -> None:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self, kid: str) -> dict[str, Any]:
        data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.keys[kid].public_key()))
        return {**data, "kid": kid, "use": "sig", "alg": "RS256"}

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        return {"sub": "grace", "iss": self.url, "aud": AUDIENCE, "iat": now, "exp": now + 300,
                "roles": ["auditor", "offline_access"], **overrides}

    def token(self, kid: str, *, key: Any = None, **claims: Any) -> str:
        return jwt.encode(self.claims(**claims), key or self.keys[kid], algorithm="RS256", headers={"kid": kid})

    def public_pem(self, kid: str) -> bytes:
        return self.keys[kid].public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def issuer() -> Iterator[Issuer]:
    i = Issuer()
    i.new_key("k1")
    i.published = ["k1"]
    i.thread.start()
    yield i
    i.server.shutdown()


def oidc_settings(issuer: Issuer, **overrides: Any) -> GoalsSettings:
    return GoalsSettings(**{"oidc_issuer": issuer.url, "oidc_audience": AUDIENCE,
                            "oidc_jwks_refresh_cooldown_seconds": 0, "run_projections": False, **overrides})


@pytest.fixture(scope="module")
async def oidc_goals(issuer: Issuer) -> AsyncIterator[httpx.AsyncClient]:
    """goals verifying tokens with the issuer's keys (found by discovery)."""
    async for client in serve_in_process(create_app(oidc_settings(issuer))):
        yield client


@pytest.fixture(scope="module")
async def dev_goals() -> AsyncIterator[httpx.AsyncClient]:
    """goals with the shared secret (TANDEM_JWT_SECRET of the test environment)."""
    async for client in serve_in_process(create_app(GoalsSettings(run_projections=False))):
        yield client


async def get_units(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.get("/v1/units", headers={"Authorization": f"Bearer {token}"})


async def refused(client: httpx.AsyncClient, token: str, caplog: pytest.LogCaptureFixture,
                  status: int = 401) -> str:
    """The token is refused with problem details that, like the logs, do not contain it; the detail."""
    with caplog.at_level(logging.DEBUG):
        r = await get_units(client, token)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert token not in r.text and all(part not in r.text for part in token.split(".") if len(part) > 8)
    assert all(token not in record.getMessage() for record in caplog.records)
    if status == 401:
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    return r.json()["detail"]


async def test_shared_secret_mode(dev_goals: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    now = int(time.time())
    good = {"sub": "ada", "roles": ["admin"], "iss": "tandem-dev", "aud": "tandem", "iat": now, "exp": now + 60}
    assert (await get_units(dev_goals, mint_token(secret=TEST_SECRET, role="admin", subject="ada"))).status_code == 200

    assert "expired" in await refused(dev_goals, jwt.encode({**good, "exp": now - 60}, TEST_SECRET), caplog)
    assert "signature" in await refused(dev_goals, jwt.encode(good, "another-secret-0123456789abcdef0123"), caplog)
    assert "issuer" in await refused(dev_goals, jwt.encode({**good, "iss": "someone-else"}, TEST_SECRET), caplog)
    assert "audience" in await refused(dev_goals, jwt.encode({**good, "aud": "other"}, TEST_SECRET), caplog)
    assert "exp" in await refused(dev_goals, jwt.encode({k: v for k, v in good.items() if k != "exp"}, TEST_SECRET),
                                  caplog)
    assert "algorithm" in await refused(dev_goals, unsigned({"alg": "none", "typ": "JWT"}, good), caplog)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert "algorithm" in await refused(dev_goals, jwt.encode(good, rsa_key, algorithm="RS256"), caplog)
    await refused(dev_goals, "not-a-jwt", caplog)


async def test_oidc_mode(oidc_goals: httpx.AsyncClient, issuer: Issuer, caplog: pytest.LogCaptureFixture) -> None:
    r = await get_units(oidc_goals, issuer.token("k1"))
    assert r.status_code == 200, r.text  # an auditor (the issuer's other roles are not ours: left out)

    now = int(time.time())
    assert "expired" in await refused(oidc_goals, issuer.token("k1", exp=now - 60, iat=now - 120), caplog)
    assert "issuer" in await refused(oidc_goals, issuer.token("k1", iss="https://elsewhere.example"), caplog)
    assert "audience" in await refused(oidc_goals, issuer.token("k1", aud="someone-else"), caplog)
    forged_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert "signature" in await refused(oidc_goals, issuer.token("k1", key=forged_key), caplog)
    # alg none, with and without naming the issuer's key.
    assert "algorithm" in await refused(oidc_goals, unsigned({"alg": "none", "kid": "k1"}, issuer.claims()), caplog)
    await refused(oidc_goals, unsigned({"alg": "none"}, issuer.claims()), caplog)
    # Key confusion: HS256 "signed" with the issuer's public key as the HMAC secret.
    header, claims = {"alg": "HS256", "typ": "JWT", "kid": "k1"}, issuer.claims()
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}".encode()
    confused = unsigned(header, claims, hmac.new(issuer.public_pem("k1"), signing_input, hashlib.sha256).digest())
    assert "algorithm" in await refused(oidc_goals, confused, caplog)
    # The development secret means nothing here.
    await refused(oidc_goals, mint_token(secret=TEST_SECRET, role="admin", subject="ada"), caplog)
    # A token without a kid, or with one the issuer never had.
    await refused(oidc_goals, jwt.encode(issuer.claims(), issuer.keys["k1"], algorithm="RS256"), caplog)
    assert "kid" in await refused(oidc_goals, jwt.encode(issuer.claims(), issuer.keys["k1"], algorithm="RS256",
                                                         headers={"kid": "never-was"}), caplog)


async def test_oidc_key_rotation(oidc_goals: httpx.AsyncClient, issuer: Issuer,
                                 caplog: pytest.LogCaptureFixture) -> None:
    old = issuer.token("k1")
    assert (await get_units(oidc_goals, old)).status_code == 200
    issuer.new_key("k2")
    issuer.published = ["k2"]  # rotated: k1 withdrawn
    fetches = issuer.jwks_fetches

    # A token with the new kid: not in the cached set, so the set is fetched once more.
    assert (await get_units(oidc_goals, issuer.token("k2"))).status_code == 200
    assert issuer.jwks_fetches == fetches + 1
    assert (await get_units(oidc_goals, issuer.token("k2"))).status_code == 200
    assert issuer.jwks_fetches == fetches + 1  # cached

    # The withdrawn key no longer verifies anything.
    assert "kid" in await refused(oidc_goals, old, caplog)
    assert "kid" in await refused(oidc_goals, issuer.token("k1"), caplog)
    issuer.published = ["k1", "k2"]  # back for the other tests


async def test_unknown_kids_refetch_at_most_once_per_cooldown(issuer: Issuer) -> None:
    verifier = TokenVerifier(oidc_settings(issuer, oidc_jwks_url=f"{issuer.url}/jwks.json",
                                           oidc_jwks_refresh_cooldown_seconds=60))
    assert verifier.verify(issuer.token("k1")).roles == frozenset({Role.auditor})
    fetches = issuer.jwks_fetches
    issuer.new_key("k3")
    for _ in range(5):  # a flood of unknown kids does not hammer the issuer
        with pytest.raises(Problem) as refused:
            verifier.verify(issuer.token("k3"))
        assert refused.value.status == 401
    assert issuer.jwks_fetches == fetches


async def test_roles_from_a_configured_claim_and_keys_by_type(issuer: Issuer) -> None:
    verifier = TokenVerifier(oidc_settings(issuer, oidc_jwks_url=f"{issuer.url}/jwks.json",
                                           roles_claim="realm_access.roles"))
    token = issuer.token("k1", roles=None, realm_access={"roles": ["member", "uma_authorization"]})
    principal = verifier.verify(token)
    assert (principal.subject, principal.roles) == ("grace", frozenset({Role.member}))
    assert verifier.verify(issuer.token("k1", roles=None)).roles == frozenset()  # no roles: none granted

    # An EC key whose JWK names no alg: its type allows the ES* algorithms only.
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
    from jwt import PyJWK

    assert verifier.oidc is not None
    client = verifier.oidc.client()
    client.get_signing_key = lambda kid: PyJWK({**jwk, "kid": kid})  # type: ignore[method-assign]
    ec_token = jwt.encode(issuer.claims(), ec_key, algorithm="ES256", headers={"kid": "ec"})
    assert verifier.verify(ec_token).subject == "grace"


async def test_unreachable_issuer_is_503_not_401(issuer: Issuer) -> None:
    verifier = TokenVerifier(oidc_settings(issuer, oidc_jwks_url=f"http://127.0.0.1:{free_port()}/jwks.json"))
    token = issuer.token("k1")
    with pytest.raises(Problem) as refused:
        verifier.verify(token)
    assert refused.value.status == 503 and token not in str(refused.value.detail)

