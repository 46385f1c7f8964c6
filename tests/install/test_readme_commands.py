"""The install, backend and doctor commands the README and docs/install.md print parse with
lbctl's real parser: every subcommand and option they name exists (no root; nothing runs).

What the commands do is tested elsewhere: tests/install/test_install.py runs the install line
as printed (under --root) and the real install, test_backend_host.py `backend-host up/status/
down`, tests/ops the host doctor.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from lbctl.base import CliError
from lbctl.main import OWN_OPTIONS, build_parser, main

ROOT = Path(__file__).resolve().parents[2]
#: README sections whose shell blocks are commands for a real host.
SECTIONS = ("Installing on a real host", "Backends")
LBCTL = re.compile(r"(?:^|\s)(?:\S*/)?lbctl\s|-m lbctl\s")


def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.M | re.S)
    assert m, f"README has no section {title!r}"
    return m.group(1)


def _commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    lines: list[str] = []
    for title in SECTIONS:
        for block in re.findall(r"```sh\n(.*?)```", _section(readme, title), re.S):
            lines += block.splitlines()
    # docs/install.md prints its commands indented by four spaces.
    lines += [ln[4:] for ln in (ROOT / "docs" / "install.md").read_text().splitlines()
              if ln.startswith("    ") and not ln.startswith("     ")]
    # Inline `lbctl ...` in those sections, the host doctor's paragraph and docs/install.md.
    inline = [_section(readme, t) for t in (*SECTIONS, "Troubleshooting")]
    for text in (*inline, (ROOT / "docs" / "install.md").read_text()):
        # With an option: a command, not the name of one (`lbctl install`).
        lines += [c for c in re.findall(r"`((?:/opt/xlb/bin/)?lbctl [a-z][^`]*)`", text)
                  if " --" in c]
    return [ln.split(" #", 1)[0].strip() for ln in lines if LBCTL.search(ln)]


COMMANDS = _commands()


def _argv(line: str) -> list[str]:
    words = shlex.split(line.replace("$WHEEL", "xlb.whl").replace("[", "").replace("]", ""))
    i = next(i for i, w in enumerate(words) if w == "lbctl" or w.endswith("/lbctl"))
    argv = words[i + 1:]
    # `--mode tc|xdp` in docs/install.md: the first choice.
    return [re.sub(r"^(\w+)\|\w+$", r"\1", w) for w in argv]


def test_the_docs_print_install_backend_and_doctor_commands() -> None:
    verbs = {_argv(c)[0] for c in COMMANDS}
    assert {"install", "uninstall", "backend-host", "doctor", "vip"} <= verbs, verbs


@pytest.mark.parametrize("line", COMMANDS)
def test_a_printed_command_parses(line: str) -> None:
    argv = _argv(line)
    if argv[0] in OWN_OPTIONS:
        # Their own parsers: the options the (sub)command's --help lists.
        head = argv[:2] if len(argv) > 1 and not argv[1].startswith("-") else argv[:1]
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            main([*head, "--help"])
        unknown = [w for w in argv if w.startswith("--") and w not in out.getvalue()]
        assert not unknown, f"{line}: lbctl {argv[0]} has no {unknown}"
        return
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(argv)
    except CliError as e:  # lbctl's parser: unknown option, missing argument
        raise AssertionError(f"{line}: {e.message}") from e
    except SystemExit as e:
        raise AssertionError(f"{line}: {err.getvalue().strip()}") from e
