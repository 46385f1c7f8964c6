"""The kernel boundary for raw bpf(2): syscall number, command numbers, attr structs, errnos.

Every bpf(2) call xlb makes without BCC goes through `bpf` (a failure raises KernelError
naming what was attempted and the errno) or `bpf_errno` (returns the errno, for callers that
handle ENOENT or EINVAL themselves, e.g. batch ops and their per-slot fallback). The attr
structs are the members of `union bpf_attr` (include/uapi/linux/bpf.h) that xlb uses, each
only as long as needed: the kernel zero-fills the rest.

Only ctypes here, no BCC: lb.dataplane.testrun, lb.ops.doctor and lb.dataplane.netns import it
without a compiler.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from lb.errors import KernelError

SYS_BPF = {"x86_64": 321, "aarch64": 280}

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26

BPF_PROG_TYPE_XDP = 6
BPF_OBJ_NAME_LEN = 16

_NR = SYS_BPF.get(platform.machine())
_libc = ctypes.CDLL(None, use_errno=True)

ERRNO_HINTS = {
    errno.EPERM: "needs root (CAP_BPF and CAP_NET_ADMIN)",
    errno.EACCES: "needs root (CAP_BPF and CAP_NET_ADMIN)",
    errno.ENOENT: "no such object",
}


def supported() -> bool:
    """Whether this architecture's bpf(2) number is known."""
    return _NR is not None


def sys_bpf_nr(what: str = "bpf(2)") -> int:
    """The bpf(2) syscall number; KernelError on an unknown architecture."""
    if _NR is None:
        raise KernelError(f"{what}: unsupported architecture {platform.machine()}")
    return _NR


def error(what: str, err: int, *, hints: bool = True) -> KernelError:
    """The KernelError for a failed call: `what`, strerror and errno (and a hint if known)."""
    hint = ERRNO_HINTS.get(err) if hints else None
    return KernelError(f"{what}: {os.strerror(err)} (errno {err}{', ' + hint if hint else ''})")


def _call(cmd: int, attr: ctypes.Structure) -> int:
    return int(_libc.syscall(sys_bpf_nr(), cmd, ctypes.byref(attr), ctypes.sizeof(attr)))


def bpf(cmd: int, attr: ctypes.Structure, what: str, *, hints: bool = True) -> int:
    """One bpf(2) call; returns its result (an fd for the *_GET commands).

    A failure becomes a KernelError naming `what` and the errno.
    """
    rc = _call(cmd, attr)
    if rc < 0:
        raise error(what, ctypes.get_errno(), hints=hints)
    return rc


def bpf_try(cmd: int, attr: ctypes.Structure) -> tuple[int, int]:
    """One bpf(2) call: (its result, 0) on success, (-1, errno) on failure."""
    rc = _call(cmd, attr)
    return (rc, 0) if rc >= 0 else (-1, ctypes.get_errno())


def bpf_errno(cmd: int, attr: ctypes.Structure) -> int:
    """One bpf(2) call for a command that returns 0; its errno on failure, else 0."""
    return 0 if _call(cmd, attr) >= 0 else ctypes.get_errno()


# -- attr structs --


class MapCreateAttr(ctypes.Structure):
    # Head of the BPF_MAP_CREATE member of union bpf_attr, up to map_name.
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * BPF_OBJ_NAME_LEN),
    ]


class ElemAttr(ctypes.Structure):
    # The BPF_MAP_*_ELEM member of union bpf_attr.
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class BatchAttr(ctypes.Structure):
    # The `batch` member of union bpf_attr (BPF_MAP_*_BATCH).
    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class ProgLoadAttr(ctypes.Structure):
    # Head of the BPF_PROG_LOAD member of union bpf_attr, up to prog_name.
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * BPF_OBJ_NAME_LEN),
    ]


class TestRunAttr(ctypes.Structure):
    # The `test` member of union bpf_attr (BPF_PROG_TEST_RUN).
    __test__ = False  # not a pytest class
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class ObjGetAttr(ctypes.Structure):
    # The BPF_OBJ_GET member of union bpf_attr.
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
        ("path_fd", ctypes.c_int32),
    ]


