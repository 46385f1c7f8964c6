"""scripts/kernels.py without qemu: the matrix file, the guest's script, the results it reads."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kernels", ROOT / "scripts" / "kernels.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = mod
    spec.loader.exec_module(mod)
    return mod


kernels = _load()


def test_the_matrix_has_debian_12s_kernels() -> None:
    conf = kernels.read_conf()
    assert list(conf) == ["6.1", "6.12"]
    assert conf["6.1"].startswith("6.1.0-") and conf["6.1"].endswith("-amd64")
    assert conf["6.12"].startswith("6.12.") and conf["6.12"].endswith("+deb12-amd64")


def test_a_bad_matrix_line_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "kernels.conf"
    bad.write_text("# comment\n6.1 6.1.0-1-amd64\n6.12\n")
    with pytest.raises(SystemExit, match=r"kernels.conf:3: expected '<name> <release>'"):
        kernels.read_conf(bad)


def test_the_guest_runs_the_same_test_paths_as_the_host() -> None:
    for path in kernels.GUEST_TESTS:
        assert (ROOT / path).exists(), f"{path} is in GUEST_TESTS but not in the tree"
    script = kernels.guest_script(Path("/out"), list(kernels.GUEST_TESTS), ["-x"])
    assert "mount -t bpf bpf /sys/fs/bpf" in script
    assert "bench.bench_verifier --results-dir /out" in script
    assert "--junitxml=/out/junit.xml tests/dataplane tests/kernel" in script
    assert script.index("bench_verifier") < script.index("pytest")


def test_junit_counts_are_read(tmp_path: Path) -> None:
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="10" failures="2"'
        ' errors="1" skipped="3"></testsuite></testsuites>'
    )
    r = kernels.Result("6.1", "6.1.0-57-amd64")
    kernels.parse_junit(xml, r)
    assert (r.passed, r.failed, r.errors, r.skipped) == (4, 2, 1, 3)


def test_unknown_kernel_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert kernels.main(["5.10"]) == 2
    assert "unknown kernel(s) 5.10; scripts/kernels.conf has 6.1, 6.12" in capsys.readouterr().err
