"""The query cost budget: a GraphQL query's price worked out from its text, checked before
anything runs.

Depth, alias and token limits bound a query's shape; they do not bound what it asks the
server to produce, since a list nested in a list multiplies. The cost is an estimate of how
many fields a query resolves:

- every field costs 1, plus its selection's cost times its multiplier;
- a field with a `first` (or `last`) argument multiplies by it (at least 1; `DEFAULT_PAGE`
  when it is not given), and the lists inside its connection type (`edges`, `nodes`) by 1;
- any other list multiplies by a fixed estimate (`LIST_ESTIMATES`, else
  `DEFAULT_LIST_ESTIMATE`); `descendants(depth: d)` by the size of a `TREE_FANOUT`-ary tree d
  levels deep; the introspection lists by the schema's own mean list lengths;
- every fragment spread counts its fragment again (once per spread, as the validators walk
  it), inline fragments count their selection, and a spread that closes a fragment cycle counts
  nothing (validation refuses the cycle);
- variables are read from the request's values, else from their defaults in the document.

Every operation in the document is priced (the validators walk all of them), and aliases are
counted too, with fragments expanded. Both are computed in one pass that prices each fragment
once, so the check takes time linear in the document however its fragments nest. It runs
before graphql-core's validation and, when a limit is broken, takes its place: the strawberry
limiters that expand fragments by walking every spread (depth, aliases) take time exponential
in how fragments nest, so a few hundred tokens of nested spreads would otherwise keep a worker
busy for hours before they answered. A query within the budget expands to at most budget-many
fields, so their walk stays bounded too.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLField,
    GraphQLNamedType,
    GraphQLSchema,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
    ValidationContext,
    ValidationRule,
    ValueNode,
    get_named_type,
    get_nullable_type,
    is_abstract_type,
    is_enum_type,
    is_input_object_type,
    is_interface_type,
    is_list_type,
    is_object_type,
    value_from_ast_untyped,
)
from graphql.pyutils import Undefined
from graphql.type.introspection import SchemaMetaFieldDef, TypeMetaFieldDef, TypeNameMetaFieldDef
from strawberry.extensions import SchemaExtension

from services.gateway.settings import GatewaySettings

DEFAULT_MAX_COMPLEXITY: int = GatewaySettings.model_fields["max_complexity"].default
DEFAULT_PAGE = 20
"""What `first` counts for on a paginated field when the query leaves it out."""
LIST_ESTIMATES = {"children": 10, "objectives": 10, "keyResults": 10}
DEFAULT_LIST_ESTIMATE = 10
TREE_FANOUT = 10
DEFAULT_TREE_LEVELS = 3
"""Company, departments, teams: the depth `descendants` counts for when none is asked."""
MAX_TREE_LEVELS = 32
CEILING = 10**15
"""Costs saturate here: far past any budget, and big numbers stay cheap to print."""


@dataclass(frozen=True)
class Price:
    """`cost` as the module says; `aliases` and `fields`: how many aliased fields and fields
    the document has with every fragment spread expanded (what the validators walk)."""

    cost: int
    aliases: int = 0
    fields: int = 0

    def __add__(self, other: Price) -> Price:
        return Price(min(self.cost + other.cost, CEILING), min(self.aliases + other.aliases, CEILING),
                     min(self.fields + other.fields, CEILING))


FREE = Price(0)


def price(schema: GraphQLSchema, document: DocumentNode, variables: Mapping[str, Any] | None = None) -> Price:
    """The price of every operation in the document, summed."""
    return _Pricing(schema, document, variables or {}).document()


def query_cost(schema: GraphQLSchema, document: DocumentNode, variables: Mapping[str, Any] | None = None) -> int:
    return price(schema, document, variables).cost


_introspection_cache: weakref.WeakKeyDictionary[GraphQLSchema, dict[str, int]] = weakref.WeakKeyDictionary()


def _mean(counts: Iterator[int]) -> int:
    """The mean length of the lists, rounded up, and at least 1."""
    lengths = list(counts)
    return max(1, math.ceil(sum(lengths) / len(lengths))) if lengths else 1


def introspection_estimates(schema: GraphQLSchema) -> dict[str, int]:
    """How long the introspection lists are in this schema: what GraphiQL's query costs is
    then what the schema's size makes it, and nesting `fields { type { fields ... } }` costs
    what it would produce."""
    if schema in _introspection_cache:
        return _introspection_cache[schema]
    types = list(schema.type_map.values())
    with_fields = [t for t in types if is_object_type(t) or is_interface_type(t)]
    estimates = {
        "types": len(types),
        "directives": len(schema.directives),
        "fields": _mean(len(t.fields) for t in with_fields),
        "args": _mean(len(a) for a in [*(f.args for t in with_fields for f in t.fields.values()),
                                       *(d.args for d in schema.directives)]),
        "inputFields": _mean(len(t.fields) for t in types if is_input_object_type(t)),
        "enumValues": _mean(len(t.values) for t in types if is_enum_type(t)),
        "interfaces": _mean(len(t.interfaces) for t in with_fields),
        "possibleTypes": _mean(len(schema.get_possible_types(t)) for t in types if is_abstract_type(t)),
        "locations": _mean(len(d.locations) for d in schema.directives),
    }
    _introspection_cache[schema] = estimates
    return estimates


@dataclass
class _Pricing:
    schema: GraphQLSchema
    doc: DocumentNode
    variables: Mapping[str, Any]
    fragments: dict[str, FragmentDefinitionNode] = field(default_factory=dict)
    priced: dict[str, Price] = field(default_factory=dict)
    pricing: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.fragments = {d.name.value: d for d in self.doc.definitions if isinstance(d, FragmentDefinitionNode)}
        # The request's values win over the document's defaults.
        defaults: dict[str, Any] = {}
        for op in self.doc.definitions:
            if isinstance(op, OperationDefinitionNode):
                for v in op.variable_definitions or ():
                    if v.default_value is not None:
                        defaults[v.variable.name.value] = value_from_ast_untyped(v.default_value)
        self.variables = {**defaults, **self.variables}

    def document(self) -> Price:
        total = FREE
        for op in self.doc.definitions:
            if isinstance(op, OperationDefinitionNode):
                root = self.schema.get_root_type(op.operation)
                total += self.selections(op.selection_set, root)
        return total

    def selections(self, selection_set: SelectionSetNode | None, parent: GraphQLNamedType | None) -> Price:
        total = FREE
        for selection in selection_set.selections if selection_set else ():
            if isinstance(selection, FieldNode):
                total += self.field(selection, parent)
            elif isinstance(selection, InlineFragmentNode):
                condition = selection.type_condition
                total += self.selections(selection.selection_set,
                                         self.schema.get_type(condition.name.value) if condition else parent)
            elif isinstance(selection, FragmentSpreadNode):
                total += self.fragment(selection.name.value)
        return total

    def fragment(self, name: str) -> Price:
        if name in self.priced:
            return self.priced[name]
        definition = self.fragments.get(name)
        if definition is None or name in self.pricing:
            return FREE  # unknown, or a cycle: validation refuses both
        self.pricing.add(name)
        try:
            result = self.selections(definition.selection_set,
                                     self.schema.get_type(definition.type_condition.name.value))
        finally:
            self.pricing.discard(name)
        self.priced[name] = result
        return result

    def field(self, node: FieldNode, parent: GraphQLNamedType | None) -> Price:
        definition = self.definition(node.name.value, parent)
        own = Price(1, 1 if node.alias else 0, 1)
        if node.selection_set is None:
            return own
        inner = self.selections(node.selection_set, get_named_type(definition.type) if definition else None)
        times = self.multiplier(node, definition, parent)
        return own + Price(min(times * inner.cost, CEILING), inner.aliases, inner.fields)

    def definition(self, name: str, parent: GraphQLNamedType | None) -> GraphQLField | None:
        if name == "__typename":
            return TypeNameMetaFieldDef
        if parent is not None and parent is self.schema.query_type:
            if name == "__schema":
                return SchemaMetaFieldDef
            if name == "__type":
                return TypeMetaFieldDef
        fields = getattr(parent, "fields", None) if is_object_type(parent) or is_interface_type(parent) else None
        return fields.get(name) if fields else None

    def multiplier(self, node: FieldNode, definition: GraphQLField | None, parent: GraphQLNamedType | None) -> int:
        if definition is None:
            return 1
        for page in ("first", "last"):
            if page in definition.args:
                value = self.argument(node, definition, page)
                return max(1, value) if _is_int(value) else DEFAULT_PAGE
        if not is_list_type(get_nullable_type(definition.type)):
            return 1
        parent_name = parent.name if parent is not None else ""
        if parent_name.endswith(("Connection", "Edge")):
            return 1  # the field that returned the connection counted its page already
        name = node.name.value
        if parent_name.startswith("__"):
            return introspection_estimates(self.schema).get(name, DEFAULT_LIST_ESTIMATE)
        if name == "descendants":
            depth = self.argument(node, definition, "depth")
            levels = min(max(depth, 1), MAX_TREE_LEVELS) if _is_int(depth) else DEFAULT_TREE_LEVELS
            return sum(TREE_FANOUT**level for level in range(1, levels + 1))
        return LIST_ESTIMATES.get(name, DEFAULT_LIST_ESTIMATE)

    def argument(self, node: FieldNode, definition: GraphQLField, name: str) -> Any:
        """The argument's value as the query gives it, else the schema's default (None if unknown)."""
        given: ValueNode | None = next((a.value for a in node.arguments or () if a.name.value == name), None)
        if given is not None:
            value = value_from_ast_untyped(given, self.variables)
            return None if value is Undefined else value
        arg = definition.args[name]
        if arg.default_value is Undefined and arg.ast_node is not None and arg.ast_node.default_value is not None:
            return value_from_ast_untyped(arg.ast_node.default_value)  # a schema built from SDL
        return None if arg.default_value is Undefined else arg.default_value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(n: int) -> str:
    return f"at least {CEILING}" if n >= CEILING else str(n)


def _reporting(errors: list[GraphQLError]) -> type[ValidationRule]:
    """A validation rule that reports errors found beforehand, beside graphql-core's own."""

    class Report(ValidationRule):
        def __init__(self, context: ValidationContext) -> None:
            super().__init__(context)
            for error in errors:
                context.report_error(error)

    return Report


