"""The contracts in `contracts/`, exported from the code (`make contracts`).

- `contracts/openapi/<service>.json`: each REST app's OpenAPI document.
- `contracts/graphql/schema.graphql`: the gateway's strawberry schema as SDL.
- `contracts/events/<service>/<EventType>.v<version>.json`: a JSON Schema for each event type,
  describing the stored JSON state exactly as followers read it (UUIDs, dates and datetimes are
  tagged values: {"_type_": "uuid_hex", "_data_": "<32 hex digits>"}).

A test regenerates all of them and fails when a committed file differs.
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

from services.common.eventstore import event_classes, topic_event_type
from services.common.settings import REPO_ROOT

CONTRACTS = REPO_ROOT / "contracts"
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


def event_schemas(service: str) -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema for every event of every aggregate in the service's domain."""
    module = importlib.import_module(EVENT_DOMAINS[service])
    namespace = {**vars(module), "UUID": UUID, "datetime": datetime, "date": date}
    aggregates = [v for v in vars(module).values()
                  if inspect.isclass(v) and issubclass(v, Aggregate) and v.__module__ == module.__name__]
    out: dict[str, dict[str, Any]] = {}
    for aggregate in aggregates:
        for event_class in event_classes(aggregate):
            topic = get_topic(event_class)
            name = topic_event_type(topic)
            version = getattr(event_class, "class_version", 1)
            properties: dict[str, Any] = {}
            required = []
            for f in dataclasses.fields(event_class):
                if f.name in _NOT_STORED:
                    continue
                tp = eval(f.type, namespace) if isinstance(f.type, str) else f.type  # noqa: S307 - our own annotations
                properties[f.name] = _type_schema(tp)
                # A field added later has a default, so events stored before it lack it.
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    required.append(f.name)
            required.sort()
            properties["meta"] = {"$ref": "#/$defs/meta"}
            if version > 1:
                properties["class_version"] = {"const": version}
            out[f"{name}.v{version}.json"] = {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "$id": f"https://tandem.dev/contracts/events/{service}/{name}.v{version}.json",
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
    return out


def openapi(service: str) -> dict[str, Any]:
    module = importlib.import_module(REST_APPS[service])
    return module.create_app().openapi()


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
    files = exported()
    if argv[:1] == ["export"]:
        for d in (CONTRACTS / "events").glob("*/*.json"):
            if d not in files:
                d.unlink()
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        print(f"wrote {len(files)} contract files under {CONTRACTS}")
        return 0
    print("usage: python -m services.contracts export", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
