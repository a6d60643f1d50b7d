"""`make run`'s start-up path, from an empty data directory, on the embedded PostgreSQL.

It runs `python -m services.stack run` (what `make run` runs) as a subprocess with no
DATABASE_URL, waits for it to say it is running, reads the demo organisation over GraphQL,
stops it with Ctrl-C (SIGINT) and checks that everything stopped, PostgreSQL included. A second
run on the same data directory keeps the first one's data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from services.common import devdb
from services.common.settings import REPO_ROOT
from tests.conftest import free_port


def start_stack(data_dir: Path, ports: dict[str, int]) -> tuple[subprocess.Popen[str], list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    process = subprocess.Popen(
        [sys.executable, "-m", "services.stack", "run", "--data-dir", str(data_dir),
         "--pg-port", str(ports["pg"]), "--gateway-port", str(ports["gateway"]),
         "--goals-port", str(ports["goals"]), "--metrics-port", str(ports["metrics"])],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:  # read until the stack says it is up (or the process ends)
        lines.append(line)
        if line.startswith("Press Ctrl-C to stop."):
            break
    assert process.poll() is None, "".join(lines)
    return process, lines


def stop_stack(process: subprocess.Popen[str], lines: list[str]) -> None:
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    lines.append(rest)
    assert process.returncode == 0, "".join(lines)
    assert "Stopped (PostgreSQL too)." in rest


def test_make_run_from_an_empty_data_directory(tmp_path: Path, token: Callable[..., str]) -> None:
    data_dir = tmp_path / "data"
    ports = {"pg": free_port(), "gateway": free_port(), "goals": free_port(), "metrics": free_port()}
    process, lines = start_stack(data_dir, ports)
    try:
        assert "Demo organisation loaded.\n" in lines, "".join(lines)
        assert f"http://127.0.0.1:{ports['gateway']}/graphql" in "".join(lines)
        r = httpx.post(f"http://127.0.0.1:{ports['gateway']}/graphql",
                       json={"query": "{ organization { name children { name } } }"},
                       headers={"Authorization": f"Bearer {token()}"}, timeout=30)
        assert r.status_code == 200, r.text
        org = r.json()["data"]["organization"]
        assert org["name"] == "Acme"
        assert {c["name"] for c in org["children"]} == {"Sales", "Customer Support", "People"}
        assert httpx.get(f"http://127.0.0.1:{ports['gateway']}/graphql", headers={"Accept": "text/html"}).status_code == 200
    finally:
        if process.poll() is None:
            stop_stack(process, lines)
    assert not devdb.is_running(data_dir / "postgres")

    # A second run keeps the data of the first and does not load the demo twice.
    process, lines = start_stack(data_dir, ports)
    try:
        assert "Database already has data: demo not loaded.\n" in lines, "".join(lines)
    finally:
        stop_stack(process, lines)
    assert not devdb.is_running(data_dir / "postgres")
