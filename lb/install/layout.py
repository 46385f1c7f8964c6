"""Where an installed xlb lives, and who it runs as: the one source of these names.

The unit files (lb/install/units/) spell the same paths and capabilities literally, so that
they read as plain systemd units; tests/install/test_units.py holds them to this module, to
lb.dataplane.privileges.REQUIRED and to lb.settings' defaults.
"""

from __future__ import annotations

from pathlib import Path

#: The daemon's own system user and group.
USER = "xlb"
#: The venv the wheel is installed into (its bin/lbctl is what the units run).
PREFIX = Path("/opt/xlb")
CONFIG_DIR = Path("/etc/xlb")
CONFIG_FILE = CONFIG_DIR / "xlb.toml"
#: The API's bearer token (0640 root:xlb): the daemon reads it, root's lbctl sends it.
TOKEN_FILE = CONFIG_DIR / "token"
#: StateDirectory=xlb (lb.settings' state_dir default).
STATE_DIR = Path("/var/lib/xlb")
#: RuntimeDirectory=xlb.
RUNTIME_DIR = Path("/run/xlb")
#: lb.settings' pin_dir default, on bpffs.
PIN_DIR = Path("/sys/fs/bpf/xlb")
#: StateDirectory=xlb-backend: what `lbctl backend-host up` changed, per interface.
BACKEND_STATE_DIR = Path("/var/lib/xlb-backend")
#: Pins of the backend's decap maps, one directory per interface.
BACKEND_PIN_DIR = Path("/sys/fs/bpf/xlb-backend")
UNIT_DIR = Path("/etc/systemd/system")
#: The daemon's unit and the backend's template unit (instance = interface).
SERVICE = "xlb.service"
BACKEND_SERVICE = "xlb-backend@.service"
UNITS = (SERVICE, BACKEND_SERVICE)
#: Where Debian's BCC Python module lives (apt's python3-bpfcc); the venv links only it.
BCC_MODULE = Path("/usr/lib/python3/dist-packages/bcc")
