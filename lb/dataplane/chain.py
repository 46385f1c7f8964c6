"""The XDP chain: xlb's root program on the interface, the operator's filters, then the
balancer (docs/chain.md; layout in xdp/root/chain.h).

Off by default: the balancer is attached to the interface itself and pays nothing. With the
chain on, the interface runs `xdp_root` (xdp/root/root.c), which tail-calls the slots of the
pinned program array `xdp_chain` in order: filters in slots 0 .. CHAIN_BALANCER_SLOT - 1,
the balancer in the last. Every change is one map update, atomic for the packets:

- a filter added, upgraded or removed: its slot is written or deleted;
- the balancer upgraded or restarted: its slot gets the new program, the root stays.

An operator's filter is handed over as a pin on bpffs (`bpftool prog load ... PATH`) and
opened by path (BPF_OBJ_GET: file permissions, no CAP_SYS_ADMIN, which opening by id needs).
xlb pins what each slot runs beside its maps (`chain_<slot>`), so `lbctl chain` can name the
programs without CAP_SYS_ADMIN and the operator's own pin may go away.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lb.dataplane import bpf
from lb.dataplane.loader import BPF_XDP, compile_pinned, is_bpffs, load_func
from lb.errors import InvalidInput, KernelError, NotFound

# xdp/root/chain.h, names verbatim (tests/test_source_of_truth.py compares).
CHAIN_SLOTS = 8
CHAIN_BALANCER_SLOT = CHAIN_SLOTS - 1

ROOT_SOURCE = "root/root.c"
ROOT_PROGRAM = "xdp_root"
# The program array's name (and pin), and the root program's pin, in the pin directory.
CHAIN_MAP = "xdp_chain"
ROOT_PIN = "prog_" + ROOT_PROGRAM
# The balancer's program pin (lb.dataplane.attach.PROG_PIN), for naming its slot.
BALANCER_PIN = "prog_xdp_balancer"

Role = Literal["filter", "balancer"]

# enum bpf_prog_type, for messages only.
PROG_TYPE_NAMES = {
    1: "socket filter", 2: "kprobe", 3: "tc (sched_cls)", 4: "tc action (sched_act)",
    5: "tracepoint", 6: "XDP", 7: "perf event", 8: "cgroup skb", 26: "tracing", 28: "extension",
}  # fmt: skip


def slot_pin(slot: int) -> str:
    """xlb's pin name of the program in `slot` (beside the maps)."""
    return BALANCER_PIN if slot == CHAIN_BALANCER_SLOT else f"chain_{slot}"


@dataclass(frozen=True)
class ChainSlot:
    """One slot of the chain and the program it runs (prog_id None: empty)."""

    slot: int
    role: Role
    prog_id: int | None
    name: str | None
    pin: str | None


def _map_fd(pin_dir: Path) -> int:
    path = pin_dir / CHAIN_MAP
    if not path.exists():
        raise NotFound(f"the XDP chain is off: no {path}", field="chain")
    return bpf.obj_get(path)


def _elem(fd: int, key: ctypes.c_uint32, value: ctypes.c_uint32) -> bpf.ElemAttr:
    return bpf.ElemAttr(map_fd=fd, key=ctypes.addressof(key), value=ctypes.addressof(value))


# enum bpf_map_type
BPF_MAP_TYPE_PROG_ARRAY = 3


def ensure_chain_map(pin_dir: Path) -> None:
    """Create and pin xdp_chain unless pinned: an empty program array costs nothing, and with
    it always there an operator can load a filter that uses it (bpftool `map name xdp_chain
    pinned ...`) before the chain is on. The root, compiled later, adopts this pin."""
    path = pin_dir / CHAIN_MAP
    if path.exists():
        return
    pin_dir.mkdir(parents=True, exist_ok=True)
    attr = bpf.MapCreateAttr(map_type=BPF_MAP_TYPE_PROG_ARRAY, key_size=4, value_size=4,
                             max_entries=CHAIN_SLOTS, map_name=CHAIN_MAP.encode())  # fmt: skip
    fd = bpf.bpf(bpf.BPF_MAP_CREATE, attr, f"creating {path}")
    try:
        bpf.obj_pin(fd, path)
    finally:
        os.close(fd)


def chain_exists(pin_dir: Path) -> bool:
    """Whether the chain's program array is pinned in `pin_dir`."""
    return (pin_dir / CHAIN_MAP).exists()


