"""`make test-kernels`: the data-plane suite inside other kernels, each booted under qemu.

    python scripts/kernels.py [NAME ...] [--results DIR] [--tests PATH ...] [-- PYTEST_ARGS]

NAME is a kernel of scripts/kernels.conf (default: all of them; `make test-kernels
KERNELS=6.1`). For each, virtme-ng boots /boot/vmlinuz-<release> over this machine's root
filesystem with qemu's TCG (this machine's /dev/kvm cannot run a guest kernel, see
docs/kernels.md), and the guest runs, against the kernel's own headers:

1. the verifier figures (bench/bench_verifier.py: instructions processed, program sizes),
2. pytest on GUEST_TESTS: the data-plane packet tests, the kernel-facing tests (pins, conn
   table, attach on a veth, map layouts) and a control-plane smoke on real maps.

The guest works on a snapshot of the tree taken when the run starts (<results>/src: the
files git knows plus the built C extensions), so editing the checkout during a run that
takes half an hour changes nothing in it; the snapshot is an overlay in the guest (its
writes stay in guest memory). Results are written through to <results>/<name>/:
pytest.log, junit.xml, verifier.json, guest.log and summary.json. A table of all kernels
is printed at the end and written to <results>/summary.json; bench/results/verifier.json
gets each kernel's verifier figures.

Exit status: 0 when every kernel passed, 1 when one failed, 2 on bad usage. Where qemu or
virtme-ng is missing (a host scripts/setup-kernels.sh cannot prepare), each kernel is reported
as skipped with the reason, and the status is 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "scripts" / "kernels.conf"
VNG = ROOT / ".venv-vng" / "bin" / "vng"
PY = ROOT / ".venv" / "bin" / "python"
DEFAULT_RESULTS = ROOT / "build" / "kernels"
# What runs in each guest. The same cases as on the host, not a reduced set.
GUEST_TESTS = (
    "tests/dataplane",
    "tests/kernel",
    "tests/health/test_hcencap.py",
    "tests/control/test_reconcile.py",
    "tests/control/test_conn_purge.py",
)
# The whole guest run, at most: ~23 minutes on an idle 2-core machine under TCG, several
# times that when the host is busy; past this it is reported as an error (within CI's 90).
GUEST_TIMEOUT_S = 75 * 60
MEMORY = "2G"


@dataclass
class Result:
    name: str
    release: str
    status: str = "not run"  # passed | failed | skipped | error
    reason: str = ""
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    pytest_s: float = 0.0
    wall_s: float = 0.0
    verifier: dict[str, Any] = field(default_factory=dict)


def read_conf(path: Path = CONF) -> dict[str, str]:
    """Kernel name -> release, in file order."""
    kernels: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise SystemExit(f"{path}:{n}: expected '<name> <release>', got {line!r}")
        kernels[parts[0]] = parts[1]
    return kernels


def missing_tools() -> str:
    """Why qemu cannot run here, or '' when it can."""
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (scripts/setup-kernels.sh installs it)"
    if not VNG.exists():
        return f"virtme-ng is not installed at {VNG} (scripts/setup-kernels.sh installs it)"
    if not PY.exists():
        return f"the project's venv is missing ({PY}): run make setup"
    return ""


def snapshot(dest: Path) -> Path:
    """Copy the tree as it is now (tracked and untracked files git does not ignore, and the
    built C extensions) to `dest`; returns `dest`."""
    shutil.rmtree(dest, ignore_errors=True)
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True, capture_output=True,
    ).stdout.decode().split("\0")  # fmt: skip
    files = [f for f in listed if f] + [
        str(p.relative_to(ROOT)) for p in (ROOT / "lb").rglob("*.so")
    ]
    for rel in files:
        src = ROOT / rel
        if not src.is_file():
            continue  # deleted in the work tree, not yet in git
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return dest


def guest_script(out: Path, tests: list[str], pytest_args: list[str],
                 tree: Path = ROOT, *, verifier: bool = True) -> str:  # fmt: skip
    """The shell the guest runs in `tree`: bpffs, verifier figures, then pytest; results to
    `out`. Python imports the project from `tree` (the working directory comes first on
    sys.path), with the project venv's packages."""
    # -v: one line per test as it ends, so a run cut short still says what passed.
    test_cmd = [str(PY), "-m", "pytest", "-p", "no:cacheprovider", "-v",
                f"--junitxml={out}/junit.xml", *tests, *pytest_args]  # fmt: skip
    verifier_cmd = [str(PY), "-m", "bench.bench_verifier", "--results-dir", str(out)]
    return "\n".join([
        "set -u",
        f"cd {shlex.quote(str(tree))}",
        "mount -t bpf bpf /sys/fs/bpf 2>/dev/null || true",
        # Python writes no bytecode into the overlay, and tests see the guest's kernel.
        "export PYTHONDONTWRITEBYTECODE=1",
        f"echo kernel $(uname -r) > {out}/guest.log",
        f"{shlex.join(verifier_cmd)} >> {out}/guest.log 2>&1; echo $? > {out}/verifier.rc"
        if verifier else f"echo 0 > {out}/verifier.rc",
        "start=$(date +%s.%N)",
        f"{shlex.join(test_cmd)} > {out}/pytest.log 2>&1; echo $? > {out}/pytest.rc",
        f'echo "$start $(date +%s.%N)" > {out}/pytest.time',
    ])  # fmt: skip


