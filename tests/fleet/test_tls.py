"""The etcd store over TLS with client certificates, against a real etcd (no root)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lb.config import EtcdConfig
from lb.control.facade import ControlPlane
from lb.control.model import VipSpec
from lb.fleet.etcd import EtcdUnavailable
from lb.fleet.members import EtcdCluster, etcd_binary
from lb.fleet.state import etcd_store
from tests.fleet.conftest import FLEET_CONFIG, StateDir, wait_for


def _pki(d: Path) -> tuple[Path, Path, Path]:
    """A CA and one certificate for 127.0.0.1 (server and client use), made by openssl."""
    d.mkdir(parents=True, exist_ok=True)
    ca, ca_key, cert, key = d / "ca.pem", d / "ca.key", d / "cert.pem", d / "cert.key"

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=xlb-ca",
        "-keyout", str(ca_key), "-out", str(ca))
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key),
        "-out", str(d / "cert.csr"))
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n"
                               "extendedKeyUsage=serverAuth,clientAuth\n")
    run("x509", "-req", "-in", str(d / "cert.csr"), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-extfile", str(d / "ext.cnf"), "-out", str(cert))
    return ca, cert, key


def test_store_over_tls_with_a_client_certificate(tmp_path: Path) -> None:
    if etcd_binary() is None or shutil.which("openssl") is None:
        pytest.skip("needs etcd-server and openssl")
    ca, cert, key = _pki(tmp_path / "pki")
    with EtcdCluster(tmp_path / "etcd", 1, tls=(ca, cert, key)) as etcd:
        cfgs = [EtcdConfig(endpoints=etcd.endpoints, host_name=f"lb{i}", ca_file=ca,
                           cert_file=cert, key_file=key, timeout_s=2) for i in range(2)]
        cps = [ControlPlane(StateDir(tmp_path / f"lb{i}"), None, config=FLEET_CONFIG,
                            store=etcd_store(tmp_path / f"lb{i}", cfgs[i])) for i in range(2)]
        try:
            cps[0].create_vip(VipSpec.model_validate({
                "protocol": "tcp", "address": "198.18.0.10", "port": 80,
                "backends": [{"address": "198.18.1.1"}]}))
            wait_for(lambda: len(cps[1].list_vips()) == 1, 10, "the VIP on the second host")
        finally:
            for cp in cps:
                cp.close()
        # Without TLS the same etcd is unreachable, and the error says which store.
        plain = EtcdConfig(endpoints=etcd.endpoints, host_name="lbx", timeout_s=0.5)
        cp = ControlPlane(StateDir(tmp_path / "lbx"), None, config=FLEET_CONFIG,
                          store=etcd_store(tmp_path / "lbx", plain))
        try:
            with pytest.raises(EtcdUnavailable, match="etcd at"):
                cp.create_vip(VipSpec.model_validate({
                    "protocol": "tcp", "address": "198.18.0.11", "port": 80, "backends": []}))
        finally:
            cp.close()
