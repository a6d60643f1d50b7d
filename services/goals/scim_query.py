"""SCIM queries over the goals read model: a filter (parsed and checked by scim2-models) becomes
a SQL condition, `sortBy` an ORDER BY, `startIndex`/`count` an OFFSET/LIMIT, so a query costs
what its page costs, not what the whole population does.

The SQL reads as scim2-models' own evaluator (`ScimFilter.match`) does: attribute names are
resolved against the resource's model; strings compare without case unless the attribute is
caseExact; a value that is absent makes a comparison false (and `ne` true); a comparison with
a multi-valued attribute holds when one of its values does (`ne`: when none equals); an
attribute the model declares but Tandem does not keep is always absent; one that only another
resource type declares (a search at the root) is false. Every condition is two-valued
(COALESCE), so `not` negates exactly. Ordering compares strings by code point (COLLATE "C"),
as Python does.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

import asyncpg
from scim2_models import ScimFilter, SearchRequest
from scim2_models.path import (
    AttributeBinding,
    AttrPath,
    CompareOperator,
    Comparison,
    FilterVisitor,
    LogicalExpr,
    LogicalOperator,
    Not,
    Present,
    ValuePath,
    coerce_value,
)

from services.goals.scim_resources import DEFAULT_PAGE_SIZE, MAX_RESULTS, ScimGroup, ScimUser


@dataclass(frozen=True)
class Column:
    """An attribute's SQL expression and how it compares: `text` without case, `exact` with,
    `bool`, or `time` (timestamptz)."""

    sql: str
    kind: str = "text"


ABSENT = Column("NULL::text")


@dataclass(frozen=True)
class Many:
    """A multi-valued attribute: the rows of its values (`source`, correlated with the outer
    row by `where`) in list order (`order`: the primary value first), and a column per
    sub-attribute."""

    source: str
    where: str
    order: str
    subs: dict[str, Column]

    def exists(self, condition: str) -> str:
        return f"EXISTS (SELECT 1 FROM {self.source} WHERE {self.where} AND ({condition}))"

    def first(self, column: Column) -> Column:
        """The value a sort reads: the primary one, or else the first."""
        return Column(f"(SELECT {column.sql} FROM {self.source} WHERE {self.where} ORDER BY {self.order} LIMIT 1)",
                      column.kind)


@dataclass(frozen=True)
class Table:
    """Where a resource type's rows are, and where each attribute (by its URN, lower case) is."""

    resource_type: str
    model: Any
    source: str
    visible: str
    alias: str
    columns: dict[str, Column]
    many: dict[str, Many] = field(default_factory=dict)

    def column(self, urn: str) -> Column:
        return self.columns.get(urn.lower(), ABSENT)


CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:user:"
CORE_GROUP = "urn:ietf:params:scim:schemas:core:2.0:group:"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:user:"
UNIT = "urn:tandem:params:scim:schemas:extension:unit:2.0:group:"


def _meta(prefix: str, alias: str, resource_type: str) -> dict[str, Column]:
    return {
        f"{prefix}id": Column(f"{alias}.id::text", "exact"),
        f"{prefix}externalid": Column(f"{alias}.external_id", "exact"),
        f"{prefix}meta.created": Column(f"{alias}.created_at", "time"),
        f"{prefix}meta.lastmodified": Column(f"{alias}.updated_at", "time"),
        f"{prefix}meta.resourcetype": Column(f"'{resource_type}'::text", "exact"),
        f"{prefix}meta.version": Column(f"('W/\"' || {alias}.version || '\"')", "exact"),
    }


