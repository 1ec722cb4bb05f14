"""Architecture guards: imports flow model <- engine <- formats <- ops <- ... <- cli,
and the engine never runs qemu-img / qemu-io / qemu-nbd (they are the tests' oracle)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "vmforge"

# rank of each top-level subpackage; a module may import only from ranks <= its own
LAYERS = {
    "errors": 0, "util": 0, "py": 0,
    "model": 1,
    "engine": 2,
    "formats": 3,
    "ops": 4,
    "safety": 5, "guest": 5, "packages": 5, "export": 5, "runtime": 5, "build": 5, "catalog": 5,
    "cli": 6,
}
TOP = {"__init__", "__main__"}  # the package facade may import anything


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py"))


def _dotted(path: Path) -> list[str]:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return parts


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes inside ``if TYPE_CHECKING:`` blocks."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                ids.update(id(n) for n in ast.walk(child))
    return ids


def _imports(path: Path, *, type_only: bool | None = False) -> list[tuple[int, str]]:
    """(line, absolute dotted module) for every vmforge import in ``path``.

    ``type_only``: False = runtime imports, True = only those under TYPE_CHECKING,
    None = both.
    """
    tree = ast.parse(path.read_text(), str(path))
    me = _dotted(path)
    pkg = me if path.name == "__init__.py" else me[:-1]
    tc = _type_checking_nodes(tree)
    out = []
    for node in ast.walk(tree):
        if type_only is not None and (id(node) in tc) != type_only:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "vmforge"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "vmforge":
                continue
            if node.module is None or mod == "vmforge":  # from . import x / from vmforge import x
                out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, mod))
    return out


def _layer(dotted: list[str]) -> tuple[str, int | None]:
    if len(dotted) < 2:
        return "__init__", None
    top = dotted[1]
    if top in TOP:
        return top, None
    return top, LAYERS.get(top)


def test_sources_exist():
    mods = _modules()
    assert len(mods) > 5, f"no sources under {SRC}"
    for layer in ("model", "engine", "formats", "ops", "cli"):
        assert (SRC / layer).is_dir(), layer


def test_every_subpackage_has_a_layer():
    unknown = [p.name for p in SRC.iterdir() if p.is_dir() and not p.name.startswith("__")
               and p.name not in LAYERS and any(p.glob("*.py"))]
    assert not unknown, f"add these to LAYERS (and to ARCHITECTURE.md): {unknown}"


def _violations(path: Path, type_only: bool) -> list[str]:
    me, my_rank = _layer(_dotted(path))
    if my_rank is None:
        return []
    bad = []
    for line, mod in _imports(path, type_only=type_only):
        other, rank = _layer(mod.split("."))
        if rank is None:
            if other in TOP and my_rank < LAYERS["cli"]:
                bad.append(f"line {line}: {mod} (the package facade) from layer {me}")
            continue
        if rank > my_rank:
            bad.append(f"line {line}: {me} (rank {my_rank}) imports {mod} (rank {rank})")
    return bad


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_flow_one_way(path):
    bad = _violations(path, type_only=False)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_type_only_imports_flow_one_way(path):
    """Imports under TYPE_CHECKING are still a dependency: the type belongs lower down."""
    bad = _violations(path, type_only=True)
    assert not bad, "\n".join(bad)


_QEMU_TOOL = re.compile(r"(^|[/\s'\"])qemu-(img|io|nbd)($|[\s'\"])")


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_qemu_tools_in_engine(path):
    """String constants that name qemu-img/io/nbd as a program are forbidden outside docs."""
    tree = ast.parse(path.read_text(), str(path))
    docs = _docstring_nodes(tree)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            s = node.value.strip()
            if re.fullmatch(r"(\S*/)?qemu-(img|io|nbd)", s) or (
                    re.match(r"(\S*/)?qemu-(img|io|nbd)\s+-", s)):
                bad.append(f"line {node.lineno}: {node.value!r}")
        if isinstance(node, ast.Call):
            fn = ast.unparse(node.func)
            if re.search(r"(subprocess\.|os\.system|os\.exec|os\.spawn|Popen|run\b)", fn):
                text = ast.unparse(node)
                if re.search(r"qemu-(img|io|nbd)", text):
                    bad.append(f"line {node.lineno}: {text[:120]}")
    assert not bad, "\n".join(bad)


def test_subprocess_only_through_the_choke_point():
    """ARCHITECTURE convention 8: one subprocess choke point (util/run.py)."""
    offenders = []
    for path in _modules():
        rel = path.relative_to(SRC)
        if rel.parts[0] == "util":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n.split(".")[0] == "subprocess" for n in names):
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, offenders
