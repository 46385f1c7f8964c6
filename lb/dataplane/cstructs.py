"""The C structs of xdp/ as ctypes types, read from the headers themselves (no compiler).

BCC builds ctypes types for a loaded program's maps (`table.Key`, `table.Leaf`), and the
code that has a loaded program uses those. Tools that read a running daemon's pinned maps
without compiling anything (the doctor) need the same layouts: they take them from here, so
the header stays the one definition. The parser knows exactly what xdp/ uses: `struct NAME {
TYPE field; TYPE field[N]; struct OTHER field[N]; };` with fixed-width kernel types, array
sizes as numbers or `#define`d names; ctypes lays the fields out with the C ABI's alignment.
tests/kernel checks every struct against the layout BCC's compiler produced.
"""

from __future__ import annotations

import ast
import ctypes
import operator
import re
from functools import cache
from typing import Any

from lb.config import xdp_source_dir

_TYPES: dict[str, Any] = {
    "__u8": ctypes.c_uint8, "__u16": ctypes.c_uint16, "__u32": ctypes.c_uint32,
    "__u64": ctypes.c_uint64, "__s8": ctypes.c_int8, "__s16": ctypes.c_int16,
    "__s32": ctypes.c_int32, "__s64": ctypes.c_int64,
    # Network-order words are stored as they are: read them as bytes or with ntoh*.
    "__be16": ctypes.c_uint16, "__be32": ctypes.c_uint32, "__be64": ctypes.c_uint64,
}  # fmt: skip

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_DEFINE = re.compile(r"^\s*#\s*define\s+(\w+)\s+(.+?)\s*$", re.M)
_STRUCT = re.compile(r"\bstruct\s+(\w+)\s*\{(.*?)\}\s*;", re.S)
_FIELD = re.compile(r"^(struct\s+\w+|\w+)\s+(\w+)\s*(?:\[\s*([^\]]+?)\s*\])?$")


def _strip(text: str) -> str:
    return _COMMENT.sub(" ", text)


def parse_defines(text: str) -> dict[str, str]:
    """`#define NAME VALUE` of a header's text: name -> value text."""
    return {m.group(1): m.group(2) for m in _DEFINE.finditer(_strip(text))}


_OPS: dict[type, Any] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.floordiv, ast.Mod: operator.mod, ast.LShift: operator.lshift,
    ast.RShift: operator.rshift, ast.BitOr: operator.or_, ast.BitAnd: operator.and_,
    ast.BitXor: operator.xor, ast.Invert: operator.invert, ast.USub: operator.neg,
}  # fmt: skip


def _evaluate(expr: str, defines: dict[str, str], depth: int = 0) -> int:
    """An integer constant expression of numbers, operators and #define'd names."""
    if depth > 16:
        raise ValueError(f"#define nesting too deep in {expr!r}")

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in defines:
            return _evaluate(defines[node.id], defines, depth + 1)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return int(_OPS[type(node.op)](value(node.left), value(node.right)))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return int(_OPS[type(node.op)](value(node.operand)))
        raise ValueError(f"not an integer constant expression: {expr!r}")

    # C integer suffixes (1ULL) are not Python.
    text = re.sub(r"\b(0[xX][0-9a-fA-F]+|\d+)[uUlL]+\b", r"\1", expr)
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an integer constant expression: {expr!r}") from e
    return value(tree.body)


def parse(text: str, defines: dict[str, str] | None = None) -> dict[str, type[ctypes.Structure]]:
    """Every `struct NAME { ... };` of a header's text as a ctypes Structure, by name.

    `defines` adds #define'd names (array sizes) from other headers; the text's own
    defines are read too.
    """
    clean = _strip(text)
    names = {**(defines or {}), **parse_defines(clean)}
    out: dict[str, type[ctypes.Structure]] = {}
    for m in _STRUCT.finditer(clean):
        fields: list[tuple[str, Any]] = []
        for decl in m.group(2).split(";"):
            decl = " ".join(decl.split())
            if not decl:
                continue
            f = _FIELD.match(decl)
            if f is None:
                raise ValueError(f"struct {m.group(1)}: cannot read the field {decl!r}")
            ctype, fname, size = f.groups()
            if ctype.startswith("struct "):
                base: Any = out[ctype.split()[1]]
            elif ctype in _TYPES:
                base = _TYPES[ctype]
            else:
                raise ValueError(f"struct {m.group(1)}.{fname}: unknown type {ctype}")
            fields.append((fname, base * _evaluate(size, names) if size else base))
        out[m.group(1)] = type(m.group(1), (ctypes.Structure,), {"_fields_": fields})
    return out


@cache
def structs(*headers: str) -> dict[str, type[ctypes.Structure]]:
    """The structs of headers under xdp/ ("common/structs.h"), with common/consts.h's names."""
    root = xdp_source_dir()
    defines = parse_defines((root / "common" / "consts.h").read_text())
    out: dict[str, type[ctypes.Structure]] = {}
    for h in headers:
        text = (root / h).read_text()
        defines.update(parse_defines(text))
        out.update(parse(text, defines))
    return out


def struct(header: str, name: str) -> type[ctypes.Structure]:
    """One struct of a header under xdp/ (KeyError naming both when it is not there)."""
    found = structs(header)
    if name not in found:
        raise KeyError(f"struct {name} is not in xdp/{header}")
    return found[name]


def field_slice(cls: type[ctypes.Structure], name: str) -> slice:
    """The bytes of one field in a raw value of `cls`."""
    desc = getattr(cls, name)
    return slice(desc.offset, desc.offset + desc.size)