USERS = Table(
    resource_type="User",
    model=ScimUser,
    source="people p JOIN units u ON u.id = p.unit_id LEFT JOIN people m ON m.id = p.manager_id",
    visible="p.left_on IS NULL",
    alias="p",
    columns={
        **_meta(CORE_USER, "p", "User"),
        f"{CORE_USER}username": Column("COALESCE(p.user_name, p.email)"),
        f"{CORE_USER}displayname": Column("p.name"),
        f"{CORE_USER}name.formatted": Column("COALESCE(p.formatted_name, p.name)"),
        f"{CORE_USER}name.givenname": Column("p.given_name"),
        f"{CORE_USER}name.familyname": Column("p.family_name"),
        f"{CORE_USER}active": Column("p.active", "bool"),
        f"{ENTERPRISE}department": Column("u.name"),
        f"{ENTERPRISE}manager.value": Column("p.manager_id::text", "exact"),
        f"{ENTERPRISE}manager.displayname": Column("m.name"),
    },
    many={
        f"{CORE_USER}emails": Many(
            "jsonb_array_elements(p.emails) WITH ORDINALITY AS e(v, n)", "true",
            "COALESCE((e.v->>'primary')::boolean, false) DESC, e.n",
            {"value": Column("e.v->>'value'"), "type": Column("e.v->>'type'"),
             "display": Column("e.v->>'display'"), "primary": Column("(e.v->>'primary')::boolean", "bool")}),
        f"{CORE_USER}groups": Many(
            "(SELECT p.unit_id AS id, u.name AS name) AS gr", "true", "gr.id",
            {"value": Column("gr.id::text", "exact"), "display": Column("gr.name"),
             "type": Column("'direct'::text")}),
    },
)

GROUPS = Table(
    resource_type="Group",
    model=ScimGroup,
    source="units g LEFT JOIN units pg ON pg.id = g.parent_id",
    visible="g.dissolved_on IS NULL",
    alias="g",
    columns={
        **_meta(CORE_GROUP, "g", "Group"),
        f"{CORE_GROUP}displayname": Column("g.name"),
        f"{UNIT}kind": Column("g.kind"),
        f"{UNIT}parent.value": Column("g.parent_id::text", "exact"),
        f"{UNIT}parent.display": Column("pg.name"),
    },
    many={
        f"{CORE_GROUP}members": Many(
            "people mb", "mb.unit_id = g.id AND mb.left_on IS NULL", "mb.created_at, mb.id",
            {"value": Column("mb.id::text", "exact"), "display": Column("mb.name"),
             "type": Column("'User'::text", "exact")}),
    },
)

TABLES = {"User": USERS, "Group": GROUPS}


class Params:
    """asyncpg's numbered parameters, collected as a condition is written."""

    def __init__(self, values: Sequence[Any] = ()) -> None:
        self.values: list[Any] = list(values)

    def add(self, value: Any, cast: str) -> str:
        self.values.append(value)
        return f"${len(self.values)}::{cast}"


