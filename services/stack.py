"""Starts the whole Tandem stack: `make run` and `make test` call this.

    python -m services.stack run    PostgreSQL (embedded unless DATABASE_URL is set), goals on
                                    8001, metrics on 8002, gateway on 8000 (each with its
                                    projection runners), the demo organisation when the database
                                    is empty; serves until Ctrl-C, then stops everything,
                                    PostgreSQL included.
    python -m services.stack test   PostgreSQL the same way, then the whole test suite.

The services are separate processes, as in production; their logs go to `.data/logs/`.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from services.common import devdb
from services.common.settings import DATA_DIR, REPO_ROOT

DEFAULT_PG_PORT = 54329


def _terminate_with_parent() -> None:
    """In the child, before exec: ask Linux to send SIGTERM when the stack process dies, so
    that a killed `make run` (or test run) never leaves services holding connections."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass
class ServiceProcess:
    name: str
    module: str
    port: int
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Stack:
    """The three services as child processes, pointed at one database."""

    database_url: str
    gateway_port: int = 8000
    goals_port: int = 8001
    metrics_port: int = 8002
    log_dir: Path = DATA_DIR / "logs"
    extra_env: dict[str, str] = field(default_factory=dict)
    services: list[ServiceProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.services = [
            ServiceProcess("goals", "services.goals.main", self.goals_port),
            ServiceProcess("metrics", "services.metrics.main", self.metrics_port),
            ServiceProcess("gateway", "services.gateway.main", self.gateway_port),
        ]

    def url(self, name: str) -> str:
        return next(s.url for s in self.services if s.name == name)

    def env(self, service: ServiceProcess) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "DATABASE_URL": self.database_url,
            "TANDEM_PORT": str(service.port),
            "TANDEM_GOALS_URL": self.url("goals"),
            "TANDEM_METRICS_URL": self.url("metrics"),
            "TANDEM_TELEMETRY_CONSOLE_PATH": str(self.log_dir / f"{service.name}-spans.jsonl"),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 90) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for service in self.services:
            service.log_path = self.log_dir / f"{service.name}.log"
            log = service.log_path.open("ab")
            service.process = subprocess.Popen(
                [sys.executable, "-m", service.module], cwd=REPO_ROOT, env=self.env(service),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_terminate_with_parent,
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(self.services)
        with httpx.Client(timeout=2) as client:
            while pending:
                for service in list(pending):
                    assert service.process is not None
                    if service.process.poll() is not None:
                        raise RuntimeError(f"{service.name} exited during start-up:\n{self._tail(service)}")
                    try:
                        if client.get(service.url + "/readyz").status_code == 200:
                            pending.remove(service)
                    except httpx.TransportError:
                        pass
                if pending and time.monotonic() > deadline:
                    names = ", ".join(s.name for s in pending)
                    raise RuntimeError(f"not ready after {timeout:.0f}s: {names}\n"
                                       + "\n".join(self._tail(s) for s in pending))
                if pending:
                    time.sleep(0.2)

    @staticmethod
    def _tail(service: ServiceProcess, lines: int = 30) -> str:
        if service.log_path is None or not service.log_path.exists():
            return ""
        text = service.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {service.log_path} ---\n" + "\n".join(text)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (uvicorn shuts down gracefully: requests finish, projections stop), then
        SIGKILL for anything still there after the timeout."""
        for service in reversed(self.services):
            if service.process is not None and service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for service in self.services:
            if service.process is None:
                continue
            try:
                service.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait()


def resolve_database(data_dir: Path, pg_port: int) -> tuple[str, bool]:
    """DATABASE_URL when set; else the embedded server. Returns the URL and whether this call
    started a server (which it then has to stop)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url, False
    print(f"Starting embedded PostgreSQL (data in {data_dir}, port {pg_port}) ...", flush=True)
    return devdb.start(data_dir, pg_port)


class StopSignal:
    """Ctrl-C (SIGINT) and SIGTERM: during start-up they abort it (cleaning up what started);
    once the stack is serving they ask it to stop, however early in the banner they arrive."""

    def __init__(self) -> None:
        self.serving = False
        self.requested = threading.Event()
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if not self.serving:
            raise KeyboardInterrupt
        self.requested.set()

    def wait(self) -> None:
        while not self.requested.wait(0.5):
            pass


def run(args: argparse.Namespace) -> int:
    from services import demo
    from services.common.auth import dev_secret, mint_token

    stop = StopSignal()
    data_dir = Path(args.data_dir).resolve()
    database_url, started_db = resolve_database(data_dir / "postgres", args.pg_port)
    stack = Stack(database_url, args.gateway_port, args.goals_port, args.metrics_port,
                  log_dir=data_dir / "logs")
    try:
        print("Starting goals, metrics and gateway ...", flush=True)
        stack.start()
        secret = os.environ.get("TANDEM_JWT_SECRET") or dev_secret()
        token = mint_token(secret=secret, role="admin", subject="demo-loader")
        loaded = demo.load_if_empty(database_url, stack.url("goals"), stack.url("metrics"), stack.url("gateway"), token)
        print("Demo organisation loaded." if loaded else "Database already has data: demo not loaded.")
        stop.serving = True
        print(f"""
Tandem is running.
  GraphQL (GraphiQL in a browser)  {stack.url('gateway')}/graphql
  goals REST                       {stack.url('goals')}/docs
  metrics REST                     {stack.url('metrics')}/docs
  logs                             {stack.log_dir}
  a token for requests             make token ROLE=admin
Press Ctrl-C to stop.""", flush=True)
        if not args.once:
            stop.wait()
        print("\nStopping ...", flush=True)
        return 0
    except KeyboardInterrupt:
        print("\nInterrupted during start-up; stopping ...", flush=True)
        return 130
    finally:
        stop.serving = True  # a second Ctrl-C must not cut the clean-up short
        stack.stop()
        if started_db:
            devdb.stop(data_dir / "postgres")
            print("Stopped (PostgreSQL too).", flush=True)
        else:
            print("Stopped.", flush=True)


def test(args: argparse.Namespace, pytest_args: list[str]) -> int:
    data_dir = Path(args.data_dir).resolve()
    database_url, started_db = resolve_database(data_dir / "postgres", args.pg_port)
    env = dict(os.environ, DATABASE_URL=database_url)
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", *pytest_args], cwd=REPO_ROOT, env=env)
    finally:
        if started_db:
            devdb.stop(data_dir / "postgres")
    if result.returncode == 5:
        print("No test ran: that is a failure.", file=sys.stderr)
        return 1
    return result.returncode


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, pytest_args = argv[:i], [a for a in argv[i + 1:] if a]
    parser = argparse.ArgumentParser(prog="python -m services.stack")
    parser.add_argument("command", choices=["run", "test"])
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--pg-port", type=int, default=int(os.environ.get("TANDEM_PG_PORT", DEFAULT_PG_PORT)))
    parser.add_argument("--gateway-port", type=int, default=8000)
    parser.add_argument("--goals-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--once", action="store_true", help="start, load the demo, then stop (a smoke check)")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args)
    return test(args, pytest_args)


if __name__ == "__main__":
    sys.exit(main())
