"""The metrics service's settings (environment variables prefixed `TANDEM_`)."""

from services.common.settings import ServiceSettings


class MetricsSettings(ServiceSettings):
    service_name: str = "metrics"
    schema_name: str = "metrics"
    port: int = 8002
