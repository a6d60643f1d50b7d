"""The throughput curve as a PNG: requests per second against concurrent clients, the REST
check-ins beside the raw-insert baseline of the same run, so that a change in its shape is seen
at a glance (`bench/results/throughput-<date>.png`, linked from bench/README.md)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def write_throughput_plot(path: Path, clients: Sequence[int], rest: Sequence[float], raw: Sequence[float], *,
                          title: str = "Check-in writes: REST vs raw INSERT, same server stack",
                          rest_apart: Sequence[float] | None = None) -> Path:
    """Write the plot to `path` (its folder made if need be); returns the path. `rest_apart`:
    the check-ins with the projection runners in a process of their own, a second curve."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    if not (len(clients) == len(rest) == len(raw)) or not clients or (
            rest_apart is not None and len(rest_apart) != len(clients)):
        raise ValueError("one REST and one raw figure for each number of clients")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    try:
        ax.plot(clients, raw, marker="s", linestyle="--", label="raw asyncpg INSERT (baseline)")
        ax.plot(clients, rest, marker="o", label="REST check-in (group commit; projections in process)")
        if rest_apart is not None:
            ax.plot(clients, rest_apart, marker="^", linestyle=":", label="REST check-in, projections apart")
        for x, r, b in zip(clients, rest, raw, strict=True):
            if b:
                ax.annotate(f"{r / b:.2f}x", (x, r), textcoords="offset points", xytext=(0, -14), ha="center",
                            fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(clients), [str(c) for c in clients])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("requests / s")
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