def parse_junit(path: Path, result: Result) -> None:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    for s in suites:
        total = int(s.get("tests", 0))
        failed = int(s.get("failures", 0))
        errors = int(s.get("errors", 0))
        skipped = int(s.get("skipped", 0))
        result.failed += failed
        result.errors += errors
        result.skipped += skipped
        result.passed += total - failed - errors - skipped


def run_kernel(name: str, release: str, results: Path, tests: list[str],
               pytest_args: list[str], tree: Path = ROOT, *,
               verifier: bool = True) -> Result:  # fmt: skip
    result = Result(name, release)
    out = results / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    image = Path(f"/boot/vmlinuz-{release}")
    if not image.exists() or not Path(f"/lib/modules/{release}/build").exists():
        result.status, result.reason = "error", (
            f"{image} or its headers are missing: run scripts/setup-kernels.sh {name}"
        )
        return result
    script = out / "guest.sh"
    script.write_text(guest_script(out, tests, pytest_args, tree, verifier=verifier) + "\n")
    cpus = str(os.cpu_count() or 1)
    cmd = [str(VNG), "--disable-kvm", "--force-9p", "-r", str(image), "-m", MEMORY,
           "-p", cpus, f"--overlay-rwdir={tree}", f"--rwdir={out}",
           "--exec", f"bash {shlex.quote(str(script))}"]  # fmt: skip
    env = dict(os.environ, PATH=f"{VNG.parent}:{os.environ.get('PATH', '')}")
    print(f"==> {name} ({release}): booting under qemu (TCG, {cpus} CPUs, {MEMORY})", flush=True)
    t0 = time.monotonic()
    with open(out / "vng.log", "wb") as log:
        try:
            proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=GUEST_TIMEOUT_S)  # fmt: skip
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = -1
    result.wall_s = round(time.monotonic() - t0, 1)
    with contextlib.suppress(OSError, ValueError):
        result.verifier = json.loads((out / "verifier.json").read_text())
    if rc == -1:
        partial = _partial_counts(out / "pytest.log", result)
        result.status = "error"
        result.reason = f"the guest ran over {GUEST_TIMEOUT_S} s{partial}"
        return result
    if not (out / "pytest.rc").exists():
        tail = (out / "vng.log").read_text(errors="replace").splitlines()[-15:]
        result.status = "error"
        result.reason = f"the guest did not run the tests (vng exit {rc}); vng.log ends:\n  " + (
            "\n  ".join(tail)
        )
        return result
    try:
        start, end = (out / "pytest.time").read_text().split()
        result.pytest_s = round(float(end) - float(start), 1)
    except (OSError, ValueError):
        pass
    if (out / "junit.xml").exists():
        parse_junit(out / "junit.xml", result)
    if verifier and not result.verifier:
        result.reason = "no verifier figures (see guest.log)"
    pytest_rc = int((out / "pytest.rc").read_text().strip() or 1)
    verifier_rc = int((out / "verifier.rc").read_text().strip() or 1)
    ok = pytest_rc == 0 and verifier_rc == 0 and result.passed > 0
    result.status = "passed" if ok else "failed"
    if not ok and not result.reason:
        result.reason = f"pytest exit {pytest_rc}, verifier exit {verifier_rc}: see {out}"
    return result


