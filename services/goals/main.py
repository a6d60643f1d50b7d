"""Entry point: `python -m services.goals.main` serves the goals API on its port, with its
projection runners; `--projections-only` runs the runners alone (`services.common.runner`)."""

from services.common.runner import serve
from services.goals.api import create_app
from services.goals.projections import GOALS_PROJECTIONS
from services.goals.settings import GoalsSettings


def main() -> None:
    serve(GoalsSettings, create_app, lambda settings: GOALS_PROJECTIONS)


if __name__ == "__main__":
    main()
