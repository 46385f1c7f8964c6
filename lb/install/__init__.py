"""Installing xlb on a host: the layout (paths, user, capabilities), the systemd units, the
default configuration file, and `lbctl install` / `lbctl uninstall` (docs/install.md).

Standard library only: `lbctl install` runs from the wheel itself, before any dependency is
installed (`PYTHONPATH=xlb-*.whl python3 -m lbctl install --wheel xlb-*.whl`).
"""
