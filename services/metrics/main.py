"""Entry point: `python -m services.metrics.main` serves the metrics API on its port, with its
projection runner; `--projections-only` runs the runner alone (`services.common.runner`)."""

from services.common.runner import serve
from services.metrics.api import create_app
from services.metrics.projections import METRICS_PROJECTIONS
from services.metrics.settings import MetricsSettings


def main() -> None:
    serve(MetricsSettings, create_app, lambda settings: METRICS_PROJECTIONS)


if __name__ == "__main__":
    main()