class GetIdAttr(ctypes.Structure):
    # The BPF_*_GET_FD_BY_ID member of union bpf_attr.
    _fields_ = [
        ("id", ctypes.c_uint32),
        ("next_id", ctypes.c_uint32),
        ("open_flags", ctypes.c_uint32),
    ]


class InfoAttr(ctypes.Structure):
    # The BPF_OBJ_GET_INFO_BY_FD member of union bpf_attr.
    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


class _MapInfo(ctypes.Structure):
    # Head of struct bpf_map_info; the kernel fills only as much as we pass.
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
    ]


class _ProgInfo(ctypes.Structure):
    # Head of struct bpf_prog_info, up to and including `name`.
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        # The rest, up to verified_insns (Linux 5.16): what the verifier walked.
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
        ("recursion_misses", ctypes.c_uint64),
        ("verified_insns", ctypes.c_uint32),
        ("attach_btf_obj_id", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


# -- object calls: pins, ids, info --


@dataclass(frozen=True)
class MapInfo:
    """What the kernel says about one map."""

    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


@dataclass(frozen=True)
class ProgInfo:
    """What the kernel says about one program."""

    id: int
    type: int
    name: str
    map_ids: tuple[int, ...]
    # Program size after the verifier's rewrites and once JITed, in bytes.
    xlated_len: int = 0
    jited_len: int = 0
    # Instructions the verifier processed (all paths walked), the figure its 1M limit counts.
    verified_insns: int = 0


def obj_get(path: Path) -> int:
    """Open a pinned BPF object; returns a new fd the caller closes."""
    raw = ctypes.create_string_buffer(os.fsencode(path))
    attr = ObjGetAttr(pathname=ctypes.addressof(raw))
    return bpf(BPF_OBJ_GET, attr, f"opening pin {path}")


def obj_pin(fd: int, path: Path) -> None:
    """Pin a map or program fd at `path` on bpffs (needs write access to the directory)."""
    raw = ctypes.create_string_buffer(os.fsencode(path))
    attr = ObjGetAttr(pathname=ctypes.addressof(raw), bpf_fd=fd)
    bpf(BPF_OBJ_PIN, attr, f"pinning {path}")


def prog_fd_by_id(prog_id: int) -> int:
    """Open a program by id; returns a new fd the caller closes."""
    return bpf(BPF_PROG_GET_FD_BY_ID, GetIdAttr(id=prog_id), f"opening program id {prog_id}")


def map_info(fd: int) -> MapInfo:
    """BPF_OBJ_GET_INFO_BY_FD on a map fd."""
    info = _MapInfo()
    attr = InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"reading map info of fd {fd}")
    return MapInfo(
        id=info.id, type=info.type, key_size=info.key_size, value_size=info.value_size,
        max_entries=info.max_entries, flags=info.map_flags, name=info.name.decode(),
    )  # fmt: skip


def prog_info(fd: int) -> ProgInfo:
    """BPF_OBJ_GET_INFO_BY_FD on a program fd, with the ids of the maps it uses."""
    ids = (ctypes.c_uint32 * 64)()
    info = _ProgInfo(nr_map_ids=len(ids), map_ids=ctypes.addressof(ids))
    attr = InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"reading program info of fd {fd}")
    n = min(info.nr_map_ids, len(ids))
    return ProgInfo(
        id=info.id, type=info.type, name=info.name.decode(), map_ids=tuple(ids[:n]),
        xlated_len=info.xlated_prog_len, jited_len=info.jited_prog_len,
        verified_insns=info.verified_insns,
    )  # fmt: skip


def prog_info_by_id(prog_id: int) -> ProgInfo:
    """ProgInfo of a program known by id (e.g. the one netlink reports on an interface)."""
    fd = prog_fd_by_id(prog_id)
    try:
        return prog_info(fd)
    finally:
        os.close(fd)


def pinned_map_info(path: Path) -> MapInfo:
    """MapInfo of a pinned map."""
    fd = obj_get(path)
    try:
        return map_info(fd)
    finally:
        os.close(fd)
