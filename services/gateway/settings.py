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
    max_complexity: int = 100_000
    """The query cost budget (`services.gateway.limits`): a query estimated to resolve more
    fields than this is refused before it runs. The whole-organisation alignment query (three
    levels) costs about 53,000; GraphiQL's introspection about 44,000, growing with the schema."""
    forward_timeout_seconds: float = 10.0
    """How long a forwarded mutation waits for the owning service's answer."""
