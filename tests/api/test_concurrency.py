"""Writes are serialised: concurrent clients never lose an update, and the maps match."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.api.conftest import Served

pytestmark = pytest.mark.bpf

CLIENTS = 20
CHANGES = 50
VIPS = ["tcp:198.18.0.10:80", "tcp:198.18.0.10:443", "udp:198.18.0.11:53", "tcp:[2001:db8::10]:80"]


def _address(vip: str, c: int) -> str:
    return f"2001:db8::1:{c + 1:x}" if "[" in vip else f"198.18.1.{c + 1}"


def _client_work(url: str, auth: dict[str, str], c: int) -> list[int]:
    """Client c: add its backend, then flip weight and state; returns the statuses."""
    vip = VIPS[c % len(VIPS)]
    addr = _address(vip, c)
    path = f"/v1/vips/{vip}/backends"
    statuses: list[int] = []
    with httpx.Client(base_url=url, headers=auth, timeout=60) as http:
        statuses.append(http.post(path, json={"address": addr, "weight": 1}).status_code)
        for i in range(1, CHANGES - 1):
            body = {"weight": i + 1} if i % 5 else {"state": "draining" if i % 10 else "active"}
            statuses.append(http.patch(f"{path}/{addr}", json=body).status_code)
        # The last change sets a value unique to this client.
        last = {"weight": 100 + c, "state": "active"}
        statuses.append(http.patch(f"{path}/{addr}", json=last).status_code)
    return statuses


def test_concurrent_clients_never_lose_an_update(api: Served) -> None:
    for vip in VIPS:
        proto, rest = vip.split(":", 1)
        host, port = rest.rsplit(":", 1)
        api.client.post(
            "/v1/vips", json={"protocol": proto, "address": host.strip("[]"), "port": int(port)}
        ).raise_for_status()
    gen0 = api.control.generation
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(lambda c: _client_work(api.url, api.auth, c), range(CLIENTS)))
    assert all(s in (200, 201) for r in results for s in r), results
    assert sum(len(r) for r in results) == CLIENTS * CHANGES
    # Every change was applied exactly once: one generation each.
    assert api.control.generation == gen0 + CLIENTS * CHANGES
    state = api.client.get("/v1/state").json()
    got = {
        (v["protocol"], b["address"]): (b["weight"], b["state"])
        for v in state["vips"]
        for b in v["backends"]
    }
    for c in range(CLIENTS):
        vip = VIPS[c % len(VIPS)]
        key = (vip.split(":")[0], _address(vip, c))
        assert got[key] == (100 + c, "active"), (c, got.get(key))
    assert len(got) == CLIENTS
    assert api.control.verify() == []  # the maps hold exactly the final state
