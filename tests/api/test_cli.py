"""lbctl, run for real (a subprocess) against a live uvicorn on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lb.dataplane.flowhash import Flow5
from lb.dataplane.testrun import TestRunner
from lb.ops.explain import build_packet
from tests.api.conftest import TOKEN, Served, running_api

pytestmark = pytest.mark.bpf

LBCTL = Path(sys.executable).with_name("lbctl")


def lbctl(
    api: Served | None, *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run lbctl with XLB_URL/XLB_TOKEN pointing at `api` (HOME isolated)."""
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("XLB_TEST_HOME", "/nonexistent")}
    if api is not None:
        base |= {"XLB_URL": api.url, "XLB_TOKEN": TOKEN}
    return subprocess.run(
        [str(LBCTL), *args],
        env=base | (env or {}),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def ok(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    return p.stdout


def test_vip_add_list_get_set_rm(api: Served) -> None:
    assert ok(lbctl(api, "vip", "add", "tcp", "198.18.0.10:80")) == "created tcp:198.18.0.10:80\n"
    ok(lbctl(api, "vip", "add", "udp", "[2001:db8::10]:53", "--encap", "gue"))
    table = ok(lbctl(api, "vip", "list"))
    assert table.splitlines()[0].split() == [
        "VIP",
        "ENCAP",
        "OUTER-SRC",
        "FLAGS",
        "IN-RING/BACKENDS",
    ]
    assert "udp:[2001:db8::10]:53  gue" in table
    data = json.loads(ok(lbctl(api, "vip", "list", "-o", "json")))
    assert [v["id"] for v in data["data"]] == ["tcp:198.18.0.10:80", "udp:[2001:db8::10]:53"]
    out = ok(lbctl(api, "vip", "set", "tcp:198.18.0.10:80", "--hash-src-only", "--encap", "gue"))
    assert "hash_src_only=True" in out and "encap=gue" in out
    got = json.loads(ok(lbctl(api, "-o", "json", "vip", "get", "udp:[2001:db8::10]:53")))
    assert got["encap"] == "gue"
    ok(lbctl(api, "vip", "rm", "udp:[2001:db8::10]:53"))
    assert [v.id for v in api.control.list_vips()] == ["tcp:198.18.0.10:80"]


def test_backend_add_drain_rm(api: Served) -> None:
    ok(lbctl(api, "vip", "add", "tcp", "198.18.0.10:80"))
    out = ok(lbctl(api, "backend", "add", "tcp:198.18.0.10:80", "198.18.1.2", "--weight", "3"))
    assert out == "added 198.18.1.2 to tcp:198.18.0.10:80 (weight 3, active)\n"
    ok(lbctl(api, "backend", "add", "tcp:198.18.0.10:80", "198.18.1.3"))
    out = ok(lbctl(api, "backend", "drain", "tcp:198.18.0.10:80", "198.18.1.3"))
    assert "draining 198.18.1.3" in out
    table = ok(lbctl(api, "backend", "list", "tcp:198.18.0.10:80"))
    assert "198.18.1.3  1       draining  no" in table
    ok(lbctl(api, "backend", "rm", "tcp:198.18.0.10:80", "198.18.1.3"))
    assert [b.identity for b in api.control.list_backends("tcp:198.18.0.10:80")] == ["198.18.1.2"]


def test_errors_print_the_problem_detail_and_exit_nonzero(api: Served) -> None:
    ok(lbctl(api, "vip", "add", "tcp", "198.18.0.10:80"))
    p = lbctl(api, "vip", "add", "tcp", "198.18.0.10:80")
    assert p.returncode == 1 and "already exists" in p.stderr and "[409 conflict]" in p.stderr
    assert "Traceback" not in p.stderr
    p = lbctl(api, "backend", "add", "tcp:198.18.0.10:80", "198.18.1.2", "--weight", "5000")
    assert p.returncode == 1 and "weight" in p.stderr and "[422 invalid-input]" in p.stderr
    p = lbctl(api, "vip", "get", "tcp:198.18.0.99:80")
    assert p.returncode == 1 and "[404 not-found]" in p.stderr


def test_wrong_token_is_refused(api: Served) -> None:
    p = lbctl(api, "vip", "add", "tcp", "198.18.0.10:80", env={"XLB_TOKEN": "nope"})
    assert p.returncode == 1 and "[401 unauthorized]" in p.stderr


def test_usage_error_exits_2(api: Served) -> None:
    p = lbctl(api, "vip", "add", "tcp", "198.18.0.10")
    assert p.returncode == 2 and "ADDRESS:PORT" in p.stderr and "Traceback" not in p.stderr
    p = lbctl(api, "vip", "frobnicate")
    assert p.returncode == 2


def test_unreachable_daemon_exits_3() -> None:
    p = lbctl(None, "vip", "list", env={"XLB_URL": "http://127.0.0.1:9"})
    assert p.returncode == 3 and "cannot reach" in p.stderr and "Traceback" not in p.stderr


def test_config_file_supplies_url_and_token(api: Served, tmp_path: Path) -> None:
    cfg = tmp_path / "lbctl.toml"
    cfg.write_text(f'url = "{api.url}"\ntoken = "{TOKEN}"\n')
    p = subprocess.run(
        [str(LBCTL), "vip", "add", "tcp", "198.18.0.10:80"],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "XLB_LBCTL_CONFIG": str(cfg)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr


def test_apply_dry_run_then_apply_and_get_state(api: Served, tmp_path: Path) -> None:
    state = {
        "vips": [
            {
                "protocol": "tcp",
                "address": "198.18.0.10",
                "port": 80,
                "backends": [{"address": f"198.18.1.{i}"} for i in range(1, 11)],
            }
        ]
    }
    f = tmp_path / "state.yaml"
    f.write_text(yaml.safe_dump(state))
    out = ok(lbctl(api, "apply", "-f", str(f), "--dry-run"))
    assert "+ VIP tcp:198.18.0.10:80" in out and "dry run: nothing changed" in out
    assert api.control.list_vips() == []
    out = ok(lbctl(api, "apply", "-f", str(f)))
    assert "applied: generation" in out
    state["vips"][0]["backends"].pop()  # type: ignore[attr-defined]
    f.write_text(yaml.safe_dump(state))
    out = ok(lbctl(api, "apply", "-f", str(f), "--dry-run"))
    assert "- backend 198.18.1.10" in out and "ring slots moving:" in out
    pct = float(out.split("ring slots moving:")[1].split("%")[0])
    assert 7 < pct < 13
    got = yaml.safe_load(ok(lbctl(api, "get", "state", "-o", "yaml")))
    assert len(got["vips"][0]["backends"]) == 10
    # What `get state` prints applies back unchanged.
    out = ok(lbctl(api, "apply", "-f", "-", stdin=yaml.safe_dump(got)))
    assert "no change" in out


def test_apply_if_generation_mismatch_fails(api: Served, tmp_path: Path) -> None:
    f = tmp_path / "s.json"
    f.write_text('{"vips": []}')
    p = lbctl(api, "apply", "-f", str(f), "--if-generation", "42")
    assert p.returncode == 1 and "[412 precondition-failed]" in p.stderr


def test_stats_explain_and_watch(api: Served) -> None:
    ok(lbctl(api, "vip", "add", "tcp", "198.18.0.10:80"))
    ok(lbctl(api, "backend", "add", "tcp:198.18.0.10:80", "198.18.1.2"))
    out = ok(lbctl(api, "explain", "tcp", "198.18.2.1:40000", "198.18.0.10:80"))
    assert out.splitlines()[0] == "tcp 198.18.2.1:40000 -> 198.18.0.10:80: XDP_TX"
    assert "backend   198.18.1.2" in out and "Maglev ring slot" in out
    # Explain's packet is not traffic: a real one moves the counters stats shows.
    flow = Flow5.of("198.18.2.1", "198.18.0.10", 40000, 80, "tcp")
    TestRunner(api.balancer.prog_fd).run(build_packet(flow))
    out = ok(lbctl(api, "stats"))
    assert "tcp:198.18.0.10:80" in out and "STAT_XDP_TX" in out and "conn table" in out
    out = ok(lbctl(api, "stats", "--watch", "0.3", "--count", "2"))
    assert out.count("conn table") == 2
    data = json.loads(ok(lbctl(api, "stats", "-o", "json", "--per-cpu")))
    assert data["global"]["STAT_XDP_TX"]["per_cpu"] is not None


def test_lab_and_doctor_get_their_own_options(api: Served) -> None:
    p = lbctl(api, "doctor", "--help")
    assert p.returncode == 0 and p.stdout.startswith("usage: lbctl doctor"), p.stderr
    p = lbctl(api, "lab", "--help")
    assert p.returncode == 0 and "up" in p.stdout and "status" in p.stdout, p.stderr


def test_https_with_uvicorn_tls_and_cacert(api_balancer: Any, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    with running_api(api_balancer, tmp_path / "state", tls=(cert, key)) as api:
        assert api.url.startswith("https://")
        ok(lbctl(api, "--cacert", str(cert), "vip", "add", "tcp", "198.18.0.10:80"))
        p = lbctl(api, "vip", "list")  # no CA given: the self-signed certificate is refused
        assert p.returncode == 3 and "CERTIFICATE_VERIFY_FAILED" in p.stderr
