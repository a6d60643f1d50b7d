"""The contracts in `contracts/`, exported from the code (`make contracts`).

- `contracts/openapi/<service>.json`: each REST app's OpenAPI document, every operation with
  `x-tandem-roles` (the roles its role check lets through) and, where a member is limited to
  their own and their unit's goals, `x-tandem-member-scope` (see `route_access`).
- `contracts/graphql/schema.graphql`: the gateway's strawberry schema as SDL.
- `contracts/events/<service>/<EventType>.v<version>.json`: a JSON Schema for each event type,
  describing the stored JSON state exactly as followers read it (UUIDs, dates and datetimes are
  tagged values: {"_type_": "uuid_hex", "_data_": "<32 hex digits>"}). `x-version` is the
  version (the event class's `class_version`); from version 2 on the state carries it as
  `class_version` too, as the library stores it, and `x-history` names each older version's
  schema with what its upcaster says changed.
- Older versions' schemas stay: `<EventType>.v1.json` ... `v<N-1>.json` are history, written by
  the export while they were current and kept (never rewritten) once `class_version` moves on,
  so a follower can read every event a log holds. `history <service> <commit> <file>` writes one
  from the domain module as it was at a commit, for a version that was never exported alone.

A test regenerates the current ones and fails when a committed file differs, and checks that
every older version's schema is there.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import json
import sys
import types
import typing
from datetime import date, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate
from eventsourcing.utils import get_topic
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts

from services.common.auth import Principal, Role, authenticate
from services.common.eventstore import event_classes, topic_event_type
from services.common.problems import Problem
from services.common.settings import REPO_ROOT

CONTRACTS = REPO_ROOT / "contracts"
EVENTS_BASE = "https://tandem.dev/contracts/events"
EVENT_DOMAINS = {"goals": "services.goals.domain", "metrics": "services.metrics.domain"}
REST_APPS = {"goals": "services.goals.api", "metrics": "services.metrics.api"}
# Set by the library on every event, or by the mapper: never part of the stored state's fields.
_NOT_STORED = {"originator_id", "originator_version"}

TAGGED = {
    "uuid": {"type": "object", "required": ["_type_", "_data_"], "additionalProperties": False,
             "properties": {"_type_": {"const": "uuid_hex"}, "_data_": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}},
    "datetime": {"type": "object", "required": ["_type_", "_data_"], "additionalProperties": False,
                 "properties": {"_type_": {"const": "datetime_iso"}, "_data_": {"type": "string", "format": "date-time"}}},
    "date": {"type": "object", "required": ["_type_", "_data_"], "additionalProperties": False,
             "properties": {"_type_": {"const": "date_iso"}, "_data_": {"type": "string", "format": "date"}}},
    "meta": {"type": "object", "required": ["actor", "correlation_id"],
             "description": "Who made the change, within which request and trace, and what caused it.",
             "properties": {"actor": {"type": "string"}, "correlation_id": {"type": "string"},
                            "causation_id": {"type": ["string", "null"]}, "trace_id": {"type": ["string", "null"]}}},
}


# Types that map to one schema each; UUIDs, datetimes and dates are the library's tagged values.
_PLAIN: dict[Any, dict[str, Any]] = {
    UUID: {"$ref": "#/$defs/uuid"}, datetime: {"$ref": "#/$defs/datetime"}, date: {"$ref": "#/$defs/date"},
    bool: {"type": "boolean"}, int: {"type": "integer"}, float: {"type": "number"}, str: {"type": "string"},
    object: {},
}


def _type_schema(tp: Any) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_type_schema(a) for a in typing.get_args(tp)]}
    if tp is type(None):
        return {"type": "null"}
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return {"type": "array", "items": _type_schema(args[0]) if args else {}}
    if origin is dict or tp is dict:
        return {"type": "object"}
    if inspect.isclass(tp) and issubclass(tp, enum.Enum):
        return {"type": "string", "enum": [m.value for m in tp]}
    if tp in _PLAIN:
        return dict(_PLAIN[tp])
    raise TypeError(f"no JSON Schema mapping for {tp!r}")


def event_schema(service: str, aggregate: type, event_class: type, namespace: dict[str, Any],
                 topic: str | None = None) -> tuple[str, dict[str, Any]]:
    """File name and JSON Schema of one event class at its `class_version`. `topic` names the
    class where it is not importable under its own (an older version's class read from history)."""
    topic = topic or get_topic(event_class)
    name = topic_event_type(topic)
    version = getattr(event_class, "class_version", 1)
    properties: dict[str, Any] = {}
    required = []
    for f in dataclasses.fields(event_class):
        if f.name in _NOT_STORED:
            continue
        tp = eval(f.type, namespace) if isinstance(f.type, str) else f.type  # noqa: S307 - our own annotations
        properties[f.name] = _type_schema(tp)
        # The library stores every field, defaults included; a field added later comes with a
        # new version and an upcaster, so every state of a version has all of its fields.
        required.append(f.name)
    properties["meta"] = {"$ref": "#/$defs/meta"}
    schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"{EVENTS_BASE}/{service}/{name}.v{version}.json",
        "title": name,
        "description": (inspect.getdoc(aggregate) or "").splitlines()[0],
        "x-topic": topic,
        "x-version": version,
        "type": "object",
        "required": required,
        "properties": properties,
        "additionalProperties": False,
        "$defs": TAGGED,
    }
    if version > 1:
        # The library stores the version in the state of every event past the first.
        properties["class_version"] = {"const": version}
        required.append("class_version")
        schema["x-history"] = {
            f"v{v}": {"schema": f"{name}.v{v}.json",
                      "upcast": inspect.getdoc(getattr(event_class, f"upcast_v{v}_v{v + 1}")) or ""}
            for v in range(1, version)
        }
    required.sort()
    return f"{name}.v{version}.json", schema


