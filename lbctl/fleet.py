"""`lbctl fleet status`: every LB host sharing this host's state, lags, divergent rings."""

from __future__ import annotations

import argparse
from typing import Any

from lbctl.base import EXIT_OK, Leaf, Parser
from lbctl.client import client_from
from lbctl.output import emit, table


def _bgp_cell(b: dict[str, Any] | None) -> str:
    # "-" when BGP is off on that host; else its state and established sessions.
    if b is None:
        return "-"
    return f"{b.get('state', '?')} {b.get('peers_up', 0)}/{b.get('peers', 0)}"


def _status_text(f: Any) -> str:
    out = [f"store {f['store']}   state revision {f['state_revision']}   "
           f"generation {f['generation']}   asked {f['this_host']}"]
    vids = sorted({v for h in f["hosts"] for v in h["fingerprints"]})
    rows = []
    for h in f["hosts"]:
        lag = h["lag"]
        rows.append([
            h["host"], h["revision"], h["generation"],
            f"{lag['generations']} gen / {lag['revisions']} rev",
            "yes" if h["in_sync"] else "NO",
            h.get("write_turns", 0),
            _bgp_cell(h.get("bgp")),
            " ".join(f"{h['fingerprints'].get(v, 'missing')[:8]}" for v in vids) or "-",
        ])
    out.append(table(["HOST", "REVISION", "GENERATION", "LAG", "IN-SYNC", "TURNS", "BGP",
                      "RINGS (" + ", ".join(vids) + ")" if vids else "RINGS"], rows))
    if f["lagging"]:
        out.append("lagging: " + ", ".join(f["lagging"]))
    for d in f["divergent"]:
        parts = [f"{fp[:8]}: {', '.join(hs)}" for fp, hs in d["hosts_by_fingerprint"].items()]
        out.append(f"DIVERGENT {d['vip_id']}: " + "; ".join(parts))
    if not f["lagging"] and not f["divergent"]:
        out.append(f"{len(f['hosts'])} hosts agree: same generation, identical rings")
    return "\n".join(out)


def cmd_fleet_status(args: argparse.Namespace) -> int:
    """lbctl fleet status."""
    emit(args, client_from(args).get("/v1/fleet"), _status_text)
    return EXIT_OK


def add_commands(sub: Any, leaf: Leaf) -> None:
    """Add `lbctl fleet status` to the parser."""
    grp = sub.add_parser("fleet", help="the LB hosts sharing one state (store = etcd)")
    fsub = grp.add_subparsers(dest="sub", required=True, parser_class=Parser)
    leaf(fsub, "status", cmd_fleet_status,
         "each host's applied revision, lag, ring fingerprints; divergence named")
