"""The capabilities the data plane needs, checked before anything is loaded.

A daemon need not be root (docs/privileges.md): Linux 5.8 split BPF work into CAP_BPF,
CAP_PERFMON and CAP_NET_ADMIN. Each is needed by a call xlb makes; a start without one is
refused in one line that names the capability and that call, instead of an EPERM from deep
inside BCC or netlink. CAP_SYS_ADMIN (root) stands in for CAP_BPF and CAP_PERFMON, as in the
kernel (bpf_capable(), perfmon_capable()).
"""

from __future__ import annotations

from pathlib import Path

from lb.errors import KernelError

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

#: Capability -> (number, the call that needs it).
REQUIRED: dict[str, tuple[int, str]] = {
    "CAP_BPF": (CAP_BPF, "bpf(2) needs it to load the programs and to create and pin maps"),
    "CAP_NET_ADMIN": (
        CAP_NET_ADMIN,
        "loading XDP and tc programs needs it (with CAP_BPF), and so does attaching them"
        " over netlink",
    ),
    "CAP_PERFMON": (
        CAP_PERFMON,
        "the verifier accepts the programs' pointer arithmetic on map values only with it"
        " ('pointer arithmetic with it prohibited for !root')",
    ),
}
# What CAP_SYS_ADMIN also grants to bpf(2).
_IMPLIED_BY_SYS_ADMIN = {"CAP_BPF", "CAP_PERFMON"}


def effective(status: Path = Path("/proc/self/status")) -> int:
    """The effective capability set of this process (a bit mask)."""
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def missing(caps: int | None = None) -> list[str]:
    """The capabilities of REQUIRED that `caps` (default: this process's) lacks."""
    caps = effective() if caps is None else caps
    sys_admin = bool(caps >> CAP_SYS_ADMIN & 1)
    return [
        name for name, (bit, _) in REQUIRED.items()
        if not caps >> bit & 1 and not (sys_admin and name in _IMPLIED_BY_SYS_ADMIN)
    ]  # fmt: skip


def require(caps: int | None = None) -> None:
    """KernelError, one line, naming the first missing capability and what needs it."""
    lacking = missing(caps)
    if lacking:
        name = lacking[0]
        more = f" (also missing: {', '.join(lacking[1:])})" if lacking[1:] else ""
        raise KernelError(
            f"missing capability {name}: {REQUIRED[name][1]}{more}; run as root, or give the"
            " daemon CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (docs/privileges.md)"
        )