def _partial_counts(log: Path, result: Result) -> str:
    """Counts from a verbose pytest log cut short; ' (N passed, M failed so far: ...)'."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    failed = [ln.split(" ", 1)[0] for ln in lines if " FAILED" in ln or " ERROR" in ln]
    result.passed = sum(" PASSED" in ln for ln in lines)
    result.failed = len(failed)
    result.skipped = sum(" SKIPPED" in ln for ln in lines)
    names = f": {', '.join(failed)}" if failed else ""
    return f" ({result.passed} passed, {result.failed} failed so far{names})"


def verifier_cells(result: Result) -> str:
    progs = next(iter(result.verifier.values()), {}).get("programs", {})
    cells = [f"{p} {v['insns_processed']:,}" for p, v in progs.items() if "insns_processed" in v]
    return ", ".join(cells)


def print_table(rows: list[Result]) -> None:
    head = ("kernel", "release", "status", "passed", "failed", "errors", "skipped",
            "pytest s", "wall s", "verifier insns processed")  # fmt: skip
    cells = [head] + [(r.name, r.release, r.status, str(r.passed), str(r.failed),
                       str(r.errors), str(r.skipped), f"{r.pytest_s:.0f}", f"{r.wall_s:.0f}",
                       verifier_cells(r)) for r in rows]  # fmt: skip
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    for i, c in enumerate(cells):
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for r in rows:
        if r.reason:
            print(f"{r.name}: {r.reason}")


def merge_verifier(rows: list[Result]) -> None:
    sys.path.insert(0, str(ROOT))
    from bench.common import merge_results

    figures: dict[str, Any] = {}
    for r in rows:
        figures.update(r.verifier)
    if figures:
        merge_results("verifier", figures)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(prog="scripts/kernels.py", description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", help="kernels of scripts/kernels.conf (default: all)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results directory")
    p.add_argument("--tests", nargs="+", default=list(GUEST_TESTS), help="test paths")
    p.add_argument("--no-verifier", action="store_true", help="skip the verifier figures")
    args = p.parse_args(argv)
    kernels = read_conf()
    names = args.names or list(kernels)
    unknown = [n for n in names if n not in kernels]
    if unknown:
        print(f"unknown kernel(s) {', '.join(unknown)}; scripts/kernels.conf has "
              f"{', '.join(kernels)}", file=sys.stderr)  # fmt: skip
        return 2
    if os.geteuid() != 0:
        print("make test-kernels must run as root (the guests load BPF programs as root, and "
              "qemu's 9p export of / needs it)", file=sys.stderr)  # fmt: skip
        return 2
    results: Path = args.results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    rows: list[Result] = []
    why = missing_tools()
    tree = snapshot(results / "src") if not why else ROOT
    for name in names:
        if why:
            rows.append(Result(name, kernels[name], status="skipped", reason=why))
            continue
        rows.append(run_kernel(name, kernels[name], results, args.tests, extra, tree,
                               verifier=not args.no_verifier))  # fmt: skip
        r = rows[-1]
        print(f"    {name}: {r.status}, {r.passed} passed, {r.failed} failed, {r.errors} errors"
              f" in {r.wall_s:.0f} s (pytest {r.pytest_s:.0f} s)", flush=True)  # fmt: skip
    (results / "summary.json").write_text(
        json.dumps([asdict(r) for r in rows], indent=2) + "\n"
    )
    print()
    print_table(rows)
    merge_verifier(rows)
    print(f"\nresults: {results}/<kernel>/ (pytest.log, junit.xml, verifier.json)")
    return 1 if any(r.status in ("failed", "error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
