"""`lbctl verify [--repair]`: compare the maps with the stored state, rewrite what drifted."""

from __future__ import annotations

import argparse
from typing import Any

from lbctl.base import EXIT_DRIFT, EXIT_OK, Leaf
from lbctl.client import client_from
from lbctl.output import emit, table


def verify_text(r: Any) -> str:
    """The outcome of a verify as lines for people."""
    gen = r["generation"]
    if not r["drifts"]:
        return f"the maps match stored generation {gen}"
    rows = [[d["map"], d["key"], d["expected"], d["actual"]] for d in r["drifts"]]
    head = (f"{len(rows)} map entries differed from stored generation {gen}; "
            + ("rewritten" if r["repaired"] else "run `lbctl verify --repair` to rewrite them"))
    return head + "\n\n" + table(["MAP", "KEY", "EXPECTED", "ACTUAL"], rows)


def cmd_verify(args: argparse.Namespace) -> int:
    """lbctl verify [--repair]: exits 5 when drift was found and left as it is."""
    client = client_from(args)
    if args.repair:
        _, _, r = client.request("POST", "/v1/verify")
    else:
        r = client.get("/v1/verify")
    emit(args, r, verify_text)
    return EXIT_OK if r["in_sync"] else EXIT_DRIFT


def add_commands(sub: Any, leaf: Leaf) -> None:
    """`lbctl verify`."""
    sp = leaf(sub, "verify", cmd_verify,
              "compare the maps with the stored state (drift behind the daemon's back)")
    sp.add_argument("--repair", action="store_true",
                    help="rewrite every entry that differs (needs the token)")
