"""The demo organisation, loaded through the services' own REST APIs.

Acme, with Sales, Customer Support and People, one active cycle for the current quarter, and
the objectives, key results and KPIs that the seed material uses as examples, with a few
check-ins and measurements so that scores and KPI states are not empty.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import psycopg


def current_quarter(today: date) -> tuple[str, date, date]:
    q = (today.month - 1) // 3
    starts = date(today.year, 3 * q + 1, 1)
    ends = date(today.year + (q == 3), (3 * q + 3) % 12 + 1, 1) - timedelta(days=1)
    return f"Q{q + 1} {today.year}", starts, ends


def is_empty(database_url: str) -> bool:
    """No goal has ever been recorded: the goals event log is empty (or not created yet)."""
    with psycopg.connect(database_url) as conn:
        if conn.execute("SELECT to_regclass('goals.goals_events')").fetchone()[0] is None:
            return True
        return conn.execute("SELECT NOT EXISTS (SELECT 1 FROM goals.goals_events)").fetchone()[0]


class Loader:
    def __init__(self, goals_url: str, metrics_url: str, token: str):
        headers = {"Authorization": f"Bearer {token}", "X-Correlation-ID": "demo-load"}
        self.goals = httpx.Client(base_url=goals_url, headers=headers, timeout=30)
        self.metrics = httpx.Client(base_url=metrics_url, headers=headers, timeout=30)
        self.positions = {"goals": 0, "metrics": 0}

    def _post(self, client: httpx.Client, log: str, path: str, body: dict[str, Any]) -> str:
        r = client.post(path, json=body)
        if r.status_code >= 300:
            raise RuntimeError(f"demo load failed at POST {path}: {r.status_code} {r.text}")
        data = r.json()
        self.positions[log] = max(self.positions[log], data["position"])
        return data["id"]

    def unit(self, name: str, kind: str, parent: str | None = None) -> str:
        return self._post(self.goals, "goals", "/v1/units", {"name": name, "kind": kind, "parentId": parent})

    def person(self, name: str, unit: str, manager: str | None = None) -> str:
        email = name.lower().replace(" ", ".") + "@acme.example"
        return self._post(self.goals, "goals", "/v1/people",
                          {"name": name, "email": email, "unitId": unit, "managerId": manager,
                           "joinedOn": "2024-01-08"})

    def objective(self, title: str, unit: str, cycle: str, parent: str | None = None,
                  owner: tuple[str, str] | None = None) -> str:
        kind, owner_id = owner or ("unit", unit)
        return self._post(self.goals, "goals", "/v1/objectives", {
            "title": title, "owner": {"kind": kind, "id": owner_id}, "unitId": unit, "cycleId": cycle,
            "parentId": parent})

    def contribute(self, objective: str, to: str, weight: float) -> None:
        r = self.goals.put(f"/v1/objectives/{objective}/contributions/{to}", json={"weight": weight})
        if r.status_code >= 300:
            raise RuntimeError(f"demo load failed at contribution: {r.status_code} {r.text}")
        self.positions["goals"] = max(self.positions["goals"], r.json()["position"])

    def key_result(self, objective: str, title: str, check_ins: list[tuple[float, int, str]], **measure: Any) -> str:
        kr = self._post(self.goals, "goals", f"/v1/objectives/{objective}/key-results", {"title": title, **measure})
        for weeks_ago, (value, confidence, note) in zip(range(len(check_ins) - 1, -1, -1), check_ins, strict=False):
            self._post(self.goals, "goals", f"/v1/key-results/{kr}/check-ins", {
                "value": value, "confidence": confidence, "note": note,
                "validOn": (date.today() - timedelta(weeks=weeks_ago)).isoformat()})
        return kr

    def kpi(self, name: str, unit_id: str, measurements: list[float], *, days_ago: int = 0,
            drives: str | None = None, **definition: Any) -> str:
        """A KPI and its daily measurements, the last `days_ago` days ago; `drives` binds a key
        result to it first, so that each measurement moves that key result too."""
        kpi = self._post(self.metrics, "metrics", "/v1/kpis", {"name": name, "unitId": unit_id, **definition})
        if drives is not None:
            self._put(f"/v1/key-results/{drives}/kpi", {"kpiId": kpi})
        now = datetime.now(UTC).replace(microsecond=0) - timedelta(days=days_ago)
        # One bulk request for the KPI's measurements: each recorded as the single route would
        # record it (oldest first), in one save.
        self._post(self.metrics, "metrics", f"/v1/kpis/{kpi}/measurements/bulk", {"measurements": [
            {"value": value, "measuredAt": (now - timedelta(days=len(measurements) - 1 - i)).isoformat(),
             "source": "demo"} for i, value in enumerate(measurements)]})
        return kpi

    def _put(self, path: str, body: dict[str, Any]) -> None:
        r = self.goals.put(path, json=body)
        if r.status_code >= 300:
            raise RuntimeError(f"demo load failed at PUT {path}: {r.status_code} {r.text}")
        self.positions["goals"] = max(self.positions["goals"], r.json()["position"])

    def settle(self) -> None:
        """Run the staleness check now, then wait for goals to have followed every measurement
        (the KPI policy writes into the goals log), and take the positions that reflects."""
        r = self.metrics.post("/v1/staleness-checks", headers={"Tandem-Wait-For": f"metrics={self.positions['metrics']}"})
        r.raise_for_status()
        self.positions["metrics"] = max(self.positions["metrics"], r.json()["position"])
        r = self.goals.get("/v1/units", params={"limit": 1},
                           headers={"Tandem-Wait-For": f"metrics={self.positions['metrics']}"})
        r.raise_for_status()
        for part in r.headers["Tandem-Read-Position"].split(","):
            log, _, position = part.strip().partition("=")
            self.positions[log] = max(self.positions.get(log, 0), int(position))


def load(goals_url: str, metrics_url: str, token: str) -> dict[str, int]:
    """Create the demo organisation; returns the log positions of the last writes."""
    d = Loader(goals_url, metrics_url, token)
    today = date.today()
    name, starts, ends = current_quarter(today)
    year = d._post(d.goals, "goals", "/v1/cycles", {
        "name": str(today.year), "kind": "year", "startsOn": date(today.year, 1, 1).isoformat(),
        "endsOn": date(today.year, 12, 31).isoformat(), "status": "active"})
    cycle = d._post(d.goals, "goals", "/v1/cycles", {
        "name": name, "kind": "quarter", "parentId": year, "startsOn": starts.isoformat(),
        "endsOn": ends.isoformat(), "status": "active"})

    acme = d.unit("Acme", "company")
    sales = d.unit("Sales", "department", acme)
    support = d.unit("Customer Support", "department", acme)
    people = d.unit("People", "department", acme)
    tier1 = d.unit("Tier 1", "team", support)

    ceo = d.person("Ada Lovelace", acme)
    head_of_support = d.person("Grace Hopper", support, ceo)
    d.person("Alan Turing", tier1, head_of_support)
    d.person("Katherine Johnson", people, ceo)
    d.person("Edsger Dijkstra", sales, ceo)

    company = d.objective("Become the company customers recommend first", acme, cycle, owner=("person", ceo))

    o_support = d.objective("Deliver exceptional customer support by the end of Q3", support, cycle, company,
                            owner=("person", head_of_support))
    d.key_result(o_support, "Reduce average response time from 8 hours to under 3 hours",
                 [(6.5, 6, "New triage rota live"), (5.5, 7, "Macros for the top ten questions")],
                 kind="decrease_to", start=8, target=3, unit="h", weight=2)
    kr_csat = d.key_result(o_support, "Achieve a CSAT score of 90%+ on resolved tickets",
                           [(86, 6, "Survey on every resolved ticket")],
                           kind="increase_to", start=82, target=90, unit="%")
    d.key_result(o_support, "Train 100% of the support team in the new response protocols",
                 [(40, 8, "First cohort trained"), (60, 8, "Second cohort trained")],
                 kind="increase_to", start=0, target=100, unit="%")
    d.kpi("Average response time", support, [7.2, 6.4, 5.2], unit="hours", direction="lower_is_better",
          cadence="daily", target=3, rules=[{"kind": "above", "threshold": 6, "recovery": 5.5, "severity": "warning"}])
    # The CSAT KPI drives the CSAT key result: its last measurement (88, today) is the KR's value.
    csat = d.kpi("CSAT", support, [91, 92, 88], drives=kr_csat, unit="%", direction="higher_is_better",
                 cadence="weekly", target=90, rules=[{"kind": "below", "threshold": 90, "severity": "critical"}])
    # Nobody has counted tickets for three days: a daily KPI gone stale.
    d.kpi("Support tickets opened", support, [140, 152], days_ago=3, unit="tickets", direction="lower_is_better",
          cadence="daily", rules=[])

    o_tier1 = d.objective("Make first contact resolve the problem", tier1, cycle, o_support)
    d.key_result(o_tier1, "Keep tickets reopened within 7 days below 5%", [(4.2, 7, "Reopen rate this week")],
                 kind="stay_below", target=5, unit="%")
    d.key_result(o_tier1, "Keep first-contact resolution between 70% and 85%", [(68, 5, "Just under the band")],
                 kind="stay_within", low=70, high=85, unit="%")
    d.key_result(o_tier1, "Publish the new troubleshooting guide", [(1, 9, "Published")], kind="done")
    d.key_result(o_tier1, "Keep the customer effort score above 4 of 5", [(4.3, 8, "Post-contact survey")],
                 kind="stay_above", target=4, unit="points")

    o_people = d.objective("Improve employee engagement", people, cycle, company)
    d.key_result(o_people, "Increase eNPS from 45 to 65", [(52, 5, "Pulse survey")],
                 kind="increase_to", start=45, target=65, unit="points")
    d.key_result(o_people, "Achieve 90% participation in the annual engagement survey", [(72, 7, "Reminder sent")],
                 kind="increase_to", start=0, target=90, unit="%")
    d.key_result(o_people, "Launch two new employee well-being initiatives", [(1, 8, "Mindfulness programme live")],
                 kind="milestones", milestones=[{"title": "First initiative", "weight": 1},
                                                {"title": "Second initiative", "weight": 1}])
    d.kpi("Employee turnover rate", people, [12.5, 11.8], unit="%", direction="lower_is_better",
          cadence="monthly", target=10, rules=[{"kind": "above", "threshold": 15, "severity": "warning"}])

    o_sales = d.objective("Improve sales performance", sales, cycle, company)
    # Selling more must not cost customer satisfaction: CSAT is the objective's guardrail.
    d._put(f"/v1/objectives/{o_sales}/guardrails/{csat}", {})
    # Customers who are well looked after buy again: support counts for half in sales' roll-up.
    d.contribute(o_support, o_sales, 0.5)
    d.key_result(o_sales, "Increase total sales revenue by 25% in Q3", [(4_400_000, 6, "Two enterprise deals closed")],
                 kind="increase_to", start=4_000_000, target=5_000_000, unit="USD")
    d.kpi("Monthly sales revenue", sales, [1_350_000, 1_410_000], unit="USD", direction="higher_is_better",
          cadence="monthly", target=1_500_000, rules=[{"kind": "below", "threshold": 1_200_000, "severity": "warning"}])
    d.kpi("Average deal size", sales, [24_000, 25_500], unit="USD", direction="higher_is_better",
          cadence="monthly", target=25_000, rules=[])
    d.kpi("Conversion rate", sales, [2.4, 2.6], unit="%", direction="higher_is_better", cadence="weekly",
          target=3, rules=[{"kind": "below", "threshold": 2, "severity": "critical"}])
    d.settle()
    return d.positions


def load_if_empty(database_url: str, goals_url: str, metrics_url: str, gateway_url: str, token: str) -> bool:
    """Load the demo into an empty database and wait until the gateway shows it."""
    if not is_empty(database_url):
        return False
    positions = load(goals_url, metrics_url, token)
    wait_for = ", ".join(f"{log}={pos}" for log, pos in positions.items())
    r = httpx.post(f"{gateway_url}/graphql", json={"query": "{ organization { id } }"}, timeout=60,
                   headers={"Authorization": f"Bearer {token}", "Tandem-Wait-For": wait_for})
    r.raise_for_status()
    return True
