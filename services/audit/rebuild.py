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

from services.audit import read_model_sources, replay_all
from services.audit.database import connect_database
from services.common.replay import checksum, drop_schema, live_checksum, replace_live, replay


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("rebuild", help="rebuild every read model from the logs and compare checksums",
                                   description=__doc__)
    parser.add_argument("--check-only", action="store_true", help="compare only; keep the live read models")
    parser.add_argument("--batch-size", type=int, default=1000, help="events per transaction (default 1000)")
    parser.add_argument("--processes", type=int, default=1,
                        help="read models replayed side by side, each in a process of its own (default 1)")
    parser.set_defaults(run=run)


def rebuild_all(database_url: str, *, check_only: bool = False, batch_size: int = 1000,
                out: Any = sys.stdout, processes: int = 1) -> bool:
    """Rebuild and compare every read model; True when all match. With `processes` > 1 every
    live checksum is read first, then the read models are replayed side by side (each up to its
    own live positions), then each is compared and swapped in as one at a time would be."""
    all_match = True
    sources = read_model_sources()
    if processes > 1:
        lives = [live_checksum(database_url, source) for source in sources]
        for source in sources:
            drop_schema(database_url, _scratch(source, processes))
        try:
            reports = replay_all([(source.label, _scratch(source, processes), live.positions or None)
                                  for source, live in zip(sources, lives, strict=True)],
                                 database_url, batch_size=batch_size, processes=processes)
        except BaseException:
            for source in sources:
                drop_schema(database_url, _scratch(source, processes))
            raise
    for n, source in enumerate(sources):
        scratch = _scratch(source, processes)
        if processes > 1:
            live, report = lives[n], reports[n]
        else:
            live = live_checksum(database_url, source)
            drop_schema(database_url, scratch)
        try:
            if processes <= 1:
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


def _scratch(source: Any, processes: int) -> str:
    """The schema a read model is rebuilt in; side by side, one per read model (two live in
    the goals schema)."""
    return f"{source.schema}_rebuild" if processes <= 1 else f"{source.schema}_rebuild_{source.name.lower()}"


def run(args: argparse.Namespace) -> int:
    with connect_database() as url:
        ok = rebuild_all(url, check_only=args.check_only, batch_size=args.batch_size, processes=args.processes)
    if not ok:
        print("A rebuilt read model differs from the live one: see above.", file=sys.stderr)
    return 0 if ok else 1
