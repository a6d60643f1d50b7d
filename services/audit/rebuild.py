"""`python -m services.audit rebuild` (`make rebuild`): every read model dropped and built again
from the event logs, checked against the live one.

For each read model: the live one's checksum and tracking positions are read in one snapshot;
the projection replays the logs up to those positions into a schema of its own; the two
checksums must be equal. Then the rebuilt tables replace the live ones in one transaction, unless
`--check-only`, or unless a runner has moved the live read model on meanwhile (then it is left as
it is: the comparison still stands). Prints events per second per read model; exits 1 on any
mismatch.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import psycopg

from services.audit import read_model_sources
from services.audit.database import connect_database
from services.common.replay import checksum, drop_schema, live_checksum, replace_live, replay


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("rebuild", help="rebuild every read model from the logs and compare checksums",
                                   description=__doc__)
    parser.add_argument("--check-only", action="store_true", help="compare only; keep the live read models")
    parser.add_argument("--batch-size", type=int, default=1000, help="events per transaction (default 1000)")
    parser.set_defaults(run=run)


def rebuild_all(database_url: str, *, check_only: bool = False, batch_size: int = 1000,
                out: Any = sys.stdout) -> bool:
    """Rebuild and compare every read model; True when all match."""
    all_match = True
    for source in read_model_sources():
        live = live_checksum(database_url, source)
        scratch = f"{source.schema}_rebuild"
        drop_schema(database_url, scratch)
        try:
            report = replay(source, database_url, scratch, stops=live.positions or None, batch_size=batch_size)
            with psycopg.connect(database_url) as conn:
                rebuilt = checksum(conn, source, scratch)
            match = (rebuilt.digest, rebuilt.positions) == (live.digest, live.positions)
            all_match = all_match and match
            outcome = "kept (check only)"
            if not check_only:
                outcome = ("replaced" if replace_live(database_url, source, scratch, live.positions)
                           else "kept (the live read model moved on meanwhile)")
            print(f"{source.label:<24} {report.events:>9} events in {report.seconds:8.2f} s "
                  f"= {report.events_per_second:>9.0f} events/s   {rebuilt.rows:>8} rows   "
                  f"live {live.digest[:12]} rebuilt {rebuilt.digest[:12]} "
                  f"{'match' if match else 'MISMATCH'}   {outcome}", file=out, flush=True)
            if not match:
                for table, (rows, digest) in sorted(rebuilt.tables.items()):
                    if live.tables.get(table) != (rows, digest):
                        print(f"    {table}: live {live.tables.get(table)} rebuilt {(rows, digest)}", file=out)
        finally:
            drop_schema(database_url, scratch)
    return all_match


def run(args: argparse.Namespace) -> int:
    with connect_database() as url:
        ok = rebuild_all(url, check_only=args.check_only, batch_size=args.batch_size)
    if not ok:
        print("A rebuilt read model differs from the live one: see above.", file=sys.stderr)
    return 0 if ok else 1
