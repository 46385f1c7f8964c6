"""Types shared by the resource schemas."""

from __future__ import annotations

import ipaddress
from typing import Annotated

from fastapi import Path
from pydantic import BeforeValidator, IPvAnyAddress, IPvAnyNetwork, WithJsonSchema

from lb.control.model import zone_error


def _checked_text(v: str, what: str) -> str:
    """`v` if it is plain ASCII without a zone index (ValueError naming `what` otherwise)."""
    if "%" in v:
        raise ValueError(zone_error(v, what))
    if not v.isascii():
        raise ValueError(f"{v!r} has characters that are not ASCII")
    return v


def _text_or_address(v: object) -> object:
    # pydantic's IPvAnyAddress also takes integers (and so booleans): JSON must send text.
    if isinstance(v, str):
        return _checked_text(v, "address")
    if isinstance(v, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return v
    raise ValueError("must be an IPv4 or IPv6 address as a string")


#: An IPv4 or IPv6 address; documented as either format so clients and fuzzers see both.
Address = Annotated[
    IPvAnyAddress,
    BeforeValidator(_text_or_address),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "format": "ipv4"},
                {"type": "string", "format": "ipv6"},
            ],
            "description": "an IPv4 or IPv6 address",
        }
    ),
]


def _text_prefix(v: object) -> object:
    # As for addresses: text only (pydantic would take an integer as a /32).
    if isinstance(v, str):
        return _checked_text(v, "source prefix")
    if isinstance(v, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return v
    raise ValueError("must be an IPv4 or IPv6 prefix as a string (198.51.100.0/24)")


#: An IPv4 or IPv6 prefix without host bits (198.51.100.0/24, 2001:db8::/32); an address
#: alone is its /32 or /128.
Prefix = Annotated[
    IPvAnyNetwork,
    BeforeValidator(_text_prefix),
    WithJsonSchema(
        {"type": "string", "description": "an IPv4 or IPv6 prefix (198.51.100.0/24)",
         "examples": ["198.51.100.0/24", "2001:db8:100::/48"]}
    ),
]

#: Shape of a VIP id, for the documentation and clients; the control plane checks the rest
#: (octets, port range) and answers 422 naming `vip_id`.
VIP_ID_PATTERN = r"^(tcp|udp):([0-9]{1,3}(\.[0-9]{1,3}){3}|\[[0-9A-Fa-f:.]{2,45}\]):[0-9]{1,5}$"

VipIdPath = Annotated[
    str,
    Path(
        description="protocol:address:port, IPv6 in brackets (percent-encoding them is fine)",
        examples=["tcp:198.18.0.10:80", "udp:[2001:db8::10]:53"],
        json_schema_extra={"pattern": VIP_ID_PATTERN},
    ),
]

AddressPath = Annotated[
    str,
    Path(
        description="a backend address (any spelling of it)",
        examples=["198.18.1.2", "2001:db8::2"],
        json_schema_extra={"anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]},
    ),
]
