"""The write benchmarks' own pieces: the baseline route mounted on the real goals app (and only
there), the closed-loop load, the results file and the throughput plot. Figures are never
asserted: these are the benchmark's plumbing, not timings."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest

from bench.load import closed_loop, create_logs, percentile
from bench.plot import write_throughput_plot
from bench.results import append_run
from bench.serve import RAW_TABLE, RAW_TABLE_DDL, mount_bench_routes
from tests.conftest import serve_in_process


async def test_the_raw_insert_route_is_mounted_on_the_real_app_and_authenticates_like_the_others(
        auth: Callable[..., dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    from services.goals.api import create_app

    # The route needs neither the runners nor the webhook worker: a quicker start and stop.
    monkeypatch.setenv("TANDEM_RUN_PROJECTIONS", "false")
    monkeypatch.setenv("TANDEM_RUN_WEBHOOK_WORKER", "false")
    url = os.environ["DATABASE_URL"]
    create_logs(url)
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in RAW_TABLE_DDL:
            conn.execute(statement)
        before = conn.execute(f"SELECT count(*) FROM {RAW_TABLE}").fetchone()[0]
    production = create_app()
    assert not [r for r in production.routes if getattr(r, "path", "").startswith("/bench")]

    app = mount_bench_routes(create_app())
    kr = "5f0c6a57-33a4-4d4b-9d0e-6f0f3c1c8a01"
    body = {"value": 42.5, "confidence": 7, "note": "bench", "validOn": "2026-01-05"}
    async for client in serve_in_process(app):
        r = await client.post(f"/bench/key-results/{kr}/raw-insert", json=body, headers=auth())
        assert r.status_code == 201, r.text
        assert (await client.post(f"/bench/key-results/{kr}/raw-insert", json=body)).status_code == 401
        r = await client.post(f"/bench/key-results/{kr}/raw-insert", json=body, headers=auth("auditor"))
        assert r.status_code == 403, r.text
        r = await client.post(f"/bench/key-results/{kr}/raw-insert", json={"value": "x"}, headers=auth())
        assert r.status_code == 422, r.text  # the check-in's own body model
        counters = (await client.get("/bench/group-commit", headers=auth())).json()
        assert set(counters) == {"batches", "saves"} and counters["saves"] >= counters["batches"] >= 0
        # The real routes are all still there beside it.
        assert (await client.get("/v1/units", headers=auth())).status_code == 200
    with psycopg.connect(url) as conn:
        rows = conn.execute(f"SELECT key_result_id::text, value, confidence, note, valid_on::text, actor "
                            f"FROM {RAW_TABLE} ORDER BY id DESC LIMIT 1").fetchall()
        after = conn.execute(f"SELECT count(*) FROM {RAW_TABLE}").fetchone()[0]
    assert after == before + 1
    assert rows == [(kr, 42.5, 7, "bench", "2026-01-05", "tester")]


async def test_the_closed_loop_counts_answers_latencies_and_refuses_a_broken_setup() -> None:
    seen: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.001)  # an answer takes a moment: the workers take turns
        seen.append(request.url.path)
        return httpx.Response(201 if "ok" in request.url.path else 500, text="no")

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://bench") as client:
        async def send(c: httpx.AsyncClient, worker: int, i: int) -> httpx.Response:
            return await c.post(f"/ok/{worker}/{i}")

        result = await closed_loop(client, send, 3, 0.2, warmup=0.05)
        assert result.requests > 3 and result.errors == 0 and result.statuses == {201: result.requests}
        assert {p.split("/")[2] for p in seen} == {"0", "1", "2"}
        assert 0 < result.p50_ms <= result.p95_ms and result.per_second > 0
        summary = result.summary()
        assert summary["clients"] == 3 and summary["requests"] == result.requests

        async def broken(c: httpx.AsyncClient, worker: int, i: int) -> httpx.Response:
            return await c.post("/fails")

        with pytest.raises(RuntimeError, match="500 /fails"):
            await closed_loop(client, broken, 2, 0.05)
    assert percentile([], 95) == 0.0
    assert percentile([float(i) for i in range(1, 101)], 95) == 95.0


def test_results_are_appended_and_the_throughput_plot_is_a_png(tmp_path: Path) -> None:
    for n in (1, 2):
        path = append_run(tmp_path, "writes", f"python -m bench --only writes # {n}", {"ratio": n / 4},
                          {"before": [1.0, 1.0, 1.0], "after": [2.0, 2.0, 2.0]})
    document = json.loads(path.read_text())
    assert [run["ratio"] for run in document["writes"]] == [0.25, 0.5]
    assert document["writes"][0]["machine"]["cpus"] >= 1 and document["writes"][1]["loadAverage"]["after"][0] == 2.0

    plot = write_throughput_plot(tmp_path / "plots" / "throughput-test.png", [1, 8, 32], [90.0, 300.0, 650.0],
                                 [400.0, 900.0, 1000.0])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    with pytest.raises(ValueError):
        write_throughput_plot(tmp_path / "bad.png", [1, 8], [1.0], [1.0, 2.0])


def test_both_configurations_are_tabled_plotted_and_recorded(tmp_path: Path) -> None:
    """The writes benchmark reports the runners apart beside the headline (runners in process):
    rows of their own, their raw baseline and ratio, and the runners' process's CPU."""
    from bench.load import LoadResult
    from bench.writes import APART, IN_PROCESS, WritesResult

    def load(clients: int, per_second: float, cpu_ms: float) -> LoadResult:
        result = LoadResult(clients, 1.0, latencies=[0.01] * int(per_second))
        result.server_cpu = cpu_ms * result.requests / 1000
        return result

    gc = {"batches": 10, "saves": 40, "averageBatch": 4.0}
    headline = WritesResult([1, 32], 128, raw=[load(1, 100, 2.0), load(32, 400, 2.0)],
                            rest=[load(1, 50, 6.0), load(32, 150, 5.0)], group_commit=[gc, gc],
                            catch_up_seconds=[0.0, 0.0])
    headline.apart = WritesResult([1, 32], 128, APART, raw=[load(1, 120, 2.0), load(32, 420, 2.0)],
                                  rest=[load(1, 60, 5.0), load(32, 210, 4.0)], group_commit=[gc, gc],
                                  catch_up_seconds=[0.0, 0.0], runner_cpu=[0.06, 0.21])
    rows = headline.rows_table()
    assert [r[0] for r in rows[1:]] == [IN_PROCESS, IN_PROCESS, APART, APART]
    assert rows[2][6] == "0.38x" and rows[4][6] == "0.50x"  # each ratio against its own configuration's raw route
    assert rows[2][-1] == "(in the API's)" and rows[4][-1] == "1.00 ms"  # 0.21 s of runner CPU over 210 check-ins
    document = json.loads(json.dumps(headline.to_json()))
    assert document["configuration"] == IN_PROCESS and "runnerCpuMsPerCheckIn" not in document["byClients"][0]
    apart = document["runnersApart"]
    assert apart["configuration"] == APART and apart["byClients"][1]["ratio"] == pytest.approx(0.5)
    assert apart["byClients"][1]["runnerCpuMsPerCheckIn"] == pytest.approx(1.0)

    plot = write_throughput_plot(tmp_path / "both.png", [1, 32], [50.0, 150.0], [100.0, 400.0],
                                 rest_apart=[60.0, 210.0])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        write_throughput_plot(tmp_path / "bad.png", [1, 32], [50.0, 150.0], [100.0, 400.0], rest_apart=[60.0])


def test_the_runners_apart_are_served_in_a_process_of_their_own() -> None:
    """`served(..., runners_only=True)`: `python -m services.goals.main --projections-only`, ready
    on its port, with the goals projection's lock; the API process beside it runs none."""
    from bench.load import served

    url = os.environ["DATABASE_URL"]
    create_logs(url)
    with served("goals", url, extra_env={"TANDEM_RUN_PROJECTIONS": "false", "TANDEM_RUN_WEBHOOK_WORKER": "false"}) \
            as api, served("goals", url, runners_only=True) as runners:
        assert api.pid != runners.pid
        ready = httpx.get(runners.url + "/readyz", timeout=10).json()
        assert ready["status"] == "ready" and any(k.startswith("projection:") for k in ready["checks"])
        assert httpx.get(runners.url + "/v1/units", timeout=10).status_code == 404  # no API there
        api_checks = httpx.get(api.url + "/readyz", timeout=10).json()["checks"]
        projections = {v for k, v in api_checks.items() if k.startswith("projection:")}
        assert projections == {"runs elsewhere"}, api_checks