def read_ids(pin_dir: Path) -> list[int | None]:
    """The program id in each slot (None: empty), from the pinned program array."""
    fd = _map_fd(pin_dir)
    try:
        out: list[int | None] = []
        for slot in range(CHAIN_SLOTS):
            key, value = ctypes.c_uint32(slot), ctypes.c_uint32()
            err = bpf.bpf_errno(bpf.BPF_MAP_LOOKUP_ELEM, _elem(fd, key, value))
            if err == errno.ENOENT:
                out.append(None)
            elif err:
                raise bpf.error(f"reading slot {slot} of {pin_dir / CHAIN_MAP}", err)
            else:  # a program array answers user space with the program's id
                out.append(int(value.value))
        return out
    finally:
        os.close(fd)


def _name_of(pin_dir: Path, slot: int, prog_id: int) -> tuple[str | None, str | None]:
    # By xlb's own pin of the slot (no capability), else by id (CAP_SYS_ADMIN).
    path = pin_dir / slot_pin(slot)
    if path.exists():
        fd = bpf.obj_get(path)
        try:
            info = bpf.prog_info(fd)
        finally:
            os.close(fd)
        if info.id == prog_id:
            return info.name, str(path)
    try:
        return bpf.prog_info_by_id(prog_id).name, None
    except KernelError:
        return None, None


def slots(pin_dir: Path) -> list[ChainSlot]:
    """Every slot of the chain with the program it runs."""
    out = []
    for slot, prog_id in enumerate(read_ids(pin_dir)):
        role: Role = "balancer" if slot == CHAIN_BALANCER_SLOT else "filter"
        name, pin = _name_of(pin_dir, slot, prog_id) if prog_id is not None else (None, None)
        out.append(ChainSlot(slot, role, prog_id, name, pin))
    return out


def set_slot(pin_dir: Path, slot: int, prog_fd: int, what: str) -> None:
    """Put `prog_fd` in `slot` (one atomic update; the slot's old program stops at once)."""
    fd = _map_fd(pin_dir)
    try:
        key, value = ctypes.c_uint32(slot), ctypes.c_uint32(prog_fd)
        err = bpf.bpf_errno(bpf.BPF_MAP_UPDATE_ELEM, _elem(fd, key, value))
    finally:
        os.close(fd)
    if err == errno.EINVAL:
        # The kernel's tail-call compatibility check: same program type, both JITed, the
        # same xdp.frags flag as the root.
        raise InvalidInput(
            f"the kernel refused {what} in chain slot {slot} (EINVAL): a chain program must"
            " be XDP, JITed, and loaded without xdp.frags, like the root",
            field="pin",
        )
    if err:
        raise bpf.error(f"putting {what} in chain slot {slot}", err)


def clear_slot(pin_dir: Path, slot: int) -> bool:
    """Empty `slot`; False when it was empty already."""
    fd = _map_fd(pin_dir)
    try:
        key = ctypes.c_uint32(slot)
        attr = bpf.ElemAttr(map_fd=fd, key=ctypes.addressof(key))
        err = bpf.bpf_errno(bpf.BPF_MAP_DELETE_ELEM, attr)
    finally:
        os.close(fd)
    if err == errno.ENOENT:
        return False
    if err:
        raise bpf.error(f"emptying chain slot {slot}", err)
    return True


def check_filter_slot(slot: int) -> None:
    """InvalidInput unless `slot` is a filter slot."""
    if not 0 <= slot < CHAIN_BALANCER_SLOT:
        raise InvalidInput(
            f"chain slot {slot} is not a filter slot: filters go in slots 0 to"
            f" {CHAIN_BALANCER_SLOT - 1}, slot {CHAIN_BALANCER_SLOT} is the balancer's",
            field="slot",
        )


