"""Run by test_restart.py in a fresh process: open the host from its pins and report as JSON.

Settings come from $XLB_CONFIG, as for a restarted daemon; argv[1] is the packet in hex.
"""

from __future__ import annotations

import json
import sys

from lb.dataplane.host import open_host
from lb.dataplane.loader import read_runtime_config
from lb.dataplane.testrun import TestRunner
from lb.settings import load_settings
from tests.kernel.flows import snapshot


def main() -> int:
    """Load from the pins, snapshot the maps, then run the packet once."""
    settings = load_settings()
    with open_host(settings, attach=False) as host:
        snap = snapshot(host.balancer)
        runtime = read_runtime_config(host.balancer)
        res = TestRunner(host.balancer.prog_fd).run(bytes.fromhex(sys.argv[1]))
    print(json.dumps({
        "snapshot": snap,
        "runtime_ok": runtime == settings.runtime,
        "verdict": res.verdict,
        "packet": res.packet.hex(),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
