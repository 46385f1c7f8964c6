"""What every lbctl command shares: exit codes, the error to print, the argument parser."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Callable
from typing import Any, NoReturn

#: 0 done, 1 the API refused, 2 bad usage, 3 the daemon cannot be reached, 4 `lbctl serve`
#: could not start (the one-line message names the setting and the fix).
EXIT_OK, EXIT_API, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_START = 0, 1, 2, 3, 4
#: `lbctl verify`: the maps differ from the stored state (and were not repaired).
EXIT_DRIFT = 5

#: A command: parsed arguments in, exit code out.
Command = Callable[[argparse.Namespace], int]
#: Adds one command (name, function, help) under a sub-parser group; returns its parser.
Leaf = Callable[[Any, str, Command, str], argparse.ArgumentParser]


class CliError(Exception):
    """An error to print (without a traceback) before exiting with `code`."""

    def __init__(self, message: str, code: int = EXIT_API) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors exit through CliError (code 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise CliError(f"{self.prog}: {message}", EXIT_USAGE)


def hostport(addr: str, port: int) -> str:
    """(address, port) -> `198.18.0.10:80` / `[2001:db8::10]:53`."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _port(text: str) -> int | None:
    # ASCII digits only: str.isdigit() and int() also take '²' and '٨٠' (issue 14, item 18).
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or int(text) > 65535:
        return None
    return int(text)


def port_arg(text: str) -> int:
    """A TCP/UDP port argument (0..65535)."""
    port = _port(text)
    if port is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port in 0..65535")
    return port


def check_address(text: str, what: str) -> str:
    """`text` if it is an IPv4/IPv6 address (ASCII, no zone id); CliError (usage) otherwise."""
    if "%" in text:
        raise CliError(
            f"{what}: {text!r} has an IPv6 zone id; xlb addresses have none "
            f"(write {text.partition('%')[0]})",
            EXIT_USAGE,
        )
    try:
        if not text.isascii():
            raise ValueError
        ipaddress.ip_address(text)
    except ValueError:
        raise CliError(f"{what}: {text!r} is not an IPv4 or IPv6 address", EXIT_USAGE) from None
    return text


def split_hostport(text: str, what: str) -> tuple[str, int]:
    """`198.18.0.10:80` / `[2001:db8::10]:53` -> (address, port)."""
    host, sep, port_text = text.rpartition(":")
    port = _port(port_text) if sep else None
    if port is None:
        raise CliError(
            f"{what}: {text!r} is not ADDRESS:PORT with a port in 0..65535 (IPv6 as [ADDR]:PORT)",
            EXIT_USAGE,
        )
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in host and not text.startswith("["):
        raise CliError(f"{what}: write IPv6 as [ADDR]:PORT, got {text!r}", EXIT_USAGE)
    return check_address(host, what), port


def vip_id_arg(text: str) -> str:
    """A VIP id argument (`tcp:198.18.0.10:80`, `udp:[2001:db8::10]:53`), checked strictly."""
    proto, sep, rest = text.partition(":")
    if not sep or proto.lower() not in ("tcp", "udp"):
        raise CliError(
            f"VIP {text!r} is not PROTOCOL:ADDRESS:PORT (tcp:198.18.0.10:80, "
            "udp:[2001:db8::10]:53)",
            EXIT_USAGE,
        )
    split_hostport(rest, f"VIP {text!r}")
    return text


def address_arg(text: str) -> str:
    """A backend address argument, checked strictly."""
    return check_address(text, "address")
