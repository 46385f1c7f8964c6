"""The fleet through the REST API and lbctl: two daemons on one etcd, and etcd going away."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from lb.config import EtcdConfig
from lb.fleet.members import EtcdCluster
from lb.fleet.node import FleetNode
from tests.api.conftest import Served, assert_problem, running_api
from tests.api.test_cli import lbctl, ok
from tests.fleet.conftest import wait_for

VIP_BODY = {"protocol": "tcp", "address": "198.18.0.10", "port": 80,
            "backends": [{"address": "198.18.1.1"}, {"address": "198.18.1.2"}]}
VIP = "tcp:198.18.0.10:80"


@pytest.fixture
def two_hosts(tmp_path: Path, etcd: EtcdCluster) -> Iterator[list[Served]]:
    """Two API daemons (no data plane) sharing one etcd."""
    with ExitStack() as stack:
        served = []
        for i in range(2):
            node = FleetNode(tmp_path / f"lb{i}", EtcdConfig(
                endpoints=etcd.endpoints, host_name=f"lb{i}", timeout_s=1.0, lease_ttl_s=3))
            stack.callback(node.close)
            served.append(stack.enter_context(
                running_api(None, tmp_path / f"lb{i}", attached=True, fleet_node=node)))
        yield served


def test_change_through_one_api_is_served_by_the_other(two_hosts: list[Served]) -> None:
    a, b = two_hosts
    r = a.client.post("/v1/vips", json=VIP_BODY)
    assert r.status_code == 201, r.text
    wait_for(lambda: b.client.get(f"/v1/vips/{VIP}").status_code == 200, 10, "the VIP on B")
    # The generation (ETag) is one number for the fleet: B takes A's ETag as If-Match.
    etag = a.client.get("/v1/state").headers["ETag"]
    assert b.client.get("/v1/state").headers["ETag"] == etag
    state = b.client.get("/v1/state").json()
    state["vips"][0]["backends"].append({"address": "198.18.1.3"})
    body = {"vips": state["vips"]}
    dry = b.client.put("/v1/state", json=body, params={"dry_run": "true"},
                       headers={"If-Match": etag})
    assert dry.status_code == 200 and dry.json()["dry_run"], dry.text
    r = b.client.put("/v1/state", json=body, headers={"If-Match": etag})
    assert r.status_code == 200, r.text
    # A's old ETag is now stale on A as well.
    r = a.client.put("/v1/state", json=body, headers={"If-Match": etag})
    assert_problem(r, 412, "precondition-failed")
    wait_for(lambda: len(a.client.get(f"/v1/vips/{VIP}").json()["backends"]) == 3, 10,
             "B's change on A")
    # Hosts publish their status every 0.1 s: judge one view in which both published the
    # latest revision ("lagging" alone compares them with each other: both may be behind).
    seen: list[dict[str, Any]] = []

    def settled() -> bool:
        seen[:] = [b.client.get("/v1/fleet").json()]
        return not seen[0]["lagging"] and all(
            h["lag"]["revisions"] == 0 for h in seen[0]["hosts"])

    wait_for(settled, 10, "no host lagging")
    fleet = seen[0]
    assert [h["host"] for h in fleet["hosts"]] == ["lb0", "lb1"], fleet
    assert fleet["divergent"] == [], fleet
    fps = {h["host"]: h["fingerprints"][VIP] for h in fleet["hosts"]}
    assert fps["lb0"] == fps["lb1"], fleet
    # Two changes one after the other: no host lost a race, so none took the write turn.
    assert [h["write_turns"] for h in fleet["hosts"]] == [0, 0], fleet
    out = ok(lbctl(b, "fleet", "status"))
    assert "lb0" in out and "lb1" in out and "2 hosts agree" in out, out
    assert "TURNS" in out.splitlines()[1], out
    assert ok(lbctl(a, "-o", "json", "fleet", "status")).startswith("{")


def test_etcd_down_writes_get_503_reads_and_readyz_say_degraded(
    two_hosts: list[Served], etcd: EtcdCluster
) -> None:
    a, b = two_hosts
    assert a.client.post("/v1/vips", json=VIP_BODY).status_code == 201
    etcd.members[0].kill()
    r = a.client.post(f"/v1/vips/{VIP}/backends", json={"address": "198.18.1.9"})
    body = assert_problem(r, 503, "store-unavailable")
    assert "etcd at" in body["detail"], body
    assert a.client.get(f"/v1/vips/{VIP}").status_code == 200  # reads go on
    ready = a.anon.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["store"] == "etcd" and ready.json()["degraded"], ready.json()
    etcd.members[0].start()
    etcd.wait_healthy()
    wait_for(lambda: a.client.post(f"/v1/vips/{VIP}/backends",
                                   json={"address": "198.18.1.9"}).status_code == 201,
             15, "writes once etcd is back")
    wait_for(lambda: len(b.client.get(f"/v1/vips/{VIP}").json()["backends"]) == 3, 10,
             "the change on B")
    assert not a.anon.get("/readyz").json()["degraded"]
