"""How snapshots are stored: a transcoder of the snapshot store's own, under which an aggregate's
state comes back type for type.

A snapshot stores an aggregate's attributes. The library's `JSONTranscoder` asks a transcoding
only for what `json` cannot encode: a tuple becomes a list and a `StrEnum` a string without
asking, so a key result's `kind`, an objective's `status` or a KPI's `rules` would come back as
a string and a list (equal to the originals, so `==` does not notice, but not of their types).
`SnapshotTranscoder` gives the registered transcodings those types too, and refuses what would
come back as something else (a JSON-native subclass with no transcoding of its own, such as an
unregistered enum or named tuple, or a dict key that is not a string): the snapshot is then not
taken (`TandemApplication._take_snapshots` logs it), rather than taken wrong.

It serves the snapshot store alone (`SnapshottingApplication.construct_snapshot_store`): events
keep the application's own transcoder, whose JSON is the contract (`contracts/events/`), so no
event's stored bytes change, and an event field of one of these types still fails to encode.
Each application registers the transcodings of its domain's types in
`register_snapshot_transcodings` (`services.goals.snapshots`, `services.metrics.snapshots`).
"""

from __future__ import annotations

import enum
from typing import Any, TypeVar
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.persistence import EventStore, JSONTranscoder, Transcoding, TranscodingNotRegisteredError

from services.common.recorder import binary_insert

# What `json` encodes without asking the transcoder (subclasses included).
_JSON_NATIVE = (str, int, float, list, tuple, dict)
# Of those, the types that come back as themselves (a tuple, as a list, unless `TupleAsList`).
_PLAIN = frozenset({str, int, float, bool, list, tuple, dict})

E = TypeVar("E", bound=enum.Enum)


class _Claimed:
    """A value of a JSON-native type that has a transcoding of its own."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj


class SnapshotTranscoder(JSONTranscoder):
    """A `JSONTranscoder` whose transcodings apply to tuples and enums as well (see the module)."""

    def encode(self, obj: Any) -> bytes:
        return super().encode(self._claim(obj))

    def _encode_obj(self, o: Any) -> dict[str, Any]:
        encoded = super()._encode_obj(o.obj if type(o) is _Claimed else o)
        encoded["_data_"] = self._claim(encoded["_data_"])
        return encoded

    def _claim(self, obj: Any) -> Any:
        kind = type(obj)
        if kind in self.types and issubclass(kind, _JSON_NATIVE):
            return _Claimed(obj)
        if kind is dict:
            for key in obj:
                if type(key) is not str:
                    msg = f"a dict key of type {type(key)} would come back as a str: snapshot state keys are str"
                    raise TranscodingNotRegisteredError(msg)
            return {k: self._claim(v) for k, v in obj.items()}
        if kind is list or kind is tuple:
            return [self._claim(v) for v in obj]
        if kind not in _PLAIN and issubclass(kind, _JSON_NATIVE):
            native = next(t for t in kind.__mro__ if t in _PLAIN)
            msg = (f"Object of type {kind} would come back as a {native.__name__}: "
                   "register a transcoding for it in register_snapshot_transcodings")
            raise TranscodingNotRegisteredError(msg)
        return obj


class TupleAsList(Transcoding):
    type = tuple
    name = "tuple"

    def encode(self, obj: tuple[Any, ...]) -> list[Any]:
        return list(obj)

    def decode(self, data: list[Any]) -> tuple[Any, ...]:
        return tuple(data)


class SetAsList(Transcoding):
    type = set
    name = "set"

    def encode(self, obj: set[Any]) -> list[Any]:
        try:
            return sorted(obj)  # the same set, the same bytes
        except TypeError:
            return list(obj)

    def decode(self, data: list[Any]) -> set[Any]:
        return set(data)


class EnumByValue(Transcoding):
    """An enum member as its value (`enum_by_value`)."""

    def __init__(self, enum_class: type[enum.Enum], name: str) -> None:
        self.type = enum_class
        self.name = name

    def encode(self, obj: enum.Enum) -> Any:
        return obj.value

    def decode(self, data: Any) -> enum.Enum:
        return self.type(data)


def enum_by_value(enum_class: type[E], name: str) -> Transcoding:
    """A transcoding of the enum's members as their values, under `name` (which stored snapshots
    carry: it stays as it is once snapshots were written with it)."""
    return EnumByValue(enum_class, name)


class SnapshottingApplication(Application[UUID]):
    """An application whose snapshot store has a transcoder of its own (see the module)."""

    def construct_snapshot_store(self) -> EventStore[UUID]:
        """Snapshots through a `SnapshotTranscoder` with the `register_snapshot_transcodings`,
        and the events' mapper class (for Tandem's applications, the one that stamps `meta`)."""
        transcoder = SnapshotTranscoder()
        self.register_snapshot_transcodings(transcoder)
        recorder = self.factory.aggregate_recorder(purpose="snapshots")
        binary_insert(recorder)  # a KPI's snapshot is megabytes: not escaped as text
        return self.factory.event_store(
            mapper=self.factory.mapper(transcoder=transcoder, mapper_class=type(self.mapper)),
            recorder=recorder,
        )

    def register_snapshot_transcodings(self, transcoder: JSONTranscoder) -> None:
        """The events' transcodings, tuples and sets; an application adds its domain's types."""
        self.register_transcodings(transcoder)
        transcoder.register(TupleAsList())
        transcoder.register(SetAsList())
