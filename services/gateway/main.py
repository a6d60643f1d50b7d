"""Entry point: `python -m services.gateway.main` serves GraphQL on the gateway's port, with the
alignment projection's runners; `--projections-only` runs the runners alone
(`services.common.runner`)."""

from services.common.runner import serve
from services.gateway.api import create_app
from services.gateway.projections import alignment_projections
from services.gateway.settings import GatewaySettings


def main() -> None:
    serve(GatewaySettings, create_app, lambda settings: alignment_projections(settings.schema_name))


if __name__ == "__main__":
    main()
