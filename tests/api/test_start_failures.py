"""`lbctl serve` starts that cannot work: one line naming the setting and the fix, exit code 4
(issue 14, items 10 and 21), run for real as a subprocess; and the --repin advice, run as
printed.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess

import pytest

from lbctl.base import EXIT_START, EXIT_USAGE
from tests.api.test_daemon import LBCTL, Daemon, _free_port, daemon_env, lbctl  # noqa: F401

pytestmark = [pytest.mark.bpf, pytest.mark.netns]


def _serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LBCTL, "serve", "--token-file", env["XLB_TOKEN_FILE"], "--port", "0", *args],
        env=env, capture_output=True, text=True, timeout=180,
    )


def _one_line_error(p: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("lbctl: error:")]
    assert len(errors) == 1, p.stderr
    return errors[0]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"XLB_INTERFACE": "xlbtnosuch0", "XLB_NETNS": ""},
         r"no interface xlbtnosuch0.*XLB_INTERFACE"),
        ({"XLB_PIN_DIR": "/tmp"}, r"pin_dir /tmp is not on a bpf filesystem.*mount -t bpf"),
        ({"XLB_STATE_DIR": "/etc/hostname/state"}, r"state_dir /etc/hostname/state: Not a "
         r"directory; choose a writable directory \(XLB_STATE_DIR"),
        ({"XLB_DATAPLANE__RING_SIZE": "4098"}, r"ring_size must be a prime.*"
         r"XLB_DATAPLANE__RING_SIZE"),
    ],
    ids=["no-such-interface", "pin-dir-not-bpffs", "state-dir-unwritable", "bad-ring-size"],
)
def test_a_failing_start_is_one_line_naming_the_setting_and_exit_4(
    daemon_env: dict[str, str], change: dict[str, str], says: str  # noqa: F811
) -> None:
    p = _serve(daemon_env | change)
    assert p.returncode == EXIT_START, (p.returncode, p.stderr)
    assert re.search(says, _one_line_error(p)), p.stderr


def test_a_port_out_of_range_is_a_usage_error(daemon_env: dict[str, str]) -> None:  # noqa: F811
    p = _serve(daemon_env, "--port", "99999")
    assert p.returncode == EXIT_USAGE
    assert "'99999' is not a port in 0..65535" in _one_line_error(p)


def test_a_taken_port_is_one_line_and_exit_4(daemon_env: dict[str, str]) -> None:  # noqa: F811
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run(
            [LBCTL, "serve", "--token-file", daemon_env["XLB_TOKEN_FILE"], "--port", str(port)],
            env=daemon_env, capture_output=True, text=True, timeout=60,
        )
    assert p.returncode == EXIT_START
    assert f"cannot listen on 127.0.0.1:{port}" in _one_line_error(p)


def test_unknown_xlb_variables_are_warned_about(daemon_env: dict[str, str]) -> None:  # noqa: F811
    p = _serve(daemon_env | {"XLB_INTERFAC": "eth0", "XLB_API_PORTT": "1", "XLB_PIN_DIR": "/tmp"})
    assert p.returncode == EXIT_START
    warnings = [x for x in p.stderr.splitlines() if "warning" in x]
    assert any("XLB_INTERFAC (ignored); did you mean XLB_INTERFACE?" in x for x in warnings)
    assert any("XLB_API_PORTT (ignored); did you mean XLB_API_PORT?" in x for x in warnings)
    assert not any("XLB_PIN_DIR" in x or "XLB_TOKEN_FILE" in x for x in warnings), warnings


def test_pins_of_another_size_refuse_in_one_line_and_the_repin_advice_works_as_printed(
    daemon_env: dict[str, str],  # noqa: F811
) -> None:
    env = daemon_env
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    d = Daemon(env, "--port", str(port))
    try:
        d.wait_ready(url)
        assert lbctl(env | {"XLB_URL": url}, "vip", "add", "tcp", "198.18.0.10:80").returncode == 0
    finally:
        assert d.stop() in (0, -signal.SIGTERM), d.log.read_text()
    bigger = env | {"XLB_DATAPLANE__MAX_VIPS": "32"}
    p = _serve(bigger)
    assert p.returncode == EXIT_START
    line = _one_line_error(p)
    assert "max_entries 16 pinned, 32 configured (dataplane.max_vips)" in line
    advice = re.search(r"`(lbctl serve [^`]*)`", line)
    assert advice, line
    argv = shlex.split(advice.group(1))
    d = Daemon(bigger, *argv[2:], "--port", str(port))
    try:
        d.wait_ready(url)
        out = lbctl(bigger | {"XLB_URL": url}, "-o", "json", "vip", "list")
        assert '"tcp:198.18.0.10:80"' in out.stdout, "the VIPs come back from the store"
    finally:
        assert d.stop() in (0, -signal.SIGTERM), d.log.read_text()


def test_plain_http_off_loopback_is_warned_about(daemon_env: dict[str, str]) -> None:  # noqa: F811
    # The start fails on the state directory before anything binds: no listener off loopback.
    p = _serve(daemon_env | {"XLB_STATE_DIR": "/etc/hostname/state"}, "--host", "0.0.0.0")
    assert p.returncode == EXIT_START
    assert "listens on 0.0.0.0:0 over plain HTTP" in p.stderr and "--ssl-certfile" in p.stderr
    p = _serve(daemon_env | {"XLB_STATE_DIR": "/etc/hostname/state"})
    assert "plain HTTP" not in p.stderr
