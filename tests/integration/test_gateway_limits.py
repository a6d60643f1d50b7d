"""Query limits on the gateway: over-deep, over-aliased and over-costly queries are refused
before they run, with a 200 GraphQL answer whose `data` is null (an executed query answers an
object, even when a field fails) and an error that names the limit.

The gateway runs in process over a database of its own that holds nothing: the limits are
about the query, not the data.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from graphql import get_introspection_query

from services.gateway.api import create_app as create_gateway
from services.gateway.settings import GatewaySettings
from tests.conftest import serve_in_process

Headers = Callable[..., dict[str, str]]


@pytest.fixture(scope="module")
async def gateway(own_database: str) -> AsyncIterator[httpx.AsyncClient]:
    async for client in serve_in_process(create_gateway(GatewaySettings(DATABASE_URL=own_database))):
        yield client


@pytest.fixture(scope="module")
async def frugal(own_database: str, gateway: httpx.AsyncClient) -> AsyncIterator[httpx.AsyncClient]:
    """A second gateway on the same read model with a budget of 50 (no projections of its own)."""
    settings = GatewaySettings(DATABASE_URL=own_database, max_complexity=50, run_projections=False)
    async for client in serve_in_process(create_gateway(settings)):
        yield client


async def post(client: httpx.AsyncClient, headers: dict[str, str], query: str, **variables: Any) -> dict[str, Any]:
    r = await client.post("/graphql", json={"query": query, "variables": variables}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def refused(body: dict[str, Any]) -> list[str]:
    """The messages of a refused query, after checking that nothing ran and nothing leaked."""
    assert body["data"] is None, body
    for error in body["errors"]:
        assert set(error) <= {"message", "locations", "path"}, error  # no extensions, no stack trace
    return [e["message"] for e in body["errors"]]


def nested_spreads(levels: int, spreads: int = 10) -> str:
    """F0 has one aliased field; each F(i) spreads F(i-1) `spreads` times: spreads**levels
    aliased fields from a document of a few hundred tokens."""
    fragments = ["fragment F0 on Unit { a: id }"] + [
        f"fragment F{i} on Unit {{ {' '.join([f'...F{i - 1}'] * spreads)} }}" for i in range(1, levels + 1)]
    return f"{{ organization {{ ...F{levels} }} }}\n" + "\n".join(fragments)


WHOLE_ORGANISATION = """query($cycle: ID) { alignment(cycle: $cycle) { ...N children { ...N children { ...N } } } }
fragment N on AlignmentNode { unit { id name kind } score
  objectives { id title score rolledUpScore band parentId keyResults { id title current score } } }"""


async def test_normal_queries_are_answered(gateway: httpx.AsyncClient, auth: Headers) -> None:
    """The whole organisation three levels deep with objectives and key results (what `make
    bench` times: cost 52,848) and GraphiQL's introspection are within the budget."""
    body = await post(gateway, auth(), WHOLE_ORGANISATION, cycle=None)
    assert body == {"data": {"alignment": None}}
    body = await post(gateway, auth(), get_introspection_query(descriptions=True, specified_by_url=True,
                                                               directive_is_repeatable=True,
                                                               input_value_deprecation=True))
    assert "errors" not in body
    assert body["data"]["__schema"]["queryType"]["name"] == "Query"


async def test_a_too_deep_query_is_refused(gateway: httpx.AsyncClient, auth: Headers) -> None:
    """25 parents up: cheap (26), but deeper than 20."""
    deep = "{ organization { " + "parent { " * 25 + "id" + " }" * 25 + " } }"
    assert refused(await post(gateway, auth(), deep)) == ["'anonymous' exceeds maximum operation depth of 20"]


async def test_an_alias_bomb_is_refused(gateway: httpx.AsyncClient, auth: Headers) -> None:
    bomb = "{ " + " ".join(f"a{i}: organization {{ id }}" for i in range(40)) + " }"
    assert refused(await post(gateway, auth(), bomb)) == ["40 aliases found. Allowed: 30"]


async def test_a_fragment_spread_alias_bomb_is_refused(gateway: httpx.AsyncClient, auth: Headers) -> None:
    """Ten aliases in the document, fifty once its five spreads are expanded."""
    bomb = ("{ organization { ...Ten parent { ...Ten parent { ...Ten } } children { ...Ten ...Ten } } }\n"
            "fragment Ten on Unit { " + " ".join(f"n{i}: name" for i in range(10)) + " }")
    assert refused(await post(gateway, auth(), bomb)) == ["50 aliases found. Allowed: 30"]


async def test_nested_fragment_spreads_are_refused_without_walking_them(
        gateway: httpx.AsyncClient, auth: Headers) -> None:
    """Twelve levels of ten spreads each are 10**12 fields. The depth and alias validators walk
    every spread and would take hours (10**6 takes seconds); the cost check prices each
    fragment once and answers in their place."""
    assert refused(await post(gateway, auth(), nested_spreads(12))) == [
        "query cost 1000000000001 exceeds the budget 100000",
        "query has 1000000000000 aliases with its fragments expanded, over the limit of 30"]


COSTLY = """query($n: Int!) { organization { objectives(first: 100) { edges { node {
    keyResults { checkIns(first: $n) { edges { node { value } } } } } } } } }"""


async def test_a_too_costly_query_is_refused(gateway: httpx.AsyncClient, auth: Headers) -> None:
    """Nested connections of 100, with the key results (~10) between them: a check-in's node
    1 + 1 = 2, its edges 1 + 2 = 3, checkIns 1 + 100 * 3 = 301, keyResults 1 + 10 * 301 =
    3,011, an objective's node 3,012, edges 3,013, objectives 1 + 100 * 3,013 = 301,301, and
    301,302 with organization. The inner page comes from the request's variables."""
    assert refused(await post(gateway, auth(), COSTLY, n=100)) == ["query cost 301302 exceeds the budget 100000"]
    # Beside graphql-core's own validation errors (an unknown field costs 1 too: 10**5 more).
    messages = refused(await post(gateway, auth(), COSTLY.replace("value", "value xyzzy"), n=100))
    assert messages == ["query cost 401302 exceeds the budget 100000", "Cannot query field 'xyzzy' on type 'CheckIn'."]
    # Pages of 10 instead: 1 + 10 * (1 + 1 + 1 + 10 * (1 + 10 * 3)) + 1 = 3,132, answered.
    small = COSTLY.replace("first: 100", "first: 10")
    assert await post(gateway, auth(), small, n=10) == {"data": {"organization": None}}


async def test_the_budget_is_a_setting(frugal: httpx.AsyncClient, auth: Headers) -> None:
    """With a budget of 50: organization and its children's names (1 + 1 + 10 * 2 = 22) are
    answered, one level more (1 + 1 + 10 * (1 + 10 * 1) = 112) is refused."""
    assert await post(frugal, auth(), "{ organization { children { id name } } }") == {"data": {"organization": None}}
    assert refused(await post(frugal, auth(), "{ organization { children { children { id } } } }")) == [
        "query cost 112 exceeds the budget 50"]
