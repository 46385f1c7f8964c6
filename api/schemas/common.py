"""Types shared by the resource schemas."""

from __future__ import annotations

from typing import Annotated

from pydantic import IPvAnyAddress, WithJsonSchema

#: An IPv4 or IPv6 address; documented as either format so clients and fuzzers see both.
Address = Annotated[
    IPvAnyAddress,
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
