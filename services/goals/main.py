"""Entry point: `python -m services.goals.main` serves the goals API on its port."""

import uvicorn

from services.goals.api import create_app
from services.goals.settings import GoalsSettings


def main() -> None:
    settings = GoalsSettings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


if __name__ == "__main__":
    main()
