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

    run_projections: bool = True
    """Run this service's projection runners as threads beside the API."""
    read_wait_timeout_seconds: float = 10.0
    """How long a read may wait for a projection to reach a position it asked for."""

    telemetry_exporter: Literal["console", "otlp", "none"] = "console"
    telemetry_console_path: Path | None = None
    """Where the console exporter writes spans (stderr when unset)."""
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None, validation_alias="OTEL_EXPORTER_OTLP_ENDPOINT"
    )
