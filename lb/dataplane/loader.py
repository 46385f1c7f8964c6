"""Compile and load the XDP programs with BCC and hand out their maps.

This is one of the few modules that imports `bcc`; the raw bpf(2) object calls it needs
(pins, program ids, map and program info) are lb.dataplane.bpf's, re-exported here. Map key/value
types are the ctypes classes BCC generates from xdp/common/structs.h (`table.Key`, `table.Leaf`):
Python never keeps a hand-written copy of a C layout.

Pinned maps: with a pin dir, every map is pinned as PIN_DIR/<name> and BCC silently reuses an
existing pin whatever its size. `Balancer` therefore compares each reused map with what the
program declares before loading the program, and refuses (`IncompatiblePins`) on any
difference rather than mixing layouts.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lb.config import DataplaneConfig, RuntimeConfig, xdp_source_dir
from lb.dataplane import kernelcheck

# lb.dataplane.bpf's object calls, re-exported for the callers of lb.dataplane.loader.
from lb.dataplane.bpf import MapInfo as MapInfo
from lb.dataplane.bpf import ProgInfo as ProgInfo
from lb.dataplane.bpf import map_info as map_info
from lb.dataplane.bpf import obj_get as obj_get
from lb.dataplane.bpf import obj_pin as obj_pin
from lb.dataplane.bpf import pinned_map_info as pinned_map_info
from lb.dataplane.bpf import prog_fd_by_id as prog_fd_by_id
from lb.dataplane.bpf import prog_info as prog_info
from lb.dataplane.bpf import prog_info_by_id as prog_info_by_id
from lb.dataplane.keys import (
    IPAddress,
    family_of,
    get_field,
    mac_bytes,
    mac_text,
    proto_number,
    put_field,
    set_addr,
)
from lb.dataplane.protect import write_guard_config
from lb.errors import BccUnavailable, IncompatiblePins, KernelError, UnsupportedKernel

SOURCE = "balancer/balancer.c"
MAP_NAMES = (
    "vip_map",
    "vip_gen",
    "vip_cache",
    "vip_addrs",
    "vip_filter",
    "reals",
    "ch_rings",
    "conn_table",
    "lb_cfg",
    "vip_stats",
    "real_stats",
    "pair_cache",
    "pair_stats",
    "glob_stats",
    "src_v4",
    "src_v6",
    "src_changed",
    "src_denied",
    "guard_cfg",
    "guard_state",
    "rl_buckets",
    "ev_cfg",
    "ev_state",
    "ev_frame",
    "events",
)

# Maps that hold no flow state: lb_cfg is rewritten from the configuration at every start,
# glob_stats, pair_cache and pair_stats are counters. A pin of one of them with another layout (an
# upgrade added a field or a counter, or dataplane.max_vip_backends changed) is replaced
# instead of refusing the start; rings, backends and the connection table are never
# replaced behind the operator's back.
# The event maps (ev_cfg, ev_state, ev_frame, the events ring) hold nothing worth keeping
# either: ev_cfg is written "off" at every start (lb.dataplane.events.EventsControl).
# src_changed too: all zero means "check every packet" until the control plane stamps it.
# vip_cache is only ever a copy of vip_map (a new one is empty); vip_gen is not stateless:
# a cache entry is trusted while vip_gen holds its generation, so it only ever grows.
STATELESS_MAPS = frozenset({"lb_cfg", "glob_stats", "pair_cache", "pair_stats", "src_denied",
                            "src_changed", "vip_cache",
                            "guard_cfg", "guard_state", "rl_buckets", "ev_cfg", "ev_state",
                            "ev_frame", "events"})


def _bcc() -> Any:
    try:
        import bcc
    except ImportError as e:  # pragma: no cover - depends on the host
        raise BccUnavailable(
            "BCC's Python module is missing: run scripts/setup.sh (Debian package python3-bpfcc)"
        ) from e
    return bcc


def compile_program(source: str | Path, cflags: list[str]) -> Any:
    """Compile a C program with BCC; returns the `bcc.BPF` object (its maps fresh, unpinned:
    `compile_pinned` is the variant that puts them on pins).

    `source` is a path under xdp/ ("balancer/balancer.c") or an absolute path (bench/xdp/).
    Includes resolve against xdp/ ("common/consts.h"): BCC compiles the text as
    /virtual/main.c, so -I must be absolute.
    """
    bcc = _bcc()
    src_dir = xdp_source_dir()
    path = src_dir / source
    flags = [f"-I{src_dir}", *cflags]
    try:
        return bcc.BPF(src_file=str(path).encode(), cflags=flags)
    except Exception as e:
        raise BccUnavailable(f"BCC could not compile {path}: {e}") from e


def compile_pinned(
    source: str | Path, cflags: list[str], pin_dir: Path,
    *, replace: frozenset[str] = frozenset(),
) -> tuple[Any, list[str]]:  # fmt: skip
    """`compile_program`, then every map on its pin in `pin_dir` (see adopt_pins); returns
    the BPF object and the pins replaced. IncompatiblePins (nothing changed) when a pin
    differs from what the program declares and is not in `replace`."""
    pin_dir.mkdir(parents=True, exist_ok=True)
    bpf = compile_program(source, cflags)
    try:
        diffs, replaced = adopt_pins(bpf, pin_dir, replace=replace)
        if diffs:
            raise _incompatible(pin_dir, diffs)
    except BaseException:
        bpf.cleanup()
        raise
    return bpf, replaced


@contextmanager
def _fd2_captured() -> Iterator[list[str]]:
    """Collect what C code writes to fd 2 (libbcc prints the verifier log there)."""
    out: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


# Verifier log lines that are statistics, not the reason for a refusal.
_LOG_STATS = ("processed ", "verification time", "stack depth", "max_states_per_insn")


def verifier_message(log: str) -> str:
    """The verifier's reason for a refusal: the lines at the end of its log that are neither
    statistics nor instructions ("371: (0f) r1 += r4") nor source (";"), joined with "; "."""
    reason: list[str] = []
    for line in reversed(log.splitlines()):
        line = line.strip()
        if not line or (not reason and line.startswith(_LOG_STATS)):
            continue
        if line.split(":", 1)[0].isdigit() or line.startswith(";"):
            if reason:
                break
            continue
        reason.append(line)
    return "; ".join(reversed(reason))


# enum bpf_attach_type: what libbpf gives a SEC("xdp") program as expected_attach_type.
BPF_XDP = 37


def load_func(bpf: Any, name: str, prog_type: int, attach_type: int = -1) -> Any:
    """bpf.load_func, after checking the kernel has the features `name` uses; a refusal
    raises UnsupportedKernel with the verifier's reason in one line, and the whole log is
    kept in a file the message names. `attach_type` is the expected_attach_type (-1: none)."""
    kernelcheck.require(name)
    with _fd2_captured() as captured:
        try:
            return bpf.load_func(name.encode(), prog_type, attach_type=attach_type)
        except Exception as e:
            error = e
    log = captured[0] if captured else ""
    reason = verifier_message(log) or str(error)
    where = ""
    if log.strip():
        fd, path = tempfile.mkstemp(prefix=f"xlb-verifier-{name}-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(log)
        where = f" (verifier log: {path})"
    raise UnsupportedKernel(
        f"Linux {os.uname().release} refused {name}: {reason}{where}; xlb is tested on Linux"
        f" {', '.join(kernelcheck.SUPPORTED)}"
    ) from error


# The connection table's map type before docs/conn-table.md (enum bpf_map_type).
BPF_MAP_TYPE_LRU_HASH = 9
# Map types as the kernel numbers them (enum bpf_map_type), for messages only.
MAP_TYPE_NAMES = {
    1: "hash", 2: "array", 5: "percpu_hash", 6: "percpu_array", 9: "lru_hash",
    10: "lru_percpu_hash", 11: "lpm_trie", 12: "array_of_maps", 13: "hash_of_maps",
    14: "devmap", 16: "cpumap",
}  # fmt: skip


def is_bpffs(path: Path) -> bool:
    """True when `path` (existing or not) would live on a bpf filesystem mount."""
    best, fstype = "", ""
    target = os.path.abspath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1].replace("\\040", " ")
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(
                best
            ):
                best, fstype = mnt, parts[2]
    return fstype == "bpf"


def unpin(pin_dir: Path) -> list[str]:
    """Remove the pinned objects directly in `pin_dir` (xlb's own directory); returns names.

    Every map the program declares is pinned there, including ones not in MAP_NAMES, so all
    of them go; subdirectories are left alone.
    """
    removed = []
    if pin_dir.is_dir():
        for p in sorted(pin_dir.iterdir()):
            if not p.is_dir():
                p.unlink()
                removed.append(p.name)
    return removed


# What an operator changes to change a map's size, for the incompatible-pin message.
SIZE_SOURCE = {
    "vip_map": "dataplane.max_vips",
    "vip_addrs": "dataplane.max_vips",
    "reals": "dataplane.max_reals",
    "ch_rings": "dataplane.max_vips x dataplane.ring_size",
    "conn_table": "sets: dataplane.conn_table_size / 8, rounded up to a power of two",
    "vip_stats": "dataplane.max_vips",
    "real_stats": "dataplane.max_reals",
    "pair_cache": "dataplane.max_vip_backends, rounded up to a power of two (at most 16384)",
    "pair_stats": "dataplane.max_vip_backends",
    "src_v4": "dataplane.max_src_ranges",
    "src_v6": "dataplane.max_src_ranges",
    "src_denied": "dataplane.max_vips",
    "src_changed": "dataplane.max_vips",
}


_libbcc: Any = None


def _bcc_lib() -> Any:
    # libbcc's per-table accessors that BCC's Python binding does not declare; a private
    # handle so BCC's own declarations stay untouched.
    global _libbcc
    if _libbcc is None:
        lib = ctypes.CDLL(_bcc().libbcc.lib._name)
        sz, mod = ctypes.c_size_t, ctypes.c_void_p
        for fn, res in (
            ("bpf_num_tables", sz), ("bpf_table_name", ctypes.c_char_p),
            ("bpf_table_fd_id", ctypes.c_int), ("bpf_table_type_id", ctypes.c_int),
            ("bpf_table_max_entries_id", sz), ("bpf_table_flags_id", ctypes.c_int),
            ("bpf_table_key_size_id", sz), ("bpf_table_leaf_size_id", sz),
        ):  # fmt: skip
            getattr(lib, fn).restype = res
            getattr(lib, fn).argtypes = [mod] if fn == "bpf_num_tables" else [mod, sz]
        _libbcc = lib
    return _libbcc


def _declared(bpf: Any) -> list[tuple[str, int, dict[str, int]]]:
    """Every table of the compiled module: name, BCC's fd, and what the program declares."""
    lib, mod = _bcc_lib(), bpf.module
    out = []
    for i in range(lib.bpf_num_tables(mod)):
        want = {
            "type": int(lib.bpf_table_type_id(mod, i)),
            "key_size": int(lib.bpf_table_key_size_id(mod, i)),
            "value_size": int(lib.bpf_table_leaf_size_id(mod, i)),
            "max_entries": int(lib.bpf_table_max_entries_id(mod, i)),
            "flags": int(lib.bpf_table_flags_id(mod, i)),
        }
        out.append((lib.bpf_table_name(mod, i).decode(), int(lib.bpf_table_fd_id(mod, i)), want))
    return out


def _differences(name: str, want: dict[str, int], got: MapInfo) -> list[str]:
    """How a pinned map differs from what the program declares ([] = compatible)."""
    if name == "conn_table" and got.type == BPF_MAP_TYPE_LRU_HASH != want["type"]:
        # Every other field differs too; one line says what happened.
        return [
            "conn_table: the pinned connection table is the LRU hash of an older data"
            " plane; this one is a set-associative array (docs/conn-table.md) and cannot"
            " take its entries over"
        ]
    diffs = []
    for field, expected in want.items():
        actual = getattr(got, field)
        if actual == expected:
            continue
        if field == "type":
            a, e = MAP_TYPE_NAMES.get(actual, actual), MAP_TYPE_NAMES.get(expected, expected)
            diffs.append(f"{name}: type {a} pinned, {e} in the program")
        elif field == "max_entries":
            src = SIZE_SOURCE.get(name, "the program")
            diffs.append(f"{name}: max_entries {actual} pinned, {expected} configured ({src})")
        else:
            diffs.append(f"{name}: {field} {actual} pinned, {expected} in the program")
    return diffs


def adopt_pins(
    bpf: Any, pin_dir: Path, *, replace: frozenset[str] = frozenset()
) -> tuple[list[str], list[str]]:
    """Put each of the compiled program's maps on its pin PIN_DIR/<name>, before the program
    is loaded; returns (differences, pins replaced).

    A pin is opened by path (BPF_OBJ_GET: file permissions, no capability) and dup2()ed onto
    the fd BCC gave its fresh map, so the program and every BCC table object use the pinned
    map. (BCC's own BPF_TABLE_PINNED reopens pins by id, BPF_MAP_GET_FD_BY_ID, which needs
    CAP_SYS_ADMIN: a daemon with only CAP_BPF could create pins but never reuse them.) A map
    without a pin is pinned; a pin that differs from the declaration is replaced when its
    name is in `replace`. Any other difference is returned and nothing is changed.
    """
    plan: list[tuple[str, str, int, int | None]] = []
    diffs: list[str] = []
    for name, fd, want in _declared(bpf):
        path = pin_dir / name
        if not path.exists():
            plan.append(("pin", name, fd, None))
            continue
        pinned = obj_get(path)
        d = _differences(name, want, map_info(pinned))
        if not d:
            plan.append(("adopt", name, fd, pinned))
            continue
        os.close(pinned)
        if name in replace:
            plan.append(("replace", name, fd, None))
        else:
            diffs.extend(d)
    if diffs:
        for *_, opened in plan:
            if opened is not None:
                os.close(opened)
        return diffs, []
    replaced: list[str] = []
    for kind, name, fd, opened in plan:
        if opened is not None:
            os.dup2(opened, fd)
            os.close(opened)
            continue
        if kind == "replace":
            (pin_dir / name).unlink()
            replaced.append(name)
        obj_pin(fd, pin_dir / name)
    return [], sorted(replaced)


def _incompatible(pin_dir: Path, diffs: list[str]) -> IncompatiblePins:
    return IncompatiblePins(
        f"pinned maps in {pin_dir} do not match this data plane: "
        + "; ".join(diffs)
        + ". Reusing them would mix layouts, so nothing was loaded. Either start with the"
        " configuration the pins were made with, or start fresh with `lbctl serve --repin`"
        f" (or `rm -r {pin_dir}`): that drops the connection table, rings and counters, and"
        " the control plane rewrites VIPs and backends from its store.",
        field="pin_dir",
    )


# --- runtime configuration (lb_cfg) -------------------------------------------------------


def write_runtime_config(
    balancer: Balancer, runtime: RuntimeConfig, *, lb_mac: str | None = None
) -> None:
    """Write `runtime` into lb_cfg[0], the one entry the program reads per packet.

    `lb_mac` is the attached interface's own MAC: frames to another unicast MAC are passed
    (a promiscuous interface sees them). None leaves that filter off (only group addresses
    are refused), for programs that are not attached (tests, benchmarks).
    """
    leaf = balancer.lb_cfg.Leaf()
    put_field(leaf, "gw_mac", mac_bytes(runtime.gateway_mac))
    put_field(leaf, "lb_mac", mac_bytes(lb_mac or "00:00:00:00:00:00"))
    put_field(leaf, "gue_port", runtime.gue_port.to_bytes(2, "big"))
    put_field(leaf, "src_v4", runtime.src_v4.packed)
    put_field(leaf, "src_v6", runtime.src_v6.packed)
    put_field(leaf, "rss_v4", runtime.rss_v4.network_address.packed)
    put_field(leaf, "rss_v6", runtime.rss_v6.network_address.packed[:8])
    leaf.max_frame = runtime.max_frame
    leaf.udp_timeout_ns = round(runtime.udp_timeout_s * 1e9)
    leaf.tcp_timeout_ns = round(runtime.tcp_timeout_s * 1e9)
    balancer.lb_cfg[balancer.lb_cfg.Key(0)] = leaf
    write_guard_config(balancer, runtime.protect)


def read_runtime_config(balancer: Balancer) -> RuntimeConfig | None:
    """Read lb_cfg[0] back as a RuntimeConfig; None while it was never written (all zero)."""
    leaf = balancer.lb_cfg[balancer.lb_cfg.Key(0)]
    if not any(ctypes.string_at(ctypes.addressof(leaf), ctypes.sizeof(leaf))):
        return None
    return RuntimeConfig(
        gateway_mac=mac_text(get_field(leaf, "gw_mac")),
        gue_port=int.from_bytes(get_field(leaf, "gue_port"), "big"),
        src_v4=ipaddress.IPv4Address(get_field(leaf, "src_v4")),
        src_v6=ipaddress.IPv6Address(get_field(leaf, "src_v6")),
        rss_v4=ipaddress.IPv4Network((get_field(leaf, "rss_v4"), 16)),
        rss_v6=ipaddress.IPv6Network((get_field(leaf, "rss_v6") + bytes(8), 64)),
        max_frame=leaf.max_frame,
        udp_timeout_s=leaf.udp_timeout_ns / 1e9,
        tcp_timeout_s=leaf.tcp_timeout_ns / 1e9,
    )


class Balancer:
    """The loaded balancer program and its maps.

    With `pin_dir`, the maps are pinned there and reused on the next load (after checking
    they match); `repin=True` removes the old pins first.
    """

    PROGRAM = "xdp_balancer"

    def __init__(
        self, config: DataplaneConfig, *, pin_dir: Path | None = None, repin: bool = False
    ) -> None:
        self.config = config
        self.pin_dir = pin_dir
        self._closed = False
        # Pins replaced at load because their layout changed (STATELESS_MAPS only).
        self.replaced_pins: list[str] = []
        if pin_dir is not None:
            if not is_bpffs(pin_dir):
                raise KernelError(
                    f"pin_dir {pin_dir} is not on a bpf filesystem: mount one"
                    " (mount -t bpf bpf /sys/fs/bpf) or choose a pin_dir under it",
                )
            if repin:
                unpin(pin_dir)
        kernelcheck.require(self.PROGRAM)
        if pin_dir is None:
            self.bpf = compile_program(SOURCE, config.cflags())
        else:
            # Maps whose content is rewritten at start, or is counters, are replaced when
            # their layout changed rather than refusing the start.
            self.bpf, self.replaced_pins = compile_pinned(
                SOURCE, config.cflags(), pin_dir, replace=STATELESS_MAPS
            )
        try:
            self.fn = self._load()
        except BaseException:
            self.bpf.cleanup()
            raise
        self.maps: dict[str, Any] = {name: self.bpf[name.encode()] for name in MAP_NAMES}

    def _load(self) -> Any:
        # BPF_XDP as libbpf gives SEC("xdp"): since Linux 6.17 (and its stable backports) a
        # tail call needs the same expected_attach_type on both sides, so the balancer, the
        # chain's root and an operator's libbpf-built filter share one (docs/chain.md).
        return load_func(self.bpf, self.PROGRAM, self.bpf.XDP, BPF_XDP)

    @property
    def prog_fd(self) -> int:
        """File descriptor of the loaded XDP program."""
        return int(self.fn.fd)

    @property
    def prog_id(self) -> int:
        """Kernel id of the loaded program (what netlink reports once attached)."""
        return prog_info(self.prog_fd).id

    def map_ids(self) -> dict[str, int]:
        """Kernel id of each map, by name (pinned maps keep theirs across loads)."""
        return {name: map_info(int(t.map_fd)).id for name, t in self.maps.items()}

    def take_over(self, new: Balancer) -> None:
        """Adopt `new`'s program and maps in place, then release the old ones.

        Used by a hitless upgrade once `new` is attached: whoever holds this object (the
        control plane) follows the upgrade. Tables fetched before stay bound to the old fds,
        so look maps up through the balancer (`balancer.vip_map`) rather than caching them.
        """
        old = self.bpf
        self.config, self.pin_dir = new.config, new.pin_dir
        self.bpf, self.fn, self.maps = new.bpf, new.fn, new.maps
        # `new` no longer owns anything: closing it must not release what moved here.
        new._closed = True
        old.cleanup()

    def __getattr__(self, name: str) -> Any:
        # Typed access by C map name: balancer.vip_map, balancer.ch_rings, ...
        maps = self.__dict__.get("maps")
        if maps is not None and name in maps:
            return maps[name]
        raise AttributeError(name)

    def vip_key(self, addr: IPAddress, port: int, proto: str | int) -> Any:
        """Build a vip_map key."""
        k = self.vip_map.Key()
        set_addr(k.addr, addr)
        k.port = socket.htons(port)
        k.proto = proto_number(proto)
        k.family = family_of(addr)
        return k

    def vip_addr_key(self, addr: IPAddress) -> Any:
        """Build a vip_addrs key."""
        k = self.vip_addrs.Key()
        set_addr(k.addr, addr)
        k.family = family_of(addr)
        return k

    def close(self) -> None:
        """Release the program and the process's map fds (pinned maps stay pinned)."""
        if not self._closed:
            self._closed = True
            self.bpf.cleanup()


@contextmanager
def loaded_balancer(
    config: DataplaneConfig, *, pin_dir: Path | None = None, repin: bool = False
) -> Iterator[Balancer]:
    """Load the balancer for the duration of a `with` block."""
    b = Balancer(config, pin_dir=pin_dir, repin=repin)
    try:
        yield b
    finally:
        b.close()
