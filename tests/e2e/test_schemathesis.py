"""Property-based tests of both REST services and the gateway's GraphQL schema, over HTTP
against the real processes, under all of schemathesis's checks (no 5xx, documented statuses and
content types, responses that match their schemas, invalid input rejected). Bounded in examples
so the suite stays quick.

- Stateless: every operation of the committed OpenAPI contracts with generated valid and invalid
  input, and every query and mutation field of the committed GraphQL schema.
- Stateful: sequences of calls chained by links (schemathesis infers them from the contracts:
  an id one response gives is the path parameter of the next call, a key result's id from its
  objective, a check-in's version from the list of check-ins), so that the operations on a
  resource run against resources that exist. A client here reads its own writes as a real one
  would: each read carries `Tandem-Wait-For` with the positions its writes were answered with
  (unless the case sets that header itself), so that schemathesis's check that a created
  resource can be fetched sees what was written rather than a read model a moment behind.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis import Case, GenerationMode, Response
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

from services.contracts import CONTRACTS
from services.demo import load as load_demo
from services.stack import Stack

goals = schemathesis.openapi.from_path(CONTRACTS / "openapi" / "goals.json")
metrics = schemathesis.openapi.from_path(CONTRACTS / "openapi" / "metrics.json")
gateway = schemathesis.graphql.from_path(CONTRACTS / "graphql" / "schema.graphql")


def positive(schema: Any) -> Any:
    """The stateful phase with valid input only: the chains are its point (a rejected step
    ends a chain), and the stateless tests cover invalid input operation by operation."""
    schema.config.generation.update(modes=[GenerationMode.POSITIVE])
    return schema


goals_flow = positive(schemathesis.openapi.from_path(CONTRACTS / "openapi" / "goals.json"))
metrics_flow = positive(schemathesis.openapi.from_path(CONTRACTS / "openapi" / "metrics.json"))
gateway_flow = positive(schemathesis.graphql.from_path(CONTRACTS / "graphql" / "schema.graphql"))
BOUNDED = settings(max_examples=15, deadline=None, derandomize=True,
                   suppress_health_check=list(HealthCheck))
STATEFUL = settings(max_examples=20, stateful_step_count=6, deadline=None, derandomize=True,
                    phases=[Phase.generate], suppress_health_check=list(HealthCheck))
_POSITION = re.compile(r"(goals|metrics)=([0-9]+)")


def graphql_server_error(ctx: Any, response: Response, case: Case) -> None:
    """No 5xx, and no GraphQL error that is the server's failure. A schema-valid argument can
    still name nothing (an id no write gave out) or break a rule of the domain, as REST answers
    404 or 422 (schemathesis.toml): the gateway marks such refusals `BAD_USER_INPUT`, or passes on
    the owning service's 4xx (`extensions.status`, with codes such as `UNPROCESSABLE` that
    schemathesis does not know, so its own check would call them server errors); an error
    without a `path` is a query refused before it ran (the limits)."""
    assert response.status_code < 500, f"{response.status_code}: {response.text}"
    for error in response.json().get("errors") or []:
        extensions = error.get("extensions") or {}
        status = extensions.get("status")
        refused = extensions.get("code") == "BAD_USER_INPUT" or (isinstance(status, int) and status < 500)
        assert refused or "path" not in error, f"GraphQL server error: {error}"


# For GraphQL, `positive_data_acceptance` reports those refusals and `not_a_server_error` the
# service's 4xx passed on: `graphql_server_error` judges both; every other check runs.
GRAPHQL_EXCLUDED = [positive_data_acceptance, not_a_server_error]
GRAPHQL_ADDED = [graphql_server_error]


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


@gateway.parametrize()
@BOUNDED
def test_gateway_graphql(case: schemathesis.Case, stack: Stack, headers: dict[str, str]) -> None:
    case.call_and_validate(base_url=stack.url("gateway") + "/graphql", headers=headers,
                           excluded_checks=GRAPHQL_EXCLUDED, additional_checks=GRAPHQL_ADDED)


@pytest.fixture(scope="module")
def demo(stack: Stack, token: Callable[..., str]) -> dict[str, int]:
    """The demo organisation, so that the chains start from resources that exist (a list's
    items lead to their operations) as well as from those they create; its positions are where
    each chain's reads start waiting."""
    return load_demo(stack.url("goals"), stack.url("metrics"), token("admin", "demo-loader"))


def workflow(schema: Any, base_url: str, headers: dict[str, str], excluded: list[Any] | None = None,
             added: list[Any] | None = None, start: dict[str, int] | None = None) -> type:
    """The schema's state machine, calling `base_url` with `headers`, reading its own writes,
    with every check but the `excluded` ones, and the `added` ones."""

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            self.positions: dict[str, int] = dict(start or {})

        def get_call_kwargs(self, case: Case) -> dict[str, Any]:
            sent = dict(headers)
            if self.positions and not any(h.lower() == "tandem-wait-for" for h in (case.headers or {})):
                sent["Tandem-Wait-For"] = ", ".join(f"{k}={v}" for k, v in sorted(self.positions.items()))
            return {"base_url": base_url, "headers": sent}

        def after_call(self, response: Response, case: Case) -> None:
            super().after_call(response, case)
            for name, position in _POSITION.findall(response.headers.get("tandem-position", [""])[0]):
                self.positions[name] = max(self.positions.get(name, 0), int(position))

        def validate_response(self, response: Response, case: Case, additional_checks: Any = None,
                              **kwargs: Any) -> None:
            case.validate_response(response, additional_checks=[*(additional_checks or []), *(added or [])],
                                   excluded_checks=excluded,
                                   transport_kwargs=kwargs or None, recorder=self.recorder)

    return Workflow


def test_goals_api_stateful(stack: Stack, headers: dict[str, str], demo: dict[str, int]) -> None:
    workflow(goals_flow, stack.url("goals"), headers, start=demo).run(settings=STATEFUL)


def test_metrics_api_stateful(stack: Stack, headers: dict[str, str], demo: dict[str, int]) -> None:
    workflow(metrics_flow, stack.url("metrics"), headers, start=demo).run(settings=STATEFUL)


def test_gateway_graphql_stateful(stack: Stack, headers: dict[str, str], demo: dict[str, int]) -> None:
    workflow(gateway_flow, stack.url("gateway") + "/graphql", headers, GRAPHQL_EXCLUDED, GRAPHQL_ADDED,
             start=demo).run(settings=STATEFUL)
