"""Property-based fuzzing of every operation in /openapi.json against the live server.

Schemathesis generates valid and invalid requests from the schema (a bounded number per
operation) and checks that no answer is a server error and that every answer (status,
content type, body, headers) is one the schema documents.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.api.conftest import Served, running_api
from xlb_api.main import create_app

pytestmark = pytest.mark.bpf

MAX_EXAMPLES = 20

# The schema the live server publishes at /openapi.json (test_openapi_is_served checks that).
# The streams are left out: they answer as long as they are asked to (tests/api/test_events.py
# covers them).
schema = schemathesis.openapi.from_dict(create_app().openapi()).exclude(
    path=["/v1/events", "/v1/capture"]
)


@pytest.fixture(scope="module")
def live(api_balancer: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One live API for the whole fuzzing run, with two VIPs to hit."""
    state: Path = tmp_path_factory.mktemp("fuzz")
    with running_api(api_balancer, state) as api:
        for port in (80, 443):
            api.client.post(
                "/v1/vips",
                json={
                    "protocol": "tcp",
                    "address": "198.18.0.10",
                    "port": port,
                    "backends": [{"address": "198.18.1.2"}],
                },
            ).raise_for_status()
        yield api


def test_openapi_is_served(live: Served) -> None:
    assert live.anon.get("/openapi.json").json() == create_app().openapi()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_server_error_and_every_answer_is_documented(case: Any, live: Served) -> None:
    # positive_data_acceptance is left out: a schema-valid request may still break a rule
    # JSON Schema cannot state (an IPv6 VIP with an IPv4 backend, octet 300 in a VIP id,
    # a full ring), and the API rightly answers 409/422 problem+json for it.
    case.call_and_validate(
        base_url=live.url,
        headers=live.auth,
        excluded_checks=[schemathesis.checks.positive_data_acceptance],
    )
