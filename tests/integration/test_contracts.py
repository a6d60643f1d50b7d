"""The committed contracts are what the code exports: a change to an endpoint, a GraphQL type or
an event that is not also a change to `contracts/` (via `make contracts`) fails here."""

from __future__ import annotations

import json

import pytest

from services.contracts import CONTRACTS, exported, history_files


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
    orphans = [str(p.relative_to(CONTRACTS)) for p in committed - set(current) - set(history_files())]
    assert not orphans, f"event schemas the code no longer exports: {orphans}"


def test_every_older_version_of_an_event_keeps_its_schema(current: dict) -> None:
    """An event at version N keeps the schemas of versions 1 to N-1 (history: a log holds events
    of every version), each saying its own version; the current one names them in `x-history`."""
    history = history_files()
    assert history, "no event has an older version"
    missing = [str(p.relative_to(CONTRACTS)) for p in history if not p.exists()]
    assert not missing, f"older versions' schemas are gone: {missing}"
    for path, version in history.items():
        doc = json.loads(path.read_text())
        event_type = path.name.split(".")[0]
        assert (doc["title"], doc["x-version"]) == (event_type, version), path
        assert doc["$id"].endswith(f"/{path.parent.name}/{path.name}"), path
        newer = [json.loads(text) for p, text in current.items()
                 if p.parent == path.parent and p.name.split(".")[0] == event_type]
        assert len(newer) == 1 and newer[0]["x-version"] > version, path
        assert newer[0]["x-history"][f"v{version}"]["schema"] == path.name


def test_the_event_contract_names_what_followers_rely_on(current: dict) -> None:
    names = {p.name for p in current if p.parent.parent.name == "events"}
    assert {"KeyResultProgressed.v2.json", "ObjectiveAligned.v1.json", "KPIThresholdBreached.v1.json",
            "KPIRecovered.v1.json", "KPIMeasured.v1.json"} <= names
