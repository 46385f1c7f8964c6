"""Open the host's data plane as the service would, for tests/kernel/test_privileges.py.

    python -m tests.kernel.priv_child seed|restart|upgrade CONFIG INTERFACE

Run under setpriv (an unprivileged uid with only the service's capabilities) inside the
test's namespace. Prints one JSON line: the attachment, whether the seeded maps survived,
the backend the tracked flow's packet goes to, or {"error": ...} with exit status 3.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lb.config import Features
from lb.dataplane.host import open_host
from lb.dataplane.testrun import TestRunner
from lb.errors import XlbError
from lb.settings import load_settings
from tests.kernel import flows


def main(argv: list[str]) -> int:
    mode, config, interface = argv
    settings = load_settings(Path(config), interface=interface, xdp_mode="generic")
    out: dict[str, object] = {"uid": os.getuid()}
    try:
        with open_host(settings) as host:
            info = host.attach_info
            assert info is not None
            out |= {"prog_id": info.prog_id, "replaced": info.replaced_prog_id,
                    "reason": info.reason}  # fmt: skip
            if mode == "seed":
                flows.seed(host.balancer)
            out["before"] = flows.snapshot(host.balancer)
            if mode == "upgrade":
                new = settings.dataplane.model_copy(update={"features": Features(gue=False)})
                up = host.upgrade(new)
                assert up is not None
                out |= {"upgraded_to": up.prog_id, "upgrade_replaced": up.replaced_prog_id}
            res = TestRunner(host.balancer.prog_fd).run(flows.packet(host.lb_mac() or ""))
            out["steer"] = flows.backend_of(res.verdict, res.packet)
            # What the next start must find (the packet counted in the counters).
            out["after"] = flows.snapshot(host.balancer)
    except XlbError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return 3
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
