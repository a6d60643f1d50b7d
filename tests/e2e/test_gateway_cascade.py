"""End to end: a company -> department -> team cascade written over REST to the real goals
process, read back from the real gateway over HTTP as the alignment cascade, with every score
worked out by hand; and objectives paged over HTTP. Every read waits on the gateway's tracking
position (Tandem-Wait-For), never on a timer.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from services.stack import Stack

TODAY = datetime.now(UTC).date()

CASCADE = """query($cycle: ID) { alignment(cycle: $cycle) { ...N children { ...N children { ...N } } } }
fragment N on AlignmentNode {
  unit { id name kind } depth score band
  objectives { id title score rolledUpScore band parentId keyResults { id title current score } } }"""

PAGE = """query($unit: ID!, $first: Int!, $after: String) { unit(id: $unit) { objectives(first: $first, after: $after) {
    totalCount pageInfo { hasNextPage endCursor } edges { cursor node { title } } } } }"""


class Goals:
    """Writes to the goals process; remembers ids and the last position."""

    def __init__(self, stack: Stack, headers: dict[str, str]):
        self.client = httpx.Client(base_url=stack.url("goals"), headers=headers, timeout=30)
        self.ids: dict[str, str] = {}
        self.position = 0

    def post(self, name: str | None, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.client.post(path, json=body)
        assert r.status_code in (200, 201), r.text
        self.position = max(self.position, r.json()["position"])
        if name:
            self.ids[name] = r.json()["id"]
        return r.json()

    def put(self, path: str, body: dict[str, Any]) -> None:
        r = self.client.put(path, json=body)
        assert r.status_code == 200, r.text
        self.position = max(self.position, r.json()["position"])

    def objective(self, title: str, unit: str, parent: str | None = None) -> None:
        self.post(title, "/v1/objectives", {"title": title, "owner": {"kind": "unit", "id": self.ids[unit]},
                                            "unitId": self.ids[unit], "cycleId": self.ids["Q"],
                                            "parentId": self.ids[parent] if parent else None})

    def key_result(self, name: str, objective: str, **body: Any) -> None:
        self.post(name, f"/v1/objectives/{self.ids[objective]}/key-results", {"title": name, **body})

    def check_in(self, kr: str, value: float) -> int:
        return self.post(None, f"/v1/key-results/{self.ids[kr]}/check-ins", {"value": value, "confidence": 6})["version"]


@pytest.fixture(scope="module")
def goals(stack: Stack, auth: Callable[..., dict[str, str]]) -> Goals:
    """Globex > Product > Mobile and Web, in one active quarter around today.

    G (Globex):           g1 increase_to 0 -> 200 at 50 = 0.25.
    P (Product, -> G):    p1 decrease_to 40 -> 20 at 35 = (35 - 40) / (20 - 40) = 0.25;
                          p2 milestones 1, 1, 2 with two reached = 2 / 4 = 0.5, weight 2.
    M (Mobile, -> P):     m1 stay_above 4.5 at 4.6 = 1.0; m2 increase_to 10 -> 20 at 16 = 0.6, weight 3.
    W (Web, -> P, contributing to G with weight 2): w1 done at 0 = 0.0;
                          w2 increase_to 0 -> 50 at 40, corrected to 45 = 0.9.
    W1-W5 (Web):          no key results, aligned to nothing.
    """
    g = Goals(stack, auth("admin", "e2e-cascade"))
    g.post("Q", "/v1/cycles", {"name": "Q", "startsOn": (TODAY - timedelta(days=30)).isoformat(),
                               "endsOn": (TODAY + timedelta(days=60)).isoformat(), "status": "active"})
    g.post("Globex", "/v1/units", {"name": "Globex", "kind": "company"})
    g.post("Product", "/v1/units", {"name": "Product", "kind": "department", "parentId": g.ids["Globex"]})
    g.post("Mobile", "/v1/units", {"name": "Mobile", "kind": "team", "parentId": g.ids["Product"]})
    g.post("Web", "/v1/units", {"name": "Web", "kind": "team", "parentId": g.ids["Product"]})
    g.objective("G", "Globex")
    g.objective("P", "Product", parent="G")
    g.objective("M", "Mobile", parent="P")
    g.objective("W", "Web", parent="P")
    g.put(f"/v1/objectives/{g.ids['W']}/contributions/{g.ids['G']}", {"weight": 2})
    for i in range(1, 6):
        g.objective(f"W{i}", "Web")
    g.key_result("g1", "G", kind="increase_to", start=0, target=200)
    g.key_result("p1", "P", kind="decrease_to", start=40, target=20)
    g.key_result("p2", "P", kind="milestones", weight=2,
                 milestones=[{"title": "alpha"}, {"title": "beta"}, {"title": "launch", "weight": 2}])
    g.key_result("m1", "M", kind="stay_above", target=4.5)
    g.key_result("m2", "M", kind="increase_to", start=10, target=20, weight=3)
    g.key_result("w1", "W", kind="done")
    g.key_result("w2", "W", kind="increase_to", start=0, target=50)
    for kr, value in (("g1", 50), ("p1", 35), ("p2", 2), ("m1", 4.6), ("m2", 16), ("w1", 0)):
        g.check_in(kr, value)
    version = g.check_in("w2", 40)
    g.post(None, f"/v1/key-results/{g.ids['w2']}/check-ins/{version}/corrections", {"value": 45})
    return g


def graphql(stack: Stack, headers: dict[str, str], query: str, position: int, **variables: Any) -> dict[str, Any]:
    r = httpx.post(f"{stack.url('gateway')}/graphql", json={"query": query, "variables": variables}, timeout=30,
                   headers={**headers, "Tandem-Wait-For": f"goals={position}"})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_cascade_rolls_scores_up_from_the_teams(stack: Stack, goals: Goals,
                                                    auth: Callable[..., dict[str, str]]) -> None:
    body = graphql(stack, auth("member"), CASCADE, goals.position, cycle=goals.ids["Q"])
    assert "errors" not in body, body
    globex = body["data"]["alignment"]
    m = (1.0 * 1 + 0.6 * 3) / 4  # 0.7
    w = (0.0 + 0.9) / 2  # 0.45: the correction counts, not the 40 it corrects
    p_own = (0.25 * 1 + 0.5 * 2) / 3  # 0.41667
    p = (0.25 * 1 + 0.5 * 2 + m + w) / 5  # KRs by weight, M and W at 1 each: 2.4 / 5 = 0.48
    g = (0.25 + p + w * 2) / 4  # g1, P at 1, W contributing at 2: 1.63 / 4 = 0.4075

    assert (globex["unit"]["name"], globex["unit"]["kind"], globex["depth"]) == ("Globex", "company", 0)
    [g_objective] = globex["objectives"]
    assert (g_objective["title"], g_objective["score"], g_objective["rolledUpScore"], g_objective["band"]) == (
        "G", pytest.approx(0.25), pytest.approx(g), "red")
    assert (globex["score"], globex["band"]) == (pytest.approx(0.4075), "yellow")
    assert g_objective["keyResults"] == [{"id": goals.ids["g1"], "title": "g1", "current": 50,
                                          "score": pytest.approx(0.25)}]

    [product] = globex["children"]
    assert (product["unit"]["name"], product["depth"], product["score"], product["band"]) == (
        "Product", 1, pytest.approx(0.48), "yellow")
    [p_objective] = product["objectives"]
    assert (p_objective["score"], p_objective["rolledUpScore"], p_objective["parentId"]) == (
        pytest.approx(p_own), pytest.approx(p), goals.ids["G"])

    mobile, web = product["children"]
    assert (mobile["unit"]["name"], mobile["depth"], mobile["score"], mobile["band"]) == (
        "Mobile", 2, pytest.approx(m), "green")
    assert [(k["title"], k["current"], k["score"]) for k in mobile["objectives"][0]["keyResults"]] == [
        ("m1", 4.6, 1.0), ("m2", 16, pytest.approx(0.6))]
    assert (web["unit"]["name"], web["score"], web["band"]) == ("Web", pytest.approx(w), "yellow")
    assert [o["title"] for o in web["objectives"]] == ["W", "W1", "W2", "W3", "W4", "W5"]
    assert [(k["title"], k["current"]) for k in web["objectives"][0]["keyResults"]] == [("w1", 0), ("w2", 45)]


def test_objectives_page_over_http(stack: Stack, goals: Goals, auth: Callable[..., dict[str, str]]) -> None:
    first = graphql(stack, auth("auditor"), PAGE, goals.position, unit=goals.ids["Web"], first=4)
    assert "errors" not in first, first
    page = first["data"]["unit"]["objectives"]
    assert ([e["node"]["title"] for e in page["edges"]], page["totalCount"], page["pageInfo"]["hasNextPage"]) == (
        ["W", "W1", "W2", "W3"], 6, True)
    second = graphql(stack, auth("auditor"), PAGE, goals.position, unit=goals.ids["Web"], first=4,
                     after=page["pageInfo"]["endCursor"])["data"]["unit"]["objectives"]
    assert ([e["node"]["title"] for e in second["edges"]], second["pageInfo"]["hasNextPage"]) == (["W4", "W5"], False)
    assert second["pageInfo"]["endCursor"] == second["edges"][-1]["cursor"]

    for variables, message in (({"first": 0}, "first must be from 1 to 100"),
                               ({"first": 2, "after": "not-a-cursor"}, "after is not a cursor this API gave out")):
        bad = graphql(stack, auth(), PAGE, goals.position, unit=goals.ids["Web"], **variables)
        assert [e["message"] for e in bad["errors"]] == [message]
        assert bad["data"]["unit"] is None
