"""The goals service's settings (environment variables prefixed `TANDEM_`)."""

from services.common.settings import ServiceSettings


class GoalsSettings(ServiceSettings):
    service_name: str = "goals"
    schema_name: str = "goals"
    port: int = 8001
