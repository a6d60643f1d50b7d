"""Settings every Tandem service reads from its environment, in one typed place.

Each service subclasses `ServiceSettings` in its own `settings.py` and adds what is its own
(port, schema). Nothing here has a default that would be wrong in production except where the
name says development.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / ".data"


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_", extra="ignore", frozen=True)

    service_name: str
    schema_name: str
    host: str = "127.0.0.1"
    port: int

    database_url: str = Field(validation_alias="DATABASE_URL")
    database_pool_size: int = 10

    jwt_secret: SecretStr | None = None
    """HS256 shared secret. Unset in development: a random one is kept under `.data/`."""
    jwt_issuer: str = "tandem-dev"
    jwt_audience: str = "tandem"
    oidc_issuer: str | None = None
    """An OIDC issuer (its `iss`). Set: bearer tokens are verified with the issuer's JWKS only
    (asymmetric algorithms, by `kid`), never with the shared secret."""
    oidc_audience: str | None = None
    """The `aud` tokens must carry in OIDC mode (`jwt_audience` when unset)."""
    oidc_jwks_url: str | None = None
    """The issuer's JWKS; unset: `jwks_uri` of `<issuer>/.well-known/openid-configuration`."""
    oidc_jwks_cache_seconds: float = 300.0
    """How long the fetched key set is trusted before it is fetched again."""
    oidc_jwks_refresh_cooldown_seconds: float = 10.0
    """At most one refetch per this many seconds for tokens with an unknown `kid` (rotation)."""
    roles_claim: str = "roles"
    """The claim that holds the roles (a list or a space-separated string); dots reach into
    nested claims, e.g. `realm_access.roles`."""
    ready_max_lag_events: int = 10_000
    """/readyz answers 503 while a projection running in this process is further behind its
    log's head than this many events."""

    run_projections: bool = True
    """Run this service's projection runners as threads beside the API."""
    run_api: bool = True
    """Serve the API. False (or `python -m services.<service>.main --projections-only`): run only
    the projection runners, with `/healthz` and `/readyz` on the port (a runner Deployment)."""
    read_wait_timeout_seconds: float = 10.0
    """How long a read may wait for a projection to reach a position it asked for."""

    telemetry_exporter: Literal["console", "otlp", "none"] = "console"
    telemetry_console_path: Path | None = None
    """Where the console exporter writes spans (stderr when unset)."""
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None, validation_alias="OTEL_EXPORTER_OTLP_ENDPOINT"
    )
