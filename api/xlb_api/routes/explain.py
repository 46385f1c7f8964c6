"""Flow explain: which backend a flow goes to and why, from the live program."""

from __future__ import annotations

import ipaddress
from typing import Annotated

from fastapi import APIRouter, Query

from lb.control.model import Protocol, parse_address
from lb.dataplane.flowhash import Flow5
from lb.errors import InvalidInput
from xlb_api.deps import ExplainerDep, ReadAuth
from xlb_api.problems import problem_responses
from xlb_api.schemas.explain import ExplanationPublic, FlowPublic

router = APIRouter(
    prefix="/v1/explain", tags=["explain"], responses=problem_responses(401, 422, 503)
)


def _address(text: str, field: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # The same parser as VIPs and backends: ASCII only, no IPv6 zone id.
    return parse_address(text.strip().strip("[]"), field=field)


@router.get("", dependencies=[ReadAuth])
def explain_flow(
    explainer: ExplainerDep,
    protocol: Annotated[Protocol, Query(description="tcp or udp")],
    src: Annotated[str, Query(description="client address", examples=["198.18.2.1"])],
    sport: Annotated[int, Query(ge=0, le=65535, description="client port")],
    dst: Annotated[str, Query(description="VIP address", examples=["198.18.0.10"])],
    dport: Annotated[int, Query(ge=0, le=65535, description="VIP port")],
) -> ExplanationPublic:
    """Run one packet of the flow through the live program (BPF_PROG_TEST_RUN) and explain."""
    source, destination = _address(src, "src"), _address(dst, "dst")
    if source.version != destination.version:
        raise InvalidInput(
            f"dst: {destination} is IPv{destination.version} but src {source} is "
            f"IPv{source.version}; a flow has one address family",
            field="dst",
        )
    e = explainer.explain(Flow5.of(source, destination, sport, dport, protocol))
    return ExplanationPublic(
        flow=FlowPublic(
            protocol=protocol,
            source=str(source),
            source_port=sport,
            destination=str(destination),
            destination_port=dport,
        ),
        verdict=e.verdict,
        reason=e.reason,
        backend=e.backend,
        vip_id=e.vip_id,
        in_conn_table=e.in_conn_table,
        conn_table_backend=e.conn_table_backend,
        encap=e.encap,
        outer_source=e.outer_source,
        counters=e.counters,
        second_hop=e.second_hop,
    )