def fold(value: str) -> str:
    """A string as case-insensitive comparisons see it (scim2-models' default comparison key)."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", value).lower())


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def compare(column: Column, op: CompareOperator, value: Any, params: Params) -> str:
    """One comparison of one value, two-valued: an absent value makes it false (`ne`: true)."""
    if value is None:
        if op == CompareOperator.eq:
            return f"({column.sql} IS NULL)"
        return f"({column.sql} IS NOT NULL)" if op == CompareOperator.ne else "false"
    if op == CompareOperator.ne:
        return f"NOT {compare(column, CompareOperator.eq, value, params)}"
    value = _plain(value)
    if column.kind in ("text", "exact"):
        if not isinstance(value, str):
            value = str(value).lower() if isinstance(value, bool) else str(value)
        left = f"lower({column.sql})" if column.kind == "text" else column.sql
        p = params.add(fold(value) if column.kind == "text" else value, "text")
        condition = {
            CompareOperator.eq: f"{left} = {p}",
            CompareOperator.co: f"strpos({left}, {p}) > 0",
            CompareOperator.sw: f"starts_with({left}, {p})",
            CompareOperator.ew: f"right({left}, char_length({p})) = {p}",
            CompareOperator.gt: f'{left} COLLATE "C" > {p}',
            CompareOperator.ge: f'{left} COLLATE "C" >= {p}',
            CompareOperator.lt: f'{left} COLLATE "C" < {p}',
            CompareOperator.le: f'{left} COLLATE "C" <= {p}',
        }[op]
        return f"COALESCE({condition}, false)"
    if op in (CompareOperator.co, CompareOperator.sw, CompareOperator.ew):
        return "false"  # substrings of a boolean or a time: never (as scim2-models says)
    if column.kind == "bool":
        if not isinstance(value, bool):
            return "false"
        p = params.add(value, "boolean")
    else:
        if not isinstance(value, datetime):
            return "false"
        p = params.add(value, "timestamptz")
    sql_op = {CompareOperator.eq: "=", CompareOperator.gt: ">", CompareOperator.ge: ">=",
              CompareOperator.lt: "<", CompareOperator.le: "<="}[op]
    return f"COALESCE({column.sql} {sql_op} {p}, false)"


def present(column: Column) -> str:
    if column.kind in ("text", "exact"):
        return f"COALESCE({column.sql} <> '', false)"
    return f"({column.sql} IS NOT NULL)"


def _head(binding: AttributeBinding) -> str:
    """The URN of the attribute itself, without the sub-attribute a binding may name."""
    return binding.urn.rsplit(".", 1)[0] if binding.sub_field_name else binding.urn


def _sub(binding: AttributeBinding) -> str:
    return binding.urn.rsplit(".", 1)[1].lower()


class SqlCondition(FilterVisitor[str]):
    """A filter over one resource type's rows, as a SQL condition."""

    def __init__(self, table: Table, scim_filter: ScimFilter[Any], params: Params) -> None:
        self.table = table
        self.filter = scim_filter
        self.params = params

    def visit_logical_expr(self, node: LogicalExpr) -> str:
        joiner = " AND " if node.op == LogicalOperator.and_ else " OR "
        return "(" + joiner.join(self.visit(t) for t in node.terms) + ")"

    def visit_not(self, node: Not) -> str:
        return f"(NOT {self.visit(node.expr)})"

    def visit_comparison(self, node: Comparison) -> str:
        binding = self.filter.resolve_comparison(node.attr_path, strict=False)
        if binding is None:  # an attribute of another resource type
            return "false"
        value = coerce_value(binding, node.value, node.op)
        if binding.is_multivalued and binding.sub_field_name:
            many = self.table.many.get(_head(binding).lower())
            column = many.subs.get(_sub(binding)) if many else None
            if many is None or column is None:  # declared, never kept: no values
                return "true" if node.op == CompareOperator.ne else "false"
            if node.op == CompareOperator.ne:
                return f"NOT {many.exists(compare(column, CompareOperator.eq, value, self.params))}"
            return many.exists(compare(column, node.op, value, self.params))
        if binding.target_model is not None and binding.sub_field_name is None and binding.is_multivalued:
            return "true" if node.op == CompareOperator.ne else "false"
        return compare(self.table.column(binding.urn), node.op, value, self.params)

    def visit_present(self, node: Present) -> str:
        binding = self.filter.resolve(node.attr_path, strict=False)
        if binding is None:
            return "false"
        if binding.is_multivalued:
            many = self.table.many.get(_head(binding).lower())
            if many is None:
                return "false"
            if binding.sub_field_name:
                column = many.subs.get(_sub(binding))
                return many.exists(present(column)) if column else "false"
            return many.exists("true")
        prefix = binding.urn.lower() + "."
        parts = [c for urn, c in self.table.columns.items() if urn.startswith(prefix)]
        if parts and binding.sub_field_name is None:  # a complex attribute: any sub-attribute
            return "(" + " OR ".join(present(c) for c in parts) + ")"
        return present(self.table.column(binding.urn))

    def visit_value_path(self, node: ValuePath) -> str:
        binding = self.filter.resolve(node.attr_path, strict=False)
        many = self.table.many.get(binding.urn.lower()) if binding is not None else None
        if many is None:
            return "false"
        return many.exists(ValueCondition(many, self.params).visit(node.val_filter))


