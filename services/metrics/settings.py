"""The metrics service's settings (environment variables prefixed `TANDEM_`)."""

from pydantic import Field

from services.common.settings import ServiceSettings


class MetricsSettings(ServiceSettings):
    service_name: str = "metrics"
    schema_name: str = "metrics"
    port: int = 8002

    staleness_grace_seconds: float = Field(6 * 3600, ge=0)
    """How long past its cadence a KPI may go without a measurement before it is stale."""
    staleness_check_interval_seconds: float = Field(60, gt=0)
    """How often the staleness watch looks for KPIs whose next measurement is overdue."""
    run_staleness_watch: bool = True
    """Run the staleness watch in this process (it checks once at start-up, catching up on
    whatever went stale while the service was down, and then every interval)."""
