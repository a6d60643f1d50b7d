"""The committed contracts are what the code exports: a change to an endpoint, a GraphQL type or
an event that is not also a change to `contracts/` (via `make contracts`) fails here."""

from __future__ import annotations

import pytest

from services.contracts import CONTRACTS, exported


@pytest.fixture(scope="module")
def current() -> dict:
    return exported()


def test_every_exported_contract_is_committed_unchanged(current: dict) -> None:
    stale = [str(p.relative_to(CONTRACTS)) for p, text in current.items()
             if not p.exists() or p.read_text() != text]
    assert not stale, f"contracts differ from the code; run `make contracts`: {stale}"


def test_no_committed_event_schema_is_left_over(current: dict) -> None:
    committed = set((CONTRACTS / "events").glob("*/*.json"))
    assert committed, "no event schemas committed"
    orphans = [str(p.relative_to(CONTRACTS)) for p in committed - set(current)]
    assert not orphans, f"event schemas the code no longer exports: {orphans}"


def test_the_event_contract_names_what_followers_rely_on(current: dict) -> None:
    names = {p.name for p in current if p.parent.parent.name == "events"}
    assert {"KeyResultProgressed.v1.json", "ObjectiveAligned.v1.json", "KPIThresholdBreached.v1.json",
            "KPIRecovered.v1.json", "KPIMeasured.v1.json"} <= names
