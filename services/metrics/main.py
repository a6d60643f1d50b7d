"""Entry point: `python -m services.metrics.main` serves the metrics API on its port."""

import uvicorn

from services.metrics.api import create_app
from services.metrics.settings import MetricsSettings


def main() -> None:
    settings = MetricsSettings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


if __name__ == "__main__":
    main()
