"""`lbctl apply -f FILE` and `lbctl get state`: the whole desired state at once."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lbctl.base import EXIT_OK, EXIT_USAGE, CliError, Leaf, Parser
from lbctl.client import client_from
from lbctl.output import emit


def _plan_text(p: Any) -> str:
    lines = []
    for v in p["added_vips"]:
        lines.append(f"+ VIP {v}")
    for v in p["removed_vips"]:
        lines.append(f"- VIP {v}")
    for v in p["changed_vips"]:
        lines.append(
            f"~ VIP {v['vip_id']}"
            + ("  (flags/encapsulation change)" if v["flags_changed"] else "")
            + ("  (source ranges change)" if v.get("ranges_changed") else "")
        )
        for b in v["added_backends"]:
            lines.append(f"    + backend {b}")
        for b in v["removed_backends"]:
            lines.append(f"    - backend {b}")
        for c in v["changed_backends"]:
            bef, aft = c["before"], c["after"]
            what = []
            if bef["weight"] != aft["weight"]:
                what.append(f"weight {bef['weight']} -> {aft['weight']}")
            if bef["state"] != aft["state"]:
                what.append(f"state {bef['state']} -> {aft['state']}")
            lines.append(f"    ~ backend {c['address']}: {', '.join(what)}")
        lines.append(f"    ring slots moving: {100 * float(v['moved_fraction']):.2f}%")
        if v.get("second_hop_slots"):
            lines.append(f"    slots with a second hop (second chance): {v['second_hop_slots']}")
    if not lines:
        lines.append("no change")
    if p["dry_run"]:
        lines.append(f"dry run: nothing changed (generation {p['from_generation']})")
    elif p.get("to_generation") is not None:
        lines.append(f"applied: generation {p['from_generation']} -> {p['to_generation']}")
    else:
        lines.append(f"nothing to apply (generation {p['from_generation']})")
    return "\n".join(lines)


def _load_state_file(path: str) -> Any:
    import yaml

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as e:
        raise CliError(f"cannot read {path}: {e}", EXIT_USAGE) from None
    try:
        data = yaml.safe_load(text)  # YAML is a superset of JSON
    except yaml.YAMLError as e:
        raise CliError(f"{path} is not valid YAML/JSON: {e}", EXIT_USAGE) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CliError(f"{path}: expected a mapping with a 'vips' list", EXIT_USAGE)
    return data


def cmd_apply(args: argparse.Namespace) -> int:
    """lbctl apply -f FILE [--dry-run] [--if-generation N]."""
    body = _load_state_file(args.file)
    body.pop("generation", None)
    headers = {"If-Match": f'"{args.if_generation}"'} if args.if_generation is not None else None
    query = {"dry_run": "true"} if args.dry_run else None
    _, _, plan = client_from(args).request("PUT", "/v1/state", body, query=query, headers=headers)
    emit(args, plan, _plan_text)
    return EXIT_OK


def cmd_get_state(args: argparse.Namespace) -> int:
    """lbctl get state [-o yaml|json]."""
    import yaml

    data = client_from(args).get("/v1/state")
    if args.output == "table":
        print(yaml.safe_dump(data, sort_keys=False), end="")
    else:
        emit(args, data, str)
    return EXIT_OK


def add_commands(sub: Any, leaf: Leaf) -> None:
    """`lbctl apply` and `lbctl get state`."""
    sp = leaf(sub, "apply", cmd_apply, "replace the whole state from a YAML/JSON file")
    sp.add_argument("-f", "--file", required=True, help="state file ('-' = stdin)")
    sp.add_argument("--dry-run", action="store_true", help="only show the plan")
    sp.add_argument(
        "--if-generation", type=int, help="refuse unless the state is at this generation"
    )

    get = sub.add_parser("get", help="read a resource").add_subparsers(
        dest="sub", required=True, parser_class=Parser
    )
    leaf(get, "state", cmd_get_state, "the whole state (YAML by default)")
