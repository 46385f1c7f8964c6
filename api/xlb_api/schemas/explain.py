"""Schemas of a flow explanation."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from lb.control.model import Protocol


class FlowPublic(BaseModel):
    """A flow as the client sends it."""

    protocol: Protocol
    source: str
    source_port: int
    destination: str
    destination_port: int


class ExplanationPublic(BaseModel):
    """Where the live program sends a flow, and why."""

    flow: FlowPublic
    verdict: str = Field(description="XDP verdict of the test run (XDP_TX: forwarded)")
    reason: Literal["conn_table", "ring", "not_a_vip", "no_backend", "dropped", "passed"] = Field(
        description="conn_table: the flow's entry decided; ring: its Maglev slot did"
    )
    backend: str | None = Field(description="outer destination of the forwarded frame")
    vip_id: str | None
    in_conn_table: bool = Field(description="the flow had a connection-table entry before")
    conn_table_backend: str | None
    encap: Literal["ipip", "gue"] | None
    outer_source: str | None
    counters: dict[str, int] = Field(description="global counters the run moved")
    second_hop: str | None = Field(
        None, description="second chance: the slot's previous backend the frame carries as "
        "its second hop (the first backend passes the packet on to it unless it is its own)")
