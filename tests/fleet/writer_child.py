"""Child of test_fleet_load.py: a control plane on etcd that writes until it is killed.

    python tests/fleet/writer_child.py STATE_DIR ETCD_CONFIG_JSON

Creates tcp:198.18.0.10:80, then adds backends one by one from 4 threads, printing
``ACK k`` once the k-th change returned (etcd committed it).
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

from lb.config import EtcdConfig
from lb.control.facade import ControlPlane
from lb.control.model import BackendSpec, VipSpec
from lb.fleet.state import etcd_store
from tests.fleet.conftest import WRITER_CONFIG, StateDir


def main() -> None:
    """Write until killed."""
    state = Path(sys.argv[1])
    cfg = EtcdConfig.model_validate(json.loads(sys.argv[2]))
    cp = ControlPlane(StateDir(state), None, config=WRITER_CONFIG, store=etcd_store(state, cfg))
    cp.create_vip(VipSpec.model_validate({"protocol": "tcp", "address": "198.18.0.10",
                                          "port": 80, "backends": []}))
    lock = threading.Lock()
    counter = iter(range(60))

    def writer() -> None:
        for k in counter:
            addr = f"198.18.{20 + k // 200}.{1 + k % 200}"
            cp.add_backend("tcp:198.18.0.10:80", BackendSpec.model_validate({"address": addr}))
            with lock:
                print(f"ACK {k}", flush=True)

    ts = [threading.Thread(target=writer) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    threading.Event().wait()  # stay until killed


if __name__ == "__main__":
    main()
