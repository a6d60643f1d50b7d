"""`python -m services.audit verify` (`make verify`): every service's event log against its hash
chain. One line per log: ok with its record count and head hash (keep that hash: it is what a
later run is compared with), or the first altered, deleted, reordered or unchained record.
Exits 1 when any log has a problem."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

import psycopg
from psycopg.sql import SQL, Identifier

from services.audit import SERVICE_LOGS
from services.audit.database import connect_database
from services.common.hashchain import ChainProblem, ChainReport, chain_table_name, verify_chain


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("verify", help="check each service's event log against its hash chain",
                                   description=__doc__)
    parser.add_argument("--log", action="append", choices=[name for name, _, _ in SERVICE_LOGS],
                        help="only this log (repeatable); default: all")
    parser.add_argument("--json", action="store_true", help="one JSON report per line")
    parser.add_argument("--expect", action="append", default=[], metavar="LOG=POSITION:HASH", type=kept_head,
                        help="a head an earlier run printed, kept outside the database: the chain must still "
                             "pass through it (catches a log rewritten and re-chained, or cut short); repeatable")
    parser.set_defaults(run=run)


def kept_head(text: str) -> tuple[str, int, str]:
    """`goals=42:ab12...` -> ("goals", 42, "ab12...")."""
    log, _, rest = text.partition("=")
    position, _, digest = rest.partition(":")
    if log not in [name for name, _, _ in SERVICE_LOGS] or not position.isdigit() or len(digest) != 64:
        raise argparse.ArgumentTypeError(f"expected LOG=POSITION:HASH (a 64-digit hex hash), got {text!r}")
    return log, int(position), digest.lower()


def check_kept_head(database_url: str, report: ChainReport, position: int, digest: str) -> ChainReport:
    """The report, or a failed one if the intact chain does not hold `digest` at `position`."""
    if not report.ok:
        return report
    schema, table = next((s, t) for name, s, t in SERVICE_LOGS if name == report.log)
    with psycopg.connect(database_url) as conn:
        row = conn.execute(SQL("SELECT chain_hash FROM {}.{} WHERE notification_id = %s").format(
            Identifier(schema), Identifier(chain_table_name(table))), (position,)).fetchone()
    if row is None:
        detail = f"the kept head {position} is no longer in the log: it was cut short or rewritten"
    elif bytes(row[0]).hex() != digest:
        detail = f"the chain no longer passes through the kept head at {position}: the log was rewritten"
    else:
        return report
    return replace(report, ok=False, problem=ChainProblem(kind="broken", position=position, detail=detail))


def verify_all(database_url: str, logs: list[str] | None = None) -> list[ChainReport]:
    return [verify_chain(database_url, schema, table, log=name)
            for name, schema, table in SERVICE_LOGS if not logs or name in logs]


def run(args: argparse.Namespace) -> int:
    with connect_database(args) as url:
        reports = verify_all(url, args.log)
        for log, position, digest in args.expect:
            reports = [check_kept_head(url, r, position, digest) if r.log == log else r for r in reports]
    for report in reports:
        print(json.dumps(report.as_dict()) if args.json else report.line(), flush=True)
    if any(not r.ok for r in reports):
        print("Tampering found: see above.", file=sys.stderr)
        return 1
    return 0
