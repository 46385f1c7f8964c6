"""The layering rules of ARCHITECTURE.md, checked on the source (plain Python, no root).

1. Only lb/dataplane/ imports bcc or pyroute2 or makes system calls through ctypes (bpf(2),
   setns); everyone else reaches the kernel through lb.dataplane's modules, and only
   lb/dataplane/ imports lb.dataplane.bpf, the raw bpf(2) layer.
2. Imports point down the layers: cross-cutting lb modules < lb.dataplane < lb.health.policy
   < lb.control < lb.health, lb.ops, lb.fleet < lb.lab < xlb_api < lbctl.
3. Nothing imports lb.lab but lb/lab/ itself, tests/, and lbctl's two command modules that
   expose it (lbctl/lab.py, lbctl/doctor.py): lbctl is the composition layer.
4. bench/ uses public names only (no `_private` module or name of lb, lbctl or xlb_api).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("lb", "lbctl", "xlb_api")

#: Top-level lb modules every layer may use (errors, constants, configuration, the client).
CROSS_CUTTING = ("lb.errors", "lb.consts", "lb.config", "lb.settings", "lb.client", "lb.timing")
#: Layers, lowest first: a module may import its own layer and the ones before it.
LAYERS: list[tuple[str, ...]] = [
    CROSS_CUTTING,
    ("lb.dataplane",),
    # The checks' configuration and pure state machine: desired state embeds it.
    ("lb.health.policy",),
    ("lb.control",),
    # lb.install: host setup (units, install, backend-host), beside the operations.
    ("lb.health", "lb.ops", "lb.fleet", "lb.install"),
    ("lb.lab",),
    ("xlb_api",),
    ("lbctl",),
]
#: The product modules allowed to import lb.lab (lbctl composes the lab into the CLI).
LAB_USERS = ("lbctl.lab", "lbctl.doctor")
KERNEL_LIBS = ("bcc", "pyroute2")


@dataclass(frozen=True)
class Imported:
    """One import in one module: the module it names, and the line."""

    module: str
    line: int
    #: Names taken from it (`from X import a, b`), empty for `import X`.
    names: tuple[str, ...] = ()


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "api":  # api/ is the root of the xlb_api package
        rel = rel.relative_to("api")
    parts = rel.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(*tops: str) -> list[Path]:
    return sorted(p for top in tops for p in (ROOT / top).rglob("*.py"))


def _imports(path: Path) -> list[Imported]:
    out: list[Imported] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [Imported(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = tuple(a.name for a in node.names)
            out.append(Imported(node.module, node.lineno, names))
            # `from lb.dataplane import bpf` imports the module lb.dataplane.bpf.
            out += [Imported(f"{node.module}.{n}", node.lineno) for n in names]
    return out


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _layer(module: str) -> int | None:
    if module in OURS:
        return 0  # the packages themselves (their __init__ imports nothing)
    best: tuple[int, int] | None = None  # (prefix length, layer): the longest prefix wins
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if _within(module, p) and (best is None or len(p) > best[0]):
                best = (len(p), i)
    return None if best is None else best[1]


PRODUCT = _sources("lb", "lbctl", "api")
BENCH = _sources("bench")


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def test_the_sources_are_found() -> None:
    names = {_module_name(p) for p in PRODUCT}
    assert {"lb.dataplane.loader", "lb.control.facade", "lbctl.main", "xlb_api.main"} <= names
    assert BENCH, "no bench sources found"


@pytest.mark.parametrize("path", PRODUCT + BENCH, ids=_ids(PRODUCT + BENCH))
def test_only_the_dataplane_touches_the_kernel(path: Path) -> None:
    module = _module_name(path)
    if _within(module, "lb.dataplane"):
        return
    for imp in _imports(path):
        assert not any(_within(imp.module, lib) for lib in KERNEL_LIBS), (
            f"{module}:{imp.line} imports {imp.module}: only lb/dataplane/ may"
        )
        assert not _within(imp.module, "lb.dataplane.bpf"), (
            f"{module}:{imp.line} imports the raw bpf(2) layer: use lb.dataplane's modules"
        )
    text = path.read_text()
    assert ".syscall(" not in text, f"{module} makes a raw system call: only lb/dataplane/ may"


@pytest.mark.parametrize("path", PRODUCT, ids=_ids(PRODUCT))
def test_imports_point_down_the_layers(path: Path) -> None:
    module = _module_name(path)
    own = _layer(module)
    assert own is not None, f"{module} is in no layer of ARCHITECTURE.md: add it to LAYERS"
    for imp in _imports(path):
        if imp.module.split(".")[0] not in OURS:
            continue
        target = _layer(imp.module)
        assert target is not None, f"{module}:{imp.line}: {imp.module} is in no layer"
        assert target <= own, (
            f"{module}:{imp.line} imports {imp.module}, a higher layer"
            f" ({LAYERS[target][0]} above {LAYERS[own][0]})"
        )


@pytest.mark.parametrize("path", PRODUCT + BENCH, ids=_ids(PRODUCT + BENCH))
def test_only_the_lab_and_lbctl_compose_the_lab(path: Path) -> None:
    module = _module_name(path)
    if _within(module, "lb.lab") or module in LAB_USERS:
        return
    for imp in _imports(path):
        assert not _within(imp.module, "lb.lab"), (
            f"{module}:{imp.line} imports {imp.module}: product code never imports the lab"
            f" (only {', '.join(LAB_USERS)} expose it)"
        )


@pytest.mark.parametrize("path", BENCH, ids=_ids(BENCH))
def test_bench_uses_public_names_only(path: Path) -> None:
    for imp in _imports(path):
        if imp.module.split(".")[0] not in OURS:
            continue
        private = [p for p in (*imp.module.split("."), *imp.names) if p.startswith("_")]
        assert not private, f"bench/{path.name}:{imp.line} uses private {private} of {imp.module}"


def test_nothing_imports_the_generic_name_api() -> None:
    """The app ships as xlb_api; `import api` would work in a checkout and not installed."""
    for path in _sources("lb", "lbctl", "api", "tests", "bench"):
        for imp in _imports(path):
            assert not _within(imp.module, "api"), (
                f"{path.relative_to(ROOT)}:{imp.line} imports {imp.module}: use xlb_api"
            )


def test_no_import_cycle_between_modules() -> None:
    graph: dict[str, set[str]] = {}
    for path in PRODUCT:
        module = _module_name(path)
        graph[module] = {
            i.module for i in _imports(path) if i.module.split(".")[0] in OURS
        }
    known = set(graph)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph.get(m, ())):
            if dep not in known or dep == m:
                continue
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep):], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
