"""The classic libpcap file format (tcpdump, Wireshark), written by hand: a 24-byte global
header, then a 16-byte header before every frame. Microsecond timestamps, Ethernet frames.
"""

from __future__ import annotations

import struct

#: libpcap's magic for microsecond timestamps, written in the host's byte order.
PCAP_MAGIC = 0xA1B2C3D4
PCAP_VERSION = (2, 4)
#: LINKTYPE_ETHERNET.
LINKTYPE_ETHERNET = 1


def pcap_header(snaplen: int, linktype: int = LINKTYPE_ETHERNET) -> bytes:
    """The file's global header."""
    return struct.pack("<IHHiIII", PCAP_MAGIC, *PCAP_VERSION, 0, 0, snaplen, linktype)


def pcap_record(ts_ns: int, data: bytes, orig_len: int | None = None) -> bytes:
    """One frame: its header (wall-clock time `ts_ns`, bytes kept, length on the wire), then it."""
    sec, ns = divmod(ts_ns, 1_000_000_000)
    length = len(data) if orig_len is None else max(orig_len, len(data))
    return struct.pack("<IIII", sec, ns // 1000, len(data), length) + data