class ValueCondition(FilterVisitor[str]):
    """The filter inside `attr[...]`, over one value's sub-attributes (already checked against
    the attribute's model by scim2-models when the filter was read)."""

    def __init__(self, many: Many, params: Params) -> None:
        self.many = many
        self.params = params

    def _column(self, path: AttrPath) -> Column | None:
        return None if path.sub_attr or path.uri else self.many.subs.get(path.attr.lower())

    def visit_logical_expr(self, node: LogicalExpr) -> str:
        joiner = " AND " if node.op == LogicalOperator.and_ else " OR "
        return "(" + joiner.join(self.visit(t) for t in node.terms) + ")"

    def visit_not(self, node: Not) -> str:
        return f"(NOT {self.visit(node.expr)})"

    def visit_comparison(self, node: Comparison) -> str:
        column = self._column(node.attr_path)
        if column is None:
            return "true" if node.op == CompareOperator.ne else "false"
        return compare(column, node.op, node.value, self.params)

    def visit_present(self, node: Present) -> str:
        column = self._column(node.attr_path)
        return present(column) if column else "false"

    def visit_value_path(self, node: ValuePath) -> str:
        return "false"  # a selection inside a selection: the grammar's errata forbid it


def condition(table: Table, filter_text: str | None, params: Params) -> str:
    """The rows of `table` a client may see that the filter selects."""
    if not filter_text:
        return table.visible
    scim_filter = ScimFilter[table.model](filter_text)  # type: ignore[name-defined]
    return f"{table.visible} AND {SqlCondition(table, scim_filter, params).visit(scim_filter.ast)}"


def sort_key(table: Table, search: SearchRequest[Any]) -> Column | None:
    """The column `sortBy` orders by for this type (None: not sorted, or not an attribute of
    this type): a multi-valued attribute sorts by its primary value, or else its first."""
    binding = search.sort_binding(table.model)
    if binding is None:
        return None
    if binding.is_multivalued and binding.sub_field_name:
        many = table.many.get(_head(binding).lower())
        column = many.subs.get(_sub(binding)) if many else None
        return many.first(column) if many and column else ABSENT
    return table.column(binding.urn)


_SQL_TYPES = {"text": "text", "exact": "text", "bool": "boolean", "time": "timestamptz"}


def _order_value(column: Column) -> str:
    if column.kind == "text":
        return f'lower({column.sql}) COLLATE "C"'
    if column.kind == "exact":
        return f'({column.sql}) COLLATE "C"'
    return column.sql


MAX_START_INDEX = 2**62  # past every row there will ever be, inside PostgreSQL's bigint OFFSET


@dataclass(frozen=True)
class Page:
    total: int
    start_index: int
    keys: list[tuple[str, Any]]
    """(resource type, id) of the page's resources, in order."""


def page_bounds(search: SearchRequest[Any]) -> tuple[int, int]:
    """1-based start and the page size: count defaults to 100 and is capped at 200."""
    count = DEFAULT_PAGE_SIZE if search.count is None else min(search.count, MAX_RESULTS)
    return min(search.start_index or 1, MAX_START_INDEX), count


async def search_page(pool: asyncpg.Pool, tables: Sequence[Table], search: SearchRequest[Any]) -> Page:
    """The page of resources of these types that `search` selects, sorted and counted."""
    params = Params()
    keys = [sort_key(t, search) for t in tables]
    kinds = {k.kind for k in keys if k is not None and k is not ABSENT}
    sql_type = _SQL_TYPES[next(iter(kinds))] if len(kinds) == 1 else "text"
    parts, counts = [], []
    for table, key in zip(tables, keys, strict=True):
        where = condition(table, str(search.filter) if search.filter else None, params)
        value = f"({_order_value(key)})::{sql_type}" if key is not None else f"NULL::{sql_type}"
        a = table.alias
        parts.append(f"SELECT '{table.resource_type}' AS rt, {a}.id, {value} AS sk, {a}.created_at AS ca "
                     f"FROM {table.source} WHERE {where}")
        counts.append(f"(SELECT count(*) FROM {table.source} WHERE {where})")
    start, count = page_bounds(search)
    descending = search.sort_order == SearchRequest.SortOrder.descending
    order = "sk DESC NULLS FIRST, " if descending else "sk ASC NULLS LAST, "
    total = int(await pool.fetchval("SELECT " + " + ".join(counts), *params.values))
    if count == 0:
        return Page(total, start, [])
    rows = await pool.fetch(
        f"SELECT rt, id FROM ({' UNION ALL '.join(parts)}) x ORDER BY {order}ca, rt, id "
        f"OFFSET {start - 1} LIMIT {count}", *params.values)
    return Page(total, start, [(r["rt"], r["id"]) for r in rows])
