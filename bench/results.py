"""The dated results file, `bench/results/<date>.json`: one a day, each benchmark's runs appended
under its own key (the rebuild benchmark's `write_results` does the same under "rebuild")."""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


def results_path(directory: Path) -> Path:
    return directory / f"{datetime.now(UTC):%Y-%m-%d}.json"


def append_run(directory: Path, key: str, command: str, figures: dict[str, Any],
               load: dict[str, list[float]]) -> Path:
    """Add one run of benchmark `key` (its figures, the command, the machine, its load averages
    before and after) to today's file."""
    directory.mkdir(parents=True, exist_ok=True)
    path = results_path(directory)
    document: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    document.setdefault(key, []).append({
        "recordedAt": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": {"cpus": cpus(), "python": platform.python_version(), "platform": platform.platform()},
        "loadAverage": load,
        **figures,
    })
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
