from collections.abc import Iterator

import pytest

from services.stack import Stack
from tests.conftest import free_port, fresh_database


@pytest.fixture(scope="session", autouse=True)
def _database(service_environment: None) -> None:
    """Every test here talks to the real PostgreSQL of this session."""


@pytest.fixture(scope="module")
def stack(service_environment: None) -> Iterator[Stack]:
    """The three real processes, started as `make run` starts them, on a database of their own:
    each test module gets its own stack, so that what one module writes (the demo organisation,
    schemathesis's generated units) never shows in another's queries."""
    with fresh_database() as url:
        s = Stack(url, gateway_port=free_port(), goals_port=free_port(), metrics_port=free_port())
        s.log_dir = s.log_dir.parent / f"logs-e2e-{s.gateway_port}"
        s.start()
        try:
            yield s
        finally:
            s.stop()