def open_filter(path: Path) -> int:
    """An fd of the XDP program pinned at `path` (the caller closes it); InvalidInput in one
    line naming the problem when there is no pin, or it is not an XDP program."""
    if not path.is_absolute():
        raise InvalidInput(f"the pin {path} is not an absolute path", field="pin")
    if not path.exists():
        raise InvalidInput(f"no BPF program pinned at {path}", field="pin")
    if not is_bpffs(path):
        raise InvalidInput(f"{path} is not on a bpf filesystem, so not a pinned program",
                           field="pin")
    try:
        fd = bpf.obj_get(path)
    except KernelError as e:
        raise InvalidInput(f"cannot open the pin {path}: {e.detail}", field="pin") from e
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
        if kind != "anon_inode:bpf-prog":
            what = kind.removeprefix("anon_inode:bpf-")
            raise InvalidInput(f"{path} is a pinned BPF {what}, not a program", field="pin")
        info = bpf.prog_info(fd)
        if info.type != bpf.BPF_PROG_TYPE_XDP:
            tname = PROG_TYPE_NAMES.get(info.type, "other")
            raise InvalidInput(
                f"{path} is a {tname} program (type {info.type}, {info.name!r}), not an XDP"
                " program",
                field="pin",
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def pin_slot_program(pin_dir: Path, slot: int, prog_fd: int) -> None:
    """Make xlb's pin of `slot` the program `prog_fd` (the slot itself is written first)."""
    path = pin_dir / slot_pin(slot)
    path.unlink(missing_ok=True)
    bpf.obj_pin(prog_fd, path)


def add_filter(pin_dir: Path, slot: int, path: Path) -> ChainSlot:
    """Put the XDP program pinned at `path` in filter slot `slot` (replacing atomically what
    runs there: a hitless filter upgrade); returns the slot as it is now."""
    check_filter_slot(slot)
    fd = open_filter(path)
    try:
        set_slot(pin_dir, slot, fd, str(path))
        pin_slot_program(pin_dir, slot, fd)
        info = bpf.prog_info(fd)
    finally:
        os.close(fd)
    return ChainSlot(slot, "filter", info.id, info.name, str(pin_dir / slot_pin(slot)))


def remove_filter(pin_dir: Path, slot: int) -> ChainSlot:
    """Empty filter slot `slot`; returns what ran there (NotFound when it was empty)."""
    check_filter_slot(slot)
    before = slots(pin_dir)[slot]
    if before.prog_id is None or not clear_slot(pin_dir, slot):
        raise NotFound(f"chain slot {slot} is empty", field="slot")
    (pin_dir / slot_pin(slot)).unlink(missing_ok=True)
    return before


def filters(pin_dir: Path) -> list[ChainSlot]:
    """The filter slots that hold a program ([] when the chain is off)."""
    if not chain_exists(pin_dir):
        return []
    return [s for s in slots(pin_dir) if s.role == "filter" and s.prog_id is not None]


class Root:
    """The root program, loaded with xdp_chain on its pin; reopened from its pin when that
    is a root using the pinned chain (a restart keeps the attached program as it is)."""

    def __init__(self, pin_dir: Path) -> None:
        self.pin_dir = pin_dir
        self._bpf: Any = None
        self._fd: int | None = self._reopen()
        if self._fd is None:
            self._bpf, _ = compile_pinned(ROOT_SOURCE, [], pin_dir)
            try:
                self._fn = load_func(self._bpf, ROOT_PROGRAM, self._bpf.XDP, BPF_XDP)
            except BaseException:
                self._bpf.cleanup()
                raise

    def _reopen(self) -> int | None:
        path, chain = self.pin_dir / ROOT_PIN, self.pin_dir / CHAIN_MAP
        if not (path.exists() and chain.exists()):
            return None
        fd = bpf.obj_get(path)
        info = bpf.prog_info(fd)
        if info.name == ROOT_PROGRAM and bpf.pinned_map_info(chain).id in info.map_ids:
            return fd
        os.close(fd)
        return None

    @property
    def prog_fd(self) -> int:
        """File descriptor of the root program."""
        return self._fd if self._fd is not None else int(self._fn.fd)

    @property
    def prog_id(self) -> int:
        """Kernel id of the root program."""
        return bpf.prog_info(self.prog_fd).id

    def pin(self) -> None:
        """Pin the root program as ROOT_PIN (once attached, so a restart finds it)."""
        path = self.pin_dir / ROOT_PIN
        if path.exists():
            fd = bpf.obj_get(path)
            try:
                if bpf.prog_info(fd).id == self.prog_id:
                    return
            finally:
                os.close(fd)
            path.unlink()
        bpf.obj_pin(self.prog_fd, path)

    def close(self) -> None:
        """Release this process's fds (the pins keep the root and the chain)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
