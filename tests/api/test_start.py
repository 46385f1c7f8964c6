"""A start that cannot bring the maps to the stored state refuses changes (issue 14, item 17).

Real maps (a maps-only program, one map frozen with BPF_MAP_FREEZE so the kernel refuses
every write to it from user space), a real store, real uvicorn over TCP.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from lb.control.model import Limits, VipSpec
from lb.control.store import Store
from tests.api.conftest import API_CONFIG, assert_problem, running_api
from tests.control.conftest import MapsOnly
from tests.control.test_store import _legacy_zone_store

pytestmark = pytest.mark.bpf

BPF_MAP_FREEZE = 22
VIP = {"protocol": "tcp", "address": "198.18.0.10", "port": 80}


@pytest.fixture(scope="module")
def frozen_reals() -> Iterator[MapsOnly]:
    """The balancer's maps with `reals` frozen (irreversible: this module's own maps)."""
    from lb.dataplane import bpf

    maps = MapsOnly(API_CONFIG)
    attr = bpf.ElemAttr(map_fd=maps.maps["reals"].map_fd)
    bpf.bpf(BPF_MAP_FREEZE, attr, "BPF_MAP_FREEZE")
    yield maps
    maps.close()


def test_a_start_that_cannot_reconcile_refuses_writes_with_503(
    frozen_reals: MapsOnly, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(tmp_path, Limits.from_config(API_CONFIG))
    store.commit([VipSpec.model_validate({**VIP, "backends": [{"address": "198.18.1.2"}]})])
    store.close()
    caplog.set_level(logging.ERROR, logger="lb.control.facade")
    with running_api(frozen_reals, tmp_path) as api:
        assert api.control.start_error is not None
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(said) == 1 and "at start" in said[0] and "refused (503)" in said[0], said
        ready = api.anon.get("/readyz")
        assert ready.status_code == 503 and "not in step" in ready.json()["reasons"][0]
        # Every change is refused, not stored and acknowledged; reads still answer.
        for r in (
            api.client.post("/v1/vips", json={**VIP, "port": 81}),
            api.client.delete("/v1/vips/tcp:198.18.0.10:80"),
            api.client.post("/v1/vips/tcp:198.18.0.10:80/backends", json={"address": "198.18.1.3"}),
            api.client.put("/v1/state", json={"vips": []}),
        ):
            body = assert_problem(r, 503, "not-applied")
            assert "changes are refused" in body["detail"] and "restart" in body["detail"]
        assert api.control.generation == 1
        assert [v.id for v in api.control.list_vips()] == ["tcp:198.18.0.10:80"]
        assert api.client.get("/v1/vips/tcp:198.18.0.10:80").status_code == 200


def test_a_store_with_zone_id_twins_starts_and_deletes_work(
    api_balancer: object, tmp_path: Path
) -> None:
    from tests.control.test_store import LIMITS

    assert LIMITS.max_vips <= API_CONFIG.max_vips
    _legacy_zone_store(tmp_path / "legacy")
    with running_api(api_balancer, tmp_path / "legacy") as api:
        assert api.control.in_sync and api.control.start_error is None
        assert api.anon.get("/readyz").status_code == 200
        ids = [v["id"] for v in api.client.get("/v1/vips").json()["data"]]
        assert ids == ["tcp:[2001:db8::10]:80", "tcp:[2001:db8::10]:81", "tcp:[2001:db8::20]:80"]
        for vid in ids:
            r = api.client.delete(f"/v1/vips/{vid}")
            assert r.status_code == 204, r.text
        assert api.client.get("/v1/vips").json()["count"] == 0
    # A restart finds the same (empty) state and reconciles.
    with running_api(api_balancer, tmp_path / "legacy") as api:
        assert api.control.in_sync and api.client.get("/v1/vips").json()["count"] == 0
