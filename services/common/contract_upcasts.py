"""Reading older versions of another service's events: contract-level upcasts.

A follower reads another service's log as the contract says (`ContractMapper`), never with the
producer's classes, so the producer's `upcast_vX_vY` methods are out of its reach. What it has
instead is this table: for each contract event type and stored version, a function that turns
the decoded state (a dict as `standard_transcoder` decodes it: UUIDs, dates and datetimes are
Python values) of that version into the next one, in place. `upcast_contract_state` applies
them until the state is at the newest version the table knows, so every handler sees one shape
per event type whatever the log holds.

The table is the consumer's reading of `contracts/events/<service>/<Type>.v<N>.json`: version
N's schema names the fields it added over N-1, and the function gives them the value that the
older events meant (the producer's upcaster says the same in its own terms).
`tests/unit/test_upcasting.py` checks the table against the contracts: every versioned event
type has an upcast from each older version, and each older fixture, read through
`ContractMapper`, comes out valid against the current schema.

A version newer than the table knows (a producer deployed before its followers) passes through
as stored: added fields are only ever added, so handlers that `.get` what they need keep working.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

ContractUpcast = Callable[[dict[str, Any]], None]


def _defaults(**fields: Any) -> ContractUpcast:
    """An upcast that adds fields the older version did not have, with what their absence meant."""

    def upcast(state: dict[str, Any]) -> None:
        for name, value in fields.items():
            state.setdefault(name, value)

    return upcast


def _kpi_rules_pending_for(state: dict[str, Any]) -> None:
    """KPIDefined v1's rules had no `pending_for`: they fired without waiting (0 seconds)."""
    state["rules"] = [{**r, "pending_for": r.get("pending_for", 0)} for r in state.get("rules") or []]


CONTRACT_UPCASTS: Mapping[tuple[str, int], ContractUpcast] = {
    # goals
    ("CycleCreated", 1): _defaults(kind="quarter", parent_id=None),
    ("ObjectiveCreated", 1): _defaults(status="active", carried_from=None),
    ("KeyResultProgressed", 1): _defaults(measurement_id=None),
    ("OrgUnitCreated", 1): _defaults(external_id=None),
    ("OrgUnitMoved", 1): _defaults(effective_on=None),
    ("PersonJoined", 1): _defaults(user_name=None, external_id=None, given_name=None, family_name=None,
                                   formatted_name=None, emails=None, active=True),
    # metrics
    ("KPIDefined", 1): _kpi_rules_pending_for,
}
"""(contract event type, stored version) -> the upcast from that version to the next."""


def upcast_contract_state(event_type: str, state: dict[str, Any],
                          upcasts: Mapping[tuple[str, int], ContractUpcast] = CONTRACT_UPCASTS) -> int:
    """Bring a decoded state (its `class_version`, 1 when absent) up to the newest version the
    table knows for its type, in place; the version it is at now. The state then says
    `class_version` as a current stored event of that version would (absent for version 1)."""
    version = int(state.pop("class_version", 1))
    while (event_type, version) in upcasts:
        upcasts[(event_type, version)](state)
        version += 1
    if version > 1:
        state["class_version"] = version
    return version
