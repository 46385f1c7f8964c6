"""How lbctl prints: tables for people, `-o json` or `-o yaml` for scripts."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain left-aligned text table."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def emit(args: argparse.Namespace, data: Any, render: Callable[[Any], str]) -> None:
    """Print `data` as JSON/YAML when asked, else through `render`."""
    if args.output == "json":
        print(json.dumps(data, indent=2))
    elif args.output == "yaml":
        import yaml

        print(yaml.safe_dump(data, sort_keys=False), end="")
    else:
        text = render(data)
        if text:
            print(text)


def human(n: float) -> str:
    """1234567 -> 1.2M."""
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            if unit == "" and (n == int(n) or abs(n) >= 10):
                return f"{n:.0f}"
            return f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"
