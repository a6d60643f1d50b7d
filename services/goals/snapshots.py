"""How a key result's and an objective's snapshots are stored: a transcoding for every type in
their state that the snapshot store's transcoder (`services.common.snapshots`) lacks.

Their state is kept in JSON-friendly shapes (lists, dicts with string keys, ids, dates and
datetimes, which the standard transcodings cover) but for its enums: a key result's `kind`, an
objective's `owner_kind` and `status`. Stored by value, they come back as members, not strings.
A type added to their state that is neither fails the snapshot (logged; the save stands) until
it gets a transcoding here (`tests/integration/test_snapshots.py` checks state type by type).
"""

from __future__ import annotations

from eventsourcing.persistence import JSONTranscoder

from services.common.snapshots import enum_by_value
from services.goals.domain import KeyResultKind, ObjectiveStatus, OwnerKind


def register_goals_state(transcoder: JSONTranscoder) -> None:
    """Register a transcoding for every type in a key result's or an objective's state that the
    snapshot store's own lack. The names are stored in snapshots: they stay as they are."""
    for transcoding in (
        enum_by_value(KeyResultKind, "goals_key_result_kind"),
        enum_by_value(ObjectiveStatus, "goals_objective_status"),
        enum_by_value(OwnerKind, "goals_owner_kind"),
    ):
        transcoder.register(transcoding)
