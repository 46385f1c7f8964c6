"""What every lbctl command shares: exit codes, the error to print, the argument parser."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, NoReturn

EXIT_OK, EXIT_API, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
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


def split_hostport(text: str, what: str) -> tuple[str, int]:
    """`198.18.0.10:80` / `[2001:db8::10]:53` -> (address, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise CliError(f"{what}: {text!r} is not ADDRESS:PORT (IPv6 as [ADDR]:PORT)", EXIT_USAGE)
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in host and not text.startswith("["):
        raise CliError(f"{what}: write IPv6 as [ADDR]:PORT, got {text!r}", EXIT_USAGE)
    return host, int(port)
