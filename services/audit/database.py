"""The database an audit command works on: `DATABASE_URL`, else the embedded PostgreSQL."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from services.common import devdb
from services.common.settings import DATA_DIR
from services.stack import DEFAULT_PG_PORT


@contextmanager
def connect_database(args: argparse.Namespace | None = None) -> Iterator[str]:
    """Yields a database URL: `DATABASE_URL`, else the embedded server (`--data-dir`, default
    `.data/postgres`), started on `--pg-port` if it is not running and then stopped again
    afterwards (one that was running, for a `make run` elsewhere, is left running)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    data_dir = Path(getattr(args, "data_dir", None) or DATA_DIR / "postgres").resolve()
    port = getattr(args, "pg_port", None) or int(os.environ.get("TANDEM_PG_PORT", DEFAULT_PG_PORT))
    print(f"(embedded PostgreSQL, data in {data_dir})", file=sys.stderr, flush=True)
    url, started = devdb.start(data_dir, port)
    try:
        yield url
    finally:
        if started:
            devdb.stop(data_dir)
