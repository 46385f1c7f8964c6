"""Helpers every benchmark shares: describe the machine, merge figures into a results file.

    figures["env"] = environment()
    merge_results("controlplane", figures)   # -> bench/results/controlplane.json

Several benchmarks may write parts of the same file (each its own top-level keys), so a
write reads the file, replaces the keys it was given and writes it back, under a lock and
through a rename so a reader never sees half a file.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The benchmark-only XDP programs (compiled with -I xdp/, like the product's).
XDP_DIR = Path(__file__).resolve().parent / "xdp"
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def commit() -> str:
    """The checkout's commit (12 hex digits), "-dirty" when tracked files differ from it;
    "unknown" outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--"],
                               capture_output=True).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def environment() -> dict[str, Any]:
    """Where figures were measured: kernel, CPU, CPU count, Python, date (UTC, ISO 8601),
    the checkout's commit."""
    return {
        "kernel": platform.release(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count() or 0,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": commit(),
    }


def merge_results(name: str, figures: dict[str, Any], results_dir: Path | None = None) -> Path:
    """Merge ``figures`` into ``<results_dir>/<name>.json`` (top-level keys replaced, the
    others kept) and return the file's path. ``results_dir`` defaults to bench/results."""
    if not _NAME.match(name):
        raise ValueError(f"results name must be letters, digits, '-' or '_'; got {name!r}")
    directory = RESULTS_DIR if results_dir is None else results_dir
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    with open(directory / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged: dict[str, Any] = {}
        try:
            old = json.loads(path.read_text())
        except FileNotFoundError:
            old = {}
        except ValueError:
            # A corrupt file would otherwise stop every later benchmark from recording.
            os.replace(path, path.with_suffix(".json.corrupt"))
            old = {}
        if isinstance(old, dict):
            merged.update(old)
        merged.update(figures)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(merged, f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path
