"""The query cost function on small documents, against a small schema, with costs worked out
by hand (`services.gateway.limits`)."""

from __future__ import annotations

from typing import Any

import pytest
from graphql import build_schema, parse

from services.gateway.limits import CEILING, QueryCostLimiter, introspection_estimates, price, query_cost

SCHEMA = build_schema("""
type Query {
  organization: Unit
  units(first: Int, after: String): UnitConnection!
  pages(first: Int = 3): UnitConnection!
}
type Unit {
  id: ID!
  name: String!
  parent: Unit
  children: [Unit!]!
  objectives(cycle: ID): [Objective!]!
  kpis: [KPI!]!
  descendants(depth: Int): [Unit!]!
}
type Objective { id: ID! title: String! keyResults: [KeyResult!]! }
type KeyResult { id: ID! score: Float }
type KPI { name: String! }
type UnitConnection { edges: [UnitEdge!]! nodes: [Unit!]! pageInfo: PageInfo! }
type UnitEdge { node: Unit! cursor: String! }
type PageInfo { hasNextPage: Boolean! }
""")


def cost(query: str, variables: dict[str, Any] | None = None) -> int:
    return query_cost(SCHEMA, parse(query), variables)


@pytest.mark.parametrize(("query", "expected"), [
    # Each field is 1; a single object adds its selection once.
    ("{ organization { id name } }", 1 + 2),
    ("{ organization { parent { parent { id } } } }", 1 + 1 + 1 + 1),
    ("{ __typename organization { __typename } }", 1 + 1 + 1),
    # Unpaginated lists: children, objectives and keyResults count 10 each; any other list 10.
    ("{ organization { children { id } } }", 1 + (1 + 10 * 1)),
    ("{ organization { objectives { keyResults { id score } } } }", 1 + (1 + 10 * (1 + 10 * 2))),
    ("{ organization { kpis { name } } }", 1 + (1 + 10 * 1)),
    # descendants(depth: d): a 10-ary tree d levels deep (10 + 100 for 2), 3 levels when not given.
    ("{ organization { descendants(depth: 2) { id } } }", 1 + (1 + 110 * 1)),
    ("{ organization { descendants { id } } }", 1 + (1 + 1110 * 1)),
    # A connection counts its page once; edges and nodes inside it count 1.
    ("{ units(first: 5) { edges { node { id name } } pageInfo { hasNextPage } } }",
     1 + 5 * ((1 + (1 + 2)) + (1 + 1))),
    ("{ units { nodes { id } } }", 1 + 20 * (1 + 1)),  # first not given: 20
    ("{ pages { nodes { id } } }", 1 + 3 * (1 + 1)),  # the schema's default for first
    ("{ units(first: 0) { nodes { id } } }", 1 + 1 * (1 + 1)),  # never less than 1
    ("{ units(first: 2) { nodes { children { id } } } }", 1 + 2 * (1 + (1 + 10 * 1))),
    # Fragments count once per spread; inline fragments count their selection.
    ("{ organization { ...F children { ...F } } } fragment F on Unit { id name }", 1 + (2 + (1 + 10 * 2))),
    ("{ organization { ... on Unit { id } ... { name } } }", 1 + 2),
    ("{ organization { ...F ...F } } fragment F on Unit { children { id } }", 1 + 2 * (1 + 10)),
    # A cycle ends where it closes (validation refuses it); an unknown fragment counts nothing.
    ("{ organization { ...A } } fragment A on Unit { id ...B } fragment B on Unit { name ...A }", 1 + (1 + 1)),
    ("{ organization { id ...Missing } }", 1 + 1),
    # Every operation in the document counts.
    ("query A { organization { id } } query B { organization { name } }", 2 + 2),
    ("mutation { organization { id } }", 1 + 1),  # no such root type: its fields still count 1 each
])
def test_costs_by_hand(query: str, expected: int) -> None:
    assert cost(query) == expected


def test_variables_come_from_the_request_else_from_their_defaults() -> None:
    query = "query($n: Int = 4) { units(first: $n) { nodes { id } } }"
    assert cost(query, {"n": 7}) == 1 + 7 * 2
    assert cost(query) == 1 + 4 * 2
    assert cost("query($n: Int) { units(first: $n) { nodes { id } } }") == 1 + 20 * 2  # unknown: the default page
    assert cost("query($d: Int) { organization { descendants(depth: $d) { id } } }", {"d": 1}) == 1 + (1 + 10)


def test_aliases_and_fields_are_counted_with_fragments_expanded() -> None:
    p = price(SCHEMA, parse("{ organization { ...F ...F children { ...F } } } fragment F on Unit { a: id b: name }"))
    assert p.aliases == 3 * 2
    assert p.fields == 1 + 2 * 2 + 1 + 2
    assert p.cost == 1 + (2 * 2 + 1 + 10 * 2)


def nested_spreads(levels: int, spreads: int = 10) -> str:
    """F0 has one aliased field; each F(i) spreads F(i-1) `spreads` times: spreads**levels fields."""
    fragments = ["fragment F0 on Unit { a: id }"] + [
        f"fragment F{i} on Unit {{ {' '.join([f'...F{i - 1}'] * spreads)} }}" for i in range(1, levels + 1)]
    return f"{{ organization {{ ...F{levels} }} }}\n" + "\n".join(fragments)


def test_nested_spreads_are_priced_without_walking_them() -> None:
    """10**4 fields exactly; then 10**40, which no walk could count, saturates at the ceiling."""
    p = price(SCHEMA, parse(nested_spreads(4)))
    assert (p.cost, p.aliases, p.fields) == (1 + 10**4, 10**4, 1 + 10**4)
    huge = price(SCHEMA, parse(nested_spreads(40)))
    assert (huge.cost, huge.aliases, huge.fields) == (CEILING, CEILING, CEILING)


def test_introspection_costs_what_the_schema_makes_it() -> None:
    """The lists count their mean length in this schema: 21 types (with the built-in ones) and
    5 fields per object type (the introspection types' included), so nesting multiplies."""
    assert introspection_estimates(SCHEMA)["types"] == len(SCHEMA.type_map) == 21
    assert introspection_estimates(SCHEMA)["fields"] == 5
    assert cost("{ __schema { types { name } } }") == 1 + (1 + 21 * 1)
    assert cost("{ __schema { types { fields { name } } } }") == 1 + (1 + 21 * (1 + 5 * 1))
    nested = "{ __schema { types { fields { type { fields { type { fields { name } } } } } } } }"
    assert cost(nested) == 1 + (1 + 21 * (1 + 5 * (1 + (1 + 5 * (1 + (1 + 5 * 1))))))


def test_the_limiter_refuses_over_the_budget_and_takes_validations_place_for_bombs() -> None:
    limiter = QueryCostLimiter(max_complexity=100, max_aliases=30)
    assert limiter.check(SCHEMA, parse("{ organization { children { id name } } }"), None) == ([], False)
    errors, preempt = limiter.check(SCHEMA, parse("{ organization { children { children { id } } } }"), None)
    assert [e.message for e in errors] == ["query cost 112 exceeds the budget 100"]
    assert not preempt  # small enough for graphql-core to validate too
    errors, preempt = limiter.check(SCHEMA, parse(nested_spreads(40)), None)
    assert [e.message for e in errors] == [
        f"query cost at least {CEILING} exceeds the budget 100",
        f"query has at least {CEILING} aliases with its fragments expanded, over the limit of 30"]
    assert preempt