class QueryCostLimiter(SchemaExtension):
    """Refuses a query whose cost is over the budget before it runs.

    The budget is `max_complexity` when given, else the serving app's
    `GatewaySettings.max_complexity`, else the settings' default. Over it, the refusal is
    reported with graphql-core's validation errors (a too-deep query hears about its depth
    too); but when the document expands to more fields than the budget, validation itself
    would be the cost, so the refusal takes its place, with the alias count (over
    `max_aliases`) that `MaxAliasesLimiter` would have reported.
    """

    def __init__(self, *, max_complexity: int | None = None, max_aliases: int | None = None) -> None:
        self.max_complexity = max_complexity
        self.max_aliases = max_aliases

    def budget(self) -> int:
        if self.max_complexity is not None:
            return self.max_complexity
        request = getattr(self.execution_context.context, "request", None)
        settings = getattr(getattr(getattr(request, "app", None), "state", None), "settings", None)
        return getattr(settings, "max_complexity", DEFAULT_MAX_COMPLEXITY)

    def on_validate(self) -> Iterator[None]:
        context = self.execution_context
        if context.graphql_document is not None and context.pre_execution_errors is None:
            variables = context.variables if isinstance(context.variables, Mapping) else None
            errors, preempt = self.check(context.schema._schema, context.graphql_document, variables)
            if preempt:
                # Errors set before validation stand in for it: strawberry skips validating a
                # document that has errors already, and never executes it.
                context.pre_execution_errors = errors
            elif errors:
                context.validation_rules = (*context.validation_rules, _reporting(errors))
        yield

    def check(self, schema: GraphQLSchema, document: DocumentNode,
              variables: Mapping[str, Any] | None) -> tuple[list[GraphQLError], bool]:
        """The errors to report, and whether they must take validation's place."""
        try:
            p = price(schema, document, variables)
        except RecursionError:
            return [GraphQLError("query is nested too deeply to be priced")], True
        budget = self.budget()
        errors = []
        if p.cost > budget:
            errors.append(GraphQLError(f"query cost {_count(p.cost)} exceeds the budget {budget}"))
        preempt = p.fields > budget
        if preempt and self.max_aliases is not None and p.aliases > self.max_aliases:
            errors.append(GraphQLError(f"query has {_count(p.aliases)} aliases with its fragments expanded, "
                                       f"over the limit of {self.max_aliases}"))
        return errors, preempt
