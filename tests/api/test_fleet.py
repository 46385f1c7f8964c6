"""`/v1/fleet` and `/readyz` of a host with its own SQLite state (no fleet)."""

from __future__ import annotations

from tests.api.conftest import Served, assert_problem


def test_fleet_of_a_sqlite_host_is_404(api: Served) -> None:
    assert_problem(api.client.get("/v1/fleet"), 404, "not-found", "store")
    ready = api.anon.get("/readyz").json()
    assert ready["store"] == "sqlite" and ready["degraded"] == []
