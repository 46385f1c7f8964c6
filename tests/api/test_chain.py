"""The chain's routes on a daemon that runs no data plane of its own (the lab's e2e test,
tests/e2e/test_chain.py, drives them on a real one)."""

from __future__ import annotations

import pytest

from tests.api.conftest import Served, assert_problem

pytestmark = pytest.mark.bpf


def test_chain_without_a_host_data_plane_is_409(api: Served) -> None:
    assert_problem(api.client.get("/v1/chain"), 409, "conflict", field="interface")
    r = api.client.post("/v1/chain", json={"slot": 0, "pin": "/sys/fs/bpf/f"})
    assert_problem(r, 409, "conflict", field="interface")
    assert_problem(api.client.delete("/v1/chain/0"), 409, "conflict", field="interface")


@pytest.mark.parametrize("body", [{"slot": -1, "pin": "/sys/fs/bpf/f"}, {"slot": 0},
                                  {"slot": 0, "pin": ""}, {"slot": 0, "pin": "/p", "x": 1}],
                         ids=["negative slot", "no pin", "empty pin", "unknown field"])  # fmt: skip
def test_add_filter_with_a_bad_body_is_422(api: Served, body: dict[str, object]) -> None:
    assert_problem(api.client.post("/v1/chain", json=body), 422, "invalid-input")
