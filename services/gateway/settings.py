"""The gateway's settings (environment variables prefixed `TANDEM_`)."""

from services.common.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    service_name: str = "gateway"
    schema_name: str = "gateway"
    port: int = 8000
    goals_url: str = "http://127.0.0.1:8001"
    """Where GraphQL mutations on goal data go (the goals service owns them)."""
    metrics_url: str = "http://127.0.0.1:8002"
    """Where GraphQL mutations on KPIs go (the metrics service owns them)."""
