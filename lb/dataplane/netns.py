"""Network namespaces: create, enter, run commands inside, per-namespace settings, processes.

Namespaces live under /run/netns like `ip netns add` makes them, so `ip -n` and
`nsenter --net=/run/netns/NAME` see them too. Processes that must see bpffs pins are started
with nsenter (`cmd`/`run`/`popen`/`spawn`), never `ip netns exec`, which remounts /sys.
Every function taking `name` also takes `None`, the caller's own namespace (a real host).
Interfaces inside a namespace are lb.dataplane.netlink's; ethtool (offloads, queues, driver
counters) is here, since it is a command run inside the namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import netns as _pr_netns

from lb.dataplane.netlink import NETNS_RUN_DIR, set_link
from lb.errors import KernelError

CLONE_NEWNET = 0x40000000

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


# Namespaces.


def path(name: str) -> Path:
    """The bind-mount file of a named namespace."""
    return NETNS_RUN_DIR / name


def exists(name: str) -> bool:
    """Whether a named namespace exists."""
    return path(name).exists()


def names(prefix: str = "") -> list[str]:
    """Named namespaces whose name starts with `prefix`, sorted."""
    if not NETNS_RUN_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_RUN_DIR.iterdir() if p.name.startswith(prefix))


def create(name: str) -> None:
    """Create a named namespace; raises if it already exists."""
    if exists(name):
        raise KernelError(f"network namespace {name} already exists")
    _pr_netns.create(name)
    # Loopback down makes addresses on lo (a DSR backend's VIP) non-local.
    set_link(name, "lo", up=True)


def delete(name: str) -> bool:
    """Delete a named namespace (its veths go with it); False if it did not exist."""
    if not exists(name):
        return False
    _pr_netns.remove(name)
    return True


@contextmanager
def namespace(name: str) -> Iterator[str]:
    """Create a namespace for the duration of a `with` block, deleted even on error."""
    create(name)
    try:
        yield name
    finally:
        delete(name)


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Move the calling thread into a namespace and back (setns is per thread)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(path(name), os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise KernelError(f"setns failed: {os.strerror(err)} (errno {err})")


def call_in(name: str | None, fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)` in a fresh thread inside a namespace and return its result."""
    if name is None:
        return fn(*args)
    ns: str = name
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            with entered(ns):
                result.append(fn(*args))
        except BaseException as e:  # re-raised in the caller's thread
            error.append(e)

    t = threading.Thread(target=body, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def cmd(name: str | None, argv: list[str]) -> list[str]:
    """An argv that runs `argv` inside a namespace, keeping the host's mounts (bpffs pins)."""
    if name is None:
        return list(argv)
    return ["nsenter", f"--net={path(name)}", "--", *argv]


def run(
    name: str | None, argv: list[str], *, check: bool = True, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run a command inside a namespace and capture its output."""
    res = subprocess.run(cmd(name, argv), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise KernelError(
            f"{' '.join(argv)} in {name} failed ({res.returncode}): {res.stderr.strip()}"
        )
    return res


def popen(name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start a process inside a namespace; the caller keeps its pid to stop it."""
    return subprocess.Popen(cmd(name, argv), **kwargs)


def spawn(
    name: str, argv: list[str], *, log: Path, env: Mapping[str, str] | None = None
) -> int:
    """Start a long-lived process in a namespace, in its own session, output to `log`.

    Returns its pid, which the caller records to stop it later. Unlike Popen there is no
    object whose destruction complains that the process still runs: it is meant to.
    """
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        return os.posix_spawnp(
            "nsenter", cmd(name, argv), dict(os.environ if env is None else env),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, fd, 1),
                (os.POSIX_SPAWN_DUP2, fd, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(fd)


# Kernel settings that live per namespace.


def _write_sysctls(values: Mapping[str, str | int]) -> None:
    for key, value in values.items():
        Path("/proc/sys", key.replace(".", "/")).write_text(f"{value}\n")


def set_sysctls(name: str | None, values: Mapping[str, str | int]) -> None:
    """Write `net.*` sysctls inside a namespace (they are per namespace; nothing on the host)."""
    for key in values:
        if not key.startswith("net."):
            raise KernelError(f"refusing to write non-namespaced sysctl {key}")
    call_in(name, _write_sysctls, values)


def get_sysctl(name: str | None, key: str) -> str:
    """Read a `net.*` sysctl inside a namespace."""
    return call_in(name, lambda: Path("/proc/sys", key.replace(".", "/")).read_text().strip())


# ethtool: offloads, queues, driver counters.


def set_offload(name: str | None, ifname: str, feature: str = "tx", on: bool = False) -> None:
    """Switch an ethtool offload (default: tx checksumming) on an interface in a namespace."""
    run(name, ["ethtool", "-K", ifname, feature, "on" if on else "off"])


def offloads(name: str | None, ifname: str) -> dict[str, bool]:
    """ethtool -k of an interface: feature name -> on."""
    out = run(name, ["ethtool", "-k", ifname]).stdout
    feats: dict[str, bool] = {}
    for line in out.splitlines()[1:]:
        key, _, rest = line.strip().partition(":")
        if rest:
            feats[key] = rest.split()[0] == "on"
    return feats


def set_queues(name: str | None, ifname: str, count: int) -> None:
    """Give a veth `count` rx and tx queues (veths start with one)."""
    run(name, ["ethtool", "-L", ifname, "rx", str(count), "tx", str(count)])



def ethtool_stats(name: str | None, ifname: str) -> dict[str, int]:
    """`ethtool -S`: driver counters (on veth: per-queue xdp_tx, xdp_tx_errors, drops, ...)."""
    res = run(name, ["ethtool", "-S", ifname], check=False)
    out: dict[str, int] = {}
    for line in res.stdout.splitlines()[1:]:
        key, _, value = line.strip().partition(":")
        with contextlib.suppress(ValueError):
            out[key.strip()] = int(value)
    return out


# Processes.


def pid_alive(pid: int) -> bool:
    """Whether a process runs (a zombie child of ours is reaped and counts as gone)."""
    try:
        # Reap our own children so they do not linger as zombies that look alive.
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return False
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    status = Path(f"/proc/{pid}/status")
    with contextlib.suppress(OSError):
        for line in status.read_text().splitlines():
            if line.startswith("State:"):
                return "Z" not in line.split()[1]
    return True


def pids_in(name: str) -> list[int]:
    """Pids of processes whose network namespace is the named one (never this process)."""
    try:
        st = os.stat(path(name))
    except FileNotFoundError:
        return []
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            ns = os.stat(entry / "ns" / "net")
        except OSError:
            continue
        if (ns.st_ino, ns.st_dev) == (st.st_ino, st.st_dev):
            found.append(int(entry.name))
    return sorted(found)


# Counters along a path.



def _read_snmp() -> dict[str, int]:
    out: dict[str, int] = {}
    # thread-self, not self: /proc/self/net shows the main thread's namespace.
    lines = Path("/proc/thread-self/net/snmp").read_text().splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        proto, _, names = head.partition(":")
        for k, v in zip(names.split(), values.partition(":")[2].split(), strict=False):
            out[f"{proto}{k}"] = int(v)
    for line in Path("/proc/thread-self/net/snmp6").read_text().splitlines():
        k, _, v = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[k] = int(v.strip())
    return out


def snmp(name: str | None) -> dict[str, int]:
    """IP/TCP/UDP counters of a namespace, e.g. TcpInCsumErrors, UdpNoPorts, Udp6InCsumErrors."""
    return call_in(name, _read_snmp)
