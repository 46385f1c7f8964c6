"""`lbctl lab up|down|status`: the network lab (lb.lab), a product feature for trying xlb.

lbctl is the composition layer: this module and lbctl.doctor are the only product code that
imports lb.lab (ARCHITECTURE.md; tests/test_architecture.py enforces it).
"""

from __future__ import annotations

from lb.lab import network


def main(argv: list[str] | None = None) -> int:
    """Run `lbctl lab ...` with the lab's own options."""
    return network.main(argv)
