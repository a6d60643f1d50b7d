"""Entry point: `python -m services.gateway.main` serves GraphQL on the gateway's port."""

import uvicorn

from services.gateway.api import create_app
from services.gateway.settings import GatewaySettings


def main() -> None:
    settings = GatewaySettings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


if __name__ == "__main__":
    main()
