"""Fixtures of the balancer's packet tests: a `lab` over the shared compiled balancer that is
emptied after every test, and a summary line counting the packet cases that ran.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.dataplane.lab import Lab

CASES_FILE = "tests/dataplane/test_balancer.py"


@pytest.fixture(scope="module")
def wiped_balancer(balancer: Any) -> Any:
    """The shared balancer with every map emptied once per module: tests elsewhere may have
    left VIPs or backends behind."""
    lab = Lab(balancer)
    lab.wipe()
    lab.close()
    return balancer


@pytest.fixture
def lab(wiped_balancer: Any) -> Iterator[Lab]:
    """The shared balancer with lb_cfg at its defaults; everything seeded is undone after."""
    lab = Lab(wiped_balancer)
    lab.reset()
    lab.config()
    try:
        yield lab
    finally:
        lab.reset()
        lab.close()


@pytest.fixture
def one_cpu() -> Iterator[int]:
    """Run the test on one CPU (per-CPU state: buckets, guard windows, the VIP cache), restored
    after: a test run executes on the CPU of the calling thread."""
    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print how many balancer packet cases ran and how many passed."""
    ran = passed = 0
    for outcome in ("passed", "failed", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            if getattr(report, "when", "call") != "call":
                continue
            if report.nodeid.startswith(CASES_FILE + "::test_packet_case"):
                ran += 1
                passed += outcome == "passed"
    if ran:
        terminalreporter.write_line(f"balancer packet cases: {ran} ({passed} passed)")
