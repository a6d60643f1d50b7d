"""A batch of events gives the same read model whatever its size (services.common.batching).

The projections hold their hot rows in memory for a batch, send statements in pipeline mode and
work out derived columns once per batch; none of that may change a row. So the same realistic
log (the rebuild benchmark's generator, small) is replayed with batch sizes 1, 7 and 1000, and
run through the live runners (traced, announcing), and every read model's checksum must be the
same each way.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from bench.rebuild import Shape, generate
from services.audit import read_model_sources
from services.common.database import ensure_schema
from services.common.replay import Checksum, ReadModelSource, checksum, replay
from tests.conftest import fresh_database

BATCH_SIZES = (1, 7, 1000)


@pytest.fixture(scope="module")
def generated_log() -> Iterator[str]:
    with fresh_database() as url:
        shape = Shape(departments=1, teams=2, company_objectives=1, objectives_per_department=1,
                      objectives_per_team=3)
        generate(url, 0, shape=shape)
        yield url


def _checksum(url: str, source: ReadModelSource, schema: str) -> Checksum:
    with psycopg.connect(url) as conn:
        return checksum(conn, source, schema)


def test_every_batch_size_gives_the_same_read_models(generated_log: str) -> None:
    url = generated_log
    for source in read_model_sources():
        sums = {}
        for size in BATCH_SIZES:
            schema = f"batches_{source.name.lower()}_{size}"
            report = replay(source, url, schema, batch_size=size)
            assert report.events > 0
            sums[size] = _checksum(url, source, schema)
        first = sums[BATCH_SIZES[0]]
        assert first.rows > 0, source.label
        for size, digest in sums.items():
            assert digest.tables == first.tables, (source.label, size)
            assert digest.positions == first.positions, (source.label, size)


def test_the_live_runners_build_what_a_replay_builds(generated_log: str) -> None:
    """The live path: `BatchingRunner` with the traced projection, announcing to subscribers
    (which makes a statement that names a held table send its rows first), in batches of 500."""
    url = generated_log
    for source in read_model_sources():
        ensure_schema(url, source.schema)
        for spec in source.specs:
            with spec.runner(url) as runner:
                runner.run_forever(timeout=0.2)
        replayed = f"live_check_{source.name.lower()}"
        replay(source, url, replayed, batch_size=13)
        live, rebuilt = _checksum(url, source, source.schema), _checksum(url, source, replayed)
        assert live.rows > 0, source.label
        assert live.tables == rebuilt.tables, source.label
        assert live.positions == rebuilt.positions, source.label


@pytest.mark.parametrize("kept_rows", [0, 5])
def test_rows_kept_across_batches_change_nothing(generated_log: str, kept_rows: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A replay keeps held rows from one batch to the next (`ReadModel.keeps_rows`); keeping
    none, or so few that what is kept is dropped after almost every batch, builds the same rows."""
    import services.common.replay as replay_module

    url = generated_log
    for source in read_model_sources():
        kept = _checksum(url, source, _replayed(url, source, f"kept_{source.name.lower()}"))
        monkeypatch.setattr(replay_module, "KEPT_ROWS", kept_rows)
        bounded = _checksum(url, source, _replayed(url, source, f"kept_{kept_rows}_{source.name.lower()}"))
        monkeypatch.undo()
        assert kept.rows > 0, source.label
        assert (bounded.tables, bounded.positions) == (kept.tables, kept.positions), source.label


def _replayed(url: str, source: ReadModelSource, schema: str) -> str:
    replay(source, url, schema, batch_size=7)
    return schema
