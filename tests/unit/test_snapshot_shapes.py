"""Snapshots store an aggregate's attributes: a change of them must be versioned like an event.

Each snapshotted aggregate class has a fixture, `tests/fixtures/snapshots/<Class>.v<N>.json`,
naming the attributes its code sets at `class_version` N (read from the class's source: every
`self.<name> = ...`). When the attributes change, this fails until the class's `class_version`
is bumped, an `upcast_v<N>_v<N+1>` turns an older snapshot's state into the new one, and the new
fixture is written (`python -m tests.unit.test_snapshot_shapes` writes it).
"""

from __future__ import annotations

import ast
import inspect
import json
import sys
import textwrap
from pathlib import Path

from services.goals.application import Goals, KPIProgress
from services.metrics.application import Metrics

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "snapshots"
APPS = (Goals, KPIProgress, Metrics)


def snapshotted() -> list[type]:
    classes = {cls for app in APPS for cls in (app.snapshotting_intervals or {})}
    return sorted(classes, key=lambda c: c.__name__)


def attributes(cls: type) -> list[str]:
    """The attributes the class's own code sets on its instances."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    names = {node.attr for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
             and isinstance(node.value, ast.Name) and node.value.id in ("self", "aggregate")}
    return sorted(names)


def fixture(cls: type) -> Path:
    return FIXTURES / f"{cls.__name__}.v{getattr(cls, 'class_version', 1)}.json"


def test_every_snapshotted_aggregate_has_the_attributes_of_its_version() -> None:
    assert snapshotted(), "nothing is snapshotted: then this guard has nothing to guard"
    for cls in snapshotted():
        path = fixture(cls)
        assert path.exists(), f"{path.name} is missing: run `python -m tests.unit.test_snapshot_shapes`"
        recorded = json.loads(path.read_text())["attributes"]
        assert attributes(cls) == recorded, (
            f"{cls.__name__}'s attributes changed since version {getattr(cls, 'class_version', 1)}: bump its "
            "class_version, add the upcaster for older snapshots, and write the new fixture")


def test_a_versioned_aggregate_upcasts_every_older_snapshot() -> None:
    for cls in snapshotted():
        version = getattr(cls, "class_version", 1)
        missing = [f"upcast_v{v}_v{v + 1}" for v in range(1, version) if not hasattr(cls, f"upcast_v{v}_v{v + 1}")]
        assert not missing, f"{cls.__name__} lacks {missing}"


def write_fixtures() -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for cls in snapshotted():
        fixture(cls).write_text(json.dumps({"class": f"{cls.__module__}:{cls.__qualname__}",
                                            "attributes": attributes(cls)}, indent=2) + "\n")
        print(f"wrote {fixture(cls)}", file=sys.stderr)


if __name__ == "__main__":
    write_fixtures()
