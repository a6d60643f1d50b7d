"""`python -m services.audit <command>`: see `services/audit/__init__.py`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.audit import rebuild, transfer, verify
from services.common.settings import DATA_DIR
from services.stack import DEFAULT_PG_PORT

# One line per command: its module's `register(subparsers)` adds its parser and `run(args)`, which
# gets the database with `database.connect_database(args)` (the options below say which).
COMMANDS: list[Callable[[Any], None]] = [
    verify.register,
    rebuild.register,
    transfer.register,
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.audit", description="Audit Tandem's event logs.")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR / "postgres",
                        help="the embedded PostgreSQL's data, when DATABASE_URL is not set")
    parser.add_argument("--pg-port", type=int, default=int(os.environ.get("TANDEM_PG_PORT", DEFAULT_PG_PORT)),
                        help="its port, if this command has to start it")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="command")
    for register in COMMANDS:
        register(subparsers)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
