import pytest


@pytest.fixture(scope="session", autouse=True)
def _database(service_environment: None) -> None:
    """Every test here talks to the real PostgreSQL of this session."""