def event_schemas(service: str) -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema for every event of every aggregate in the service's domain, at
    each event class's current version."""
    module = importlib.import_module(EVENT_DOMAINS[service])
    return module_event_schemas(service, module)


def module_event_schemas(service: str, module: types.ModuleType, module_name: str | None = None
                         ) -> dict[str, dict[str, Any]]:
    """As `event_schemas`, for a domain module given (`module_name`: the name its topics carry,
    when it was loaded under another, as `python -m services.contracts history` does)."""
    namespace = {**vars(module), "UUID": UUID, "datetime": datetime, "date": date}
    aggregates = [v for v in vars(module).values()
                  if inspect.isclass(v) and issubclass(v, Aggregate) and v.__module__ == module.__name__]
    out: dict[str, dict[str, Any]] = {}
    for aggregate in aggregates:
        for event_class in event_classes(aggregate):
            topic = get_topic(event_class)
            if module_name is not None:
                topic = topic.replace(module.__name__ + ":", module_name + ":", 1)
            file_name, schema = event_schema(service, aggregate, event_class, namespace, topic)
            out[file_name] = schema
    return out


def event_versions(service: str) -> dict[str, int]:
    """Contract event type -> its current version (`class_version`)."""
    module = importlib.import_module(EVENT_DOMAINS[service])
    aggregates = [v for v in vars(module).values()
                  if inspect.isclass(v) and issubclass(v, Aggregate) and v.__module__ == module.__name__]
    return {topic_event_type(get_topic(c)): getattr(c, "class_version", 1)
            for a in aggregates for c in event_classes(a)}


def history_files() -> dict[Path, int]:
    """The older versions' schemas that must stay committed: for each event type at version N,
    `<Type>.v1.json` to `<Type>.v<N-1>.json` (path -> version). They are history, written once by
    the export before the version went up (or from the old code, `history`), and never again:
    a follower reads old events against them."""
    out: dict[Path, int] = {}
    for service in EVENT_DOMAINS:
        for name, current in event_versions(service).items():
            for v in range(1, current):
                out[CONTRACTS / "events" / service / f"{name}.v{v}.json"] = v
    return out


def openapi(service: str) -> dict[str, Any]:
    """The app's OpenAPI document, each operation with who may call it (`route_access`)."""
    module = importlib.import_module(REST_APPS[service])
    app = module.create_app()
    doc = app.openapi()
    for route in iter_route_contexts(app.routes):  # routers included as FastAPI resolves them
        if not isinstance(route.original_route, APIRoute) or not route.include_in_schema:
            continue
        for method in route.methods:
            operation = doc["paths"].get(route.path_format, {}).get(method.lower())
            if operation is not None:
                operation.update(route_access(route))
    return doc


