"""Read-side plumbing: projections that follow an event log into PostgreSQL tables.

A projection is the `eventsourcing` library's `Projection` over a `ReadModel`, which is the
library's PostgreSQL tracking recorder extended with the service's own tables. Every change a
projection makes is written in the same transaction as its tracking position, so each event
takes effect exactly once across crashes and restarts (DESIGN.md, "Read side").

A service that follows another service's log reads it as the contract says: `followed_log`
builds a stand-in application that decodes stored notifications into `ContractEvent`s (event
type name, aggregate id, version, JSON state) without importing the other service's classes.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from eventsourcing.application import Application
from eventsourcing.persistence import InfrastructureFactory, Mapper, StoredEvent, Tracking
from eventsourcing.postgres import PostgresProcessRecorder, PostgresTrackingRecorder
from eventsourcing.projection import (
    EventSourcedProjection,
    EventSourcedProjectionRunner,
    Projection,
    ProjectionRunner,
)
from eventsourcing.utils import Environment, get_topic
from psycopg.sql import SQL, Identifier

from services.common.database import eventsourcing_env, projection_channel
from services.common.eventstore import standard_transcoder, topic_event_type
from services.common.recorder import UnpipelinedInsert

log = logging.getLogger(__name__)

Statement = tuple[str, Sequence[Any]]
_CREATED_TABLE = re.compile(r"CREATE TABLE IF NOT EXISTS \{schema\}\.(\w+)")


class ReadModel(PostgresTrackingRecorder):
    """A tracking recorder that also owns the projection's tables.

    Subclasses list their DDL in `tables` (with `{schema}` where the schema goes) and write
    through `apply`, which commits the statements together with the tracking position.

    A read model is rebuilt from the log whenever its shape changes: the DDL (and `revision`,
    to bump by hand when only the projection's logic changed) is fingerprinted, and a
    fingerprint other than the stored one drops the tables and the tracking positions, so the
    runner replays from the start. Events are never touched.
    """

    tables: Sequence[str] = ()
    revision: int = 1

    def __init__(self, datastore: Any, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        schema = self.datastore.schema
        for ddl in self.tables:
            self.sql_create_statements.append(SQL(ddl.format(schema=schema)))  # type: ignore[arg-type]
        self.channel = projection_channel(f"{schema}.{self.tracking_table_name}")

    @property
    def schema(self) -> str:
        return self.datastore.schema

    @property
    def table_names(self) -> list[str]:
        return [m.group(1) for ddl in self.tables if (m := _CREATED_TABLE.search(ddl))]

    @classmethod
    def fingerprint(cls) -> str:
        """The read model's shape: its DDL and revision."""
        return hashlib.sha256(("\n".join(cls.tables) + f"\nrevision {cls.revision}").encode()).hexdigest()

    def _create_table(self, curs: Any) -> None:
        """Runners that share a read model (the gateway's follows two logs) and the API's own
        start-up create these tables at the same moment; concurrent CREATE ... IF NOT EXISTS can
        still collide in the catalogue, so they take turns."""
        curs.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{self.schema}.{self.tracking_table_name}",))
        fingerprints = SQL("{}.read_model_fingerprints").format(Identifier(self.schema))
        curs.execute(SQL("CREATE TABLE IF NOT EXISTS {} (tracking_table text PRIMARY KEY, fingerprint text NOT NULL)")
                     .format(fingerprints))
        curs.execute(SQL("SELECT fingerprint FROM {} WHERE tracking_table = %s").format(fingerprints),
                     (self.tracking_table_name,))
        stored = curs.fetchone()
        # No fingerprint at all: new, or built before fingerprints were kept; either way the
        # drops below find nothing to keep.
        if stored is None or stored["fingerprint"] != self.fingerprint():
            if stored is not None:
                log.warning("read model %s.%s changed shape: rebuilding it from the log",
                            self.schema, self.tracking_table_name)
            for table in self.table_names:
                curs.execute(SQL("DROP TABLE IF EXISTS {}.{} CASCADE").format(Identifier(self.schema), Identifier(table)))
            curs.execute("SELECT to_regclass(%s) AS t", (f"{self.schema}.{self.tracking_table_name}",))
            if curs.fetchone()["t"] is not None:
                curs.execute(SQL("DELETE FROM {}.{} WHERE application_name <> %s").format(
                    Identifier(self.schema), Identifier(self.tracking_table_name)), (self.table_migration_identifier,))
        super()._create_table(curs)
        curs.execute(SQL("INSERT INTO {} VALUES (%s, %s) ON CONFLICT (tracking_table) DO UPDATE "
                         "SET fingerprint = EXCLUDED.fingerprint").format(fingerprints),
                     (self.tracking_table_name, self.fingerprint()))

    def apply(self, tracking: Tracking, statements: Iterable[Statement] = ()) -> None:
        """Run the statements and record the tracking position in one transaction."""
        with self.datastore.transaction(commit=True) as curs:
            for sql, params in statements:
                curs.execute(sql.format(schema=self.schema), params)  # type: ignore[arg-type]
            self._insert_tracking(curs, tracking)
            curs.execute(SQL("NOTIFY {}").format(Identifier(self.channel)))

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Read the projection's own tables while processing (the same connection pool)."""
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(sql.format(schema=self.schema), params)  # type: ignore[arg-type]
            return list(curs.fetchall())


@dataclass(frozen=True)
class ContractEvent:
    """A stored event as the contract describes it, decoded without the producer's classes."""

    type: str
    originator_id: uuid.UUID
    version: int
    data: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def timestamp(self) -> datetime:
        return self.data["timestamp"]


class ContractMapper(Mapper[uuid.UUID]):
    def to_domain_event(self, stored_event: StoredEvent) -> Any:  # type: ignore[override]
        state = self.transcoder.decode(stored_event.state)
        meta = state.pop("meta", {}) or {}
        return ContractEvent(
            type=topic_event_type(stored_event.topic),
            originator_id=uuid.UUID(str(stored_event.originator_id)),
            version=stored_event.originator_version,
            data=state,
            meta=meta,
        )

    def to_stored_event(self, domain_event: Any) -> StoredEvent:
        raise TypeError("a followed log is read-only")


class FollowedLog(Application[uuid.UUID]):
    """Reads another service's event log as contract events. Never writes it."""

    def construct_mapper(self) -> Mapper[uuid.UUID]:
        return self.factory.mapper(transcoder=standard_transcoder(), mapper_class=ContractMapper)


def followed_log(name: str) -> type[Application[uuid.UUID]]:
    """A stand-in for the application named `name` (its log's table is `<name>_events`)."""
    return type(name, (FollowedLog,), {"name": name})


@dataclass
class ProjectionSpec:
    """One projection runner: which log it follows and what it writes.

    A read-model projection (`Projection` + `view_class`) writes tables; an event-sourced one
    (the library's `EventSourcedProjection`, no `view_class`) is a policy that records new
    events in its own service's log, with the tracking position in the same transaction, through
    an `AnnouncingProcessRecorder` so that reads waiting on its positions wake when it commits.
    """

    application_class: type[Application[Any]]
    projection_class: type[Projection[Any]] | type[EventSourcedProjection[Any]]
    view_class: type[ReadModel] | None
    application_schema: str
    view_schema: str

    def _process_recorder_env(self) -> dict[str, str]:
        return {f"{self.projection_class.name.upper()}_PROCESS_RECORDER_TOPIC": get_topic(AnnouncingProcessRecorder)}

    def runner(self, database_url: str) -> Any:
        if self.view_class is None:
            return EventSourcedProjectionRunner(application_class=self.application_class,
                                                projection_class=self.projection_class,  # type: ignore[arg-type]
                                                env=self.env(database_url))
        return ProjectionRunner(application_class=self.application_class,
                                projection_class=self.projection_class,  # type: ignore[arg-type]
                                view_class=self.view_class, env=self.env(database_url))

    def env(self, database_url: str) -> dict[str, str]:
        app_name = self.application_class.name.upper()
        env: dict[str, str] = {}
        is_foreign = self.application_schema != self.view_schema
        for key, value in eventsourcing_env(
            database_url, self.application_schema, create_table=not is_foreign, pool_size=1, max_overflow=2
        ).items():
            env[f"{app_name}_{key}"] = value
        for key, value in eventsourcing_env(database_url, self.view_schema, pool_size=1, max_overflow=2).items():
            env[f"{self.projection_class.name.upper()}_{key}"] = value
        if self.view_class is None:
            env.update(self._process_recorder_env())
        return env

    @property
    def events_table(self) -> str:
        """The followed log's table, as the library names it."""
        return f"{self.application_schema}.{self.application_class.name.lower()}_events"

    @property
    def tracking_table(self) -> str:
        return f"{self.view_schema}.{self.projection_class.name.lower()}_tracking"

    def create_tables(self, database_url: str) -> None:
        """Create the read model's tables (tracking included) now, so that a read that waits
        on a position finds them before the projection thread has got going."""
        env = Environment(self.projection_class.name,
                          {**eventsourcing_env(database_url, self.view_schema, pool_size=1, max_overflow=0),
                           **(self._process_recorder_env() if self.view_class is None else {})})
        factory = InfrastructureFactory.construct(env)
        try:
            if self.view_class is None:
                factory.process_recorder()  # the service's log (shared with its write side) and tracking
            else:
                factory.tracking_recorder(self.view_class)
        finally:
            factory.close()


class AnnouncingProcessRecorder(UnpipelinedInsert, PostgresProcessRecorder):
    """The library's process recorder, which also announces each tracking position it records
    on the channel read-your-writes waits listen on (as `ReadModel.apply` does), in the same
    transaction: a read waiting for a position a policy handles wakes when it commits."""

    def __init__(self, datastore: Any, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        self.tracking_channel = projection_channel(f"{self.datastore.schema}.{self.tracking_table_name}")

    def _insert_events(self, curs: Any, stored_events: Sequence[StoredEvent], **kwargs: Any) -> None:
        super()._insert_events(curs, stored_events, **kwargs)
        if kwargs.get("tracking") is not None:
            curs.execute(SQL("NOTIFY {}").format(Identifier(self.tracking_channel)))


class ProjectionThread(threading.Thread):
    """Keeps one projection runner going: if it stops on an error (the database went away, or
    the followed log's table does not exist yet because its service is still starting), it is
    started again after a pause, doubling up to `max_pause`, and resumes from its tracking
    position."""

    def __init__(self, spec: ProjectionSpec, database_url: str, first_pause: float = 0.2,
                 max_pause: float = 5.0):
        super().__init__(name=f"projection-{spec.projection_class.name}-{spec.application_class.name}",
                         daemon=True)
        self.spec = spec
        self.database_url = database_url
        self.first_pause = first_pause
        self.max_pause = max_pause
        self.stopping = threading.Event()
        self.running = threading.Event()
        self.last_error: str | None = None
        self._runner: ProjectionRunner[Any, Any] | None = None

    def run(self) -> None:
        pause = self.first_pause
        while not self.stopping.is_set():
            try:
                with self.spec.runner(self.database_url) as runner:
                    self._runner = runner
                    self.running.set()
                    self.last_error = None
                    pause = self.first_pause
                    while not self.stopping.is_set():
                        runner.run_forever(timeout=0.5)
                        if runner.is_interrupted.is_set():
                            break
            except Exception as e:  # noqa: BLE001 - any failure restarts the runner
                self.last_error = f"{type(e).__name__}: {e}"
                level = logging.INFO if "does not exist" in str(e) else logging.WARNING
                log.log(level, "projection %s on %s stopped, retrying in %.1fs: %s",
                        self.spec.projection_class.name, self.spec.application_class.name, pause, e)
            finally:
                self.running.clear()
                self._runner = None
            self.stopping.wait(pause)
            pause = min(pause * 2, self.max_pause)

    def stop(self) -> None:
        self.stopping.set()
        runner = self._runner
        if runner is not None:
            runner.stop()
