"""The goals service's settings (environment variables prefixed `TANDEM_`)."""

from pydantic import Field, SecretStr

from services.common.settings import ServiceSettings


class GoalsSettings(ServiceSettings):
    service_name: str = "goals"
    schema_name: str = "goals"
    port: int = 8001

    # Webhook delivery (services.goals.webhooks).
    run_webhook_worker: bool = True
    """Deliver to webhook subscribers from this process. Several processes may: each subscriber
    is delivered to by one of them at a time (a row lock on its cursor)."""
    webhook_secret_key: SecretStr | None = None
    """The key subscribers' signing secrets are derived from (so no secret is ever stored).
    Unset in development: derived from the JWT signing secret. Changing it changes every
    subscriber's secret."""
    webhook_poll_interval_seconds: float = Field(1.0, gt=0, le=3600)
    """How often the worker looks for work when no new event woke it (a retry falling due)."""
    webhook_timeout_seconds: float = Field(10.0, gt=0, le=300)
    """How long one delivery may take before it counts as failed."""
    webhook_retry_base_seconds: float = Field(1.0, gt=0)
    """The wait after a subscriber's first failure; it doubles with each failure in a row..."""
    webhook_retry_max_seconds: float = Field(600.0, gt=0)
    """... up to this."""
    webhook_pause_after_seconds: float = Field(24 * 3600.0, gt=0)
    """A subscriber still failing this long after its first failure in a row is paused."""
    webhook_pause_after_attempts: int = Field(100, ge=1)
    """A subscriber whose last this many attempts all failed is paused (whichever comes first)."""
    webhook_concurrency: int = Field(4, ge=1, le=64)
    """Subscribers delivered to at once (each holds a database connection while it waits)."""
    webhook_delivery_log_days: float = Field(30.0, gt=0)
    """How long the delivery log keeps each attempt."""