def _dependants(dependant: Dependant) -> list[Dependant]:
    out = [dependant]
    for sub in dependant.dependencies:
        out += _dependants(sub)
    return out


def _lets_through(check: Any, role: Role) -> bool:
    try:
        check(principal=Principal(subject="contracts", roles=frozenset({role}), token=""))
    except Problem as e:
        if e.status != 403:
            raise
        return False
    return True


def route_access(route: Any) -> dict[str, Any]:
    """Who may call the route, from its dependencies: `x-tandem-roles`, the roles every role
    check on it (`services.common.auth.require`: a dependency on `authenticate`) lets through,
    tried one role at a time; `x-tandem-member-scope`, what a member is limited to, where a
    dependency says (`member_scope`, services.goals.access); `x-tandem-public` where no token is
    needed."""
    dependants = _dependants(route.dependant)
    checks = [d.call for d in dependants if any(sub.call is authenticate for sub in d.dependencies)]
    if not checks:
        return {"x-tandem-public": True, "x-tandem-roles": [r.value for r in Role]}
    roles = [r.value for r in Role if all(_lets_through(c, r) for c in checks)]
    access: dict[str, Any] = {"x-tandem-roles": roles}
    scopes = [d.call.member_scope for d in dependants if isinstance(getattr(d.call, "member_scope", None), str)]
    if scopes and Role.member.value in roles:
        access["x-tandem-member-scope"] = "; ".join(dict.fromkeys(scopes))
    return access


def graphql_sdl() -> str:
    from services.gateway.api import schema_sdl

    return schema_sdl().rstrip() + "\n"


def _json(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def exported() -> dict[Path, str]:
    """Every contract file as the code exports it now."""
    files: dict[Path, str] = {}
    for service in REST_APPS:
        files[CONTRACTS / "openapi" / f"{service}.json"] = _json(openapi(service))
    for service in EVENT_DOMAINS:
        for name, schema in event_schemas(service).items():
            files[CONTRACTS / "events" / service / name] = _json(schema)
    files[CONTRACTS / "graphql" / "schema.graphql"] = graphql_sdl()
    return files


def main(argv: list[str]) -> int:
    import os

    os.environ.setdefault("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/contracts")
    if argv[:1] == ["history"] and len(argv) == 4:
        return write_history(*argv[1:])
    files = exported()
    if argv[:1] == ["export"]:
        keep = history_files()
        for d in (CONTRACTS / "events").glob("*/*.json"):
            if d not in files and d not in keep:
                d.unlink()
        missing = [str(p.relative_to(CONTRACTS)) for p in keep if not p.exists()]
        if missing:
            print(f"older versions' schemas are missing (write them with `history`): {missing}", file=sys.stderr)
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        print(f"wrote {len(files)} contract files under {CONTRACTS}")
        return 0
    print("usage: python -m services.contracts export\n"
          "       python -m services.contracts history <service> <commit> <EventType>.v<N>", file=sys.stderr)
    return 2


def write_history(service: str, commit: str, file_name: str) -> int:
    """Write an older version's schema from the domain module as it was at `commit` (the last
    commit that stored that version), for a version whose schema was never exported on its own."""
    import importlib.util
    import subprocess
    import tempfile

    module_name = EVENT_DOMAINS[service]
    source = subprocess.run(["git", "show", f"{commit}:{module_name.replace('.', '/')}.py"], cwd=REPO_ROOT,
                            check=True, capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"tandem_history_{service}_{commit}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    schemas = module_event_schemas(service, module, module_name)
    if file_name not in schemas:
        print(f"{commit} exports no {file_name}: {sorted(schemas)}", file=sys.stderr)
        return 1
    target = CONTRACTS / "events" / service / file_name
    if target not in history_files():
        print(f"{file_name} is not an older version of a current event type", file=sys.stderr)
        return 1
    schema = schemas[file_name]
    schema["x-written-by-commit"] = commit
    target.write_text(_json(schema))
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
