"""Property-based tests of both REST services, over HTTP against the real processes: every
operation in the committed OpenAPI contracts, with generated valid and invalid input, under
all of schemathesis's checks (no 5xx, documented statuses and content types, responses that
match their schemas, invalid input rejected). Bounded in examples so the suite stays quick."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from services.contracts import CONTRACTS
from services.stack import Stack

goals = schemathesis.openapi.from_path(CONTRACTS / "openapi" / "goals.json")
metrics = schemathesis.openapi.from_path(CONTRACTS / "openapi" / "metrics.json")
BOUNDED = settings(max_examples=15, deadline=None, derandomize=True,
                   suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def headers(auth: Callable[..., dict[str, str]]) -> dict[str, str]:
    return auth("admin", "schemathesis")


@goals.parametrize()
@BOUNDED
def test_goals_api(case: schemathesis.Case, stack: Stack, headers: dict[str, str]) -> None:
    case.call_and_validate(base_url=stack.url("goals"), headers=headers)


@metrics.parametrize()
@BOUNDED
def test_metrics_api(case: schemathesis.Case, stack: Stack, headers: dict[str, str]) -> None:
    case.call_and_validate(base_url=stack.url("metrics"), headers=headers)
