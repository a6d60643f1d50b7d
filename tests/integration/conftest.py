from collections.abc import Iterator

import pytest

from tests.conftest import fresh_database


@pytest.fixture(scope="session", autouse=True)
def _database(service_environment: None) -> None:
    """Every test here talks to the real PostgreSQL of this session."""


@pytest.fixture(scope="module")
def own_database() -> Iterator[str]:
    """A database of the module's own, for a module that must not see another's data: the
    gateway's `organization` is the first company created, a bulk load's 10,000 events would
    hold up every other module's followers."""
    with fresh_database() as url:
        yield url
