"""The product's structure, checked from the source with ``ast`` (no product import).

Every ``import`` and ``from ... import`` in ``pcibackd/`` is read, wherever it
stands: at module level, under ``if TYPE_CHECKING:``, inside functions.  The
rules (docs/architecture.md explains them):

a. production never imports the simulation (``simdom0``); the one bridge is
   the spec string in :data:`SIM_BRIDGE`, resolved at run time by name;
b. an import points to a lower rank (:data:`RANKS`) or stays inside its own
   unit; two different units of the same rank never import each other; the
   modules in :data:`NOT_IMPORTED` are imported by no product module;
c. no import cycle between modules (every import counts, TYPE_CHECKING too);
d. imports stand at the top of modules: none inside a function or class, none
   after the first definition, no ``importlib`` except :data:`DYNAMIC_IMPORTS`;
e. no module is longer than :data:`MAX_LINES`;
f. the pure cores (:data:`PURE_CORES`) import no I/O module (:data:`IO_MODULES`),
   directly or through another product module.

And the wheel a dom0 installs holds the product only (no simulation, dumps,
C sources or tests) and every product module.

Each failure names ``file:line``.  To change the structure, change the data
below (with a reason), not the checks.
"""

from __future__ import annotations

import ast
import fnmatch
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = "pcibackd"

# --------------------------------------------------------------------- data --

# Unit -> rank.  A unit is a package directly under pcibackd/ or one of the
# top-level modules (see UNIT_OF_TOP_MODULE).  Lower ranks know nothing of
# higher ones.
RANKS: dict[str, int] = {
    "version": 0,      # pcibackd/__init__.py: the version string, nothing else
    "common": 0,       # files, logs, rate limiting: no knowledge of Xen or PCI
    "wire": 1,         # pciif.h layout and constants, BDF, xenstore paths
    "hostpci": 2,      # HostPort protocol and the sysfs side of a host function
    "xl": 2,           # pure parsers of xl's syntax (PCI specs, domain configs)
    "platform": 3,     # grants, event channels, hypercalls; spec selection
    "xenstore": 4,     # the xenstore client and the libxl-like node writer
    "confspace": 5,    # config-space virtualization (register tables)
    "irq": 5,          # the interrupt broker core
    "worker": 6,       # one guest's process: op loop, xenbus, devices
    "daemon": 7,       # the supervisor
    "control": 8,      # the control socket, its commands and pcibackctl
    "entry": 9,        # pcibackd/cli.py, pcibackd/__main__.py: `pcibackd run`
}
UNIT_OF_TOP_MODULE: dict[str, str] = {
    "__init__": "version",
    "cli": "entry",
    "__main__": "entry",
}

# Product modules no other product module may import (rank order aside), and why.
# (pcibackd.xenstore.toolstack, libxl's node writes, is imported by the supervisor's device
# lifecycle only: pci-attach/detach write what libxl would; workers take paths from wire.paths.)
NOT_IMPORTED: dict[str, str] = {}

# Production reaches the simulated dom0 only through this string, by name.
SIM_PACKAGE = "simdom0"
SIM_BRIDGE: dict[str, str] = {
    "pcibackd/platform/select.py": "simdom0.platform:SimPlatform",
}

# Files allowed to import by name at run time, and why.
DYNAMIC_IMPORTS: dict[str, str] = {
    "pcibackd/platform/select.py": "the platform is chosen by a spec string; sim is not installed on a dom0",
}

MAX_LINES = 400
LONG_MODULES: dict[str, str] = {}      # path -> reason; none today

# Cores that take values and return effects: no I/O of their own.
PURE_CORES: tuple[str, ...] = (
    "pcibackd/worker/ops.py",
    "pcibackd/worker/xenbus.py",
    "pcibackd/worker/topology.py",
    "pcibackd/worker/msi.py",
    "pcibackd/worker/xenbus_nodes.py",
    "pcibackd/confspace/*.py",
    "pcibackd/irq/function.py",
    "pcibackd/irq/messages.py",
    "pcibackd/irq/broker.py",
    "pcibackd/xl/*.py",
)
# Modules that do I/O (a name also covers its submodules).
IO_MODULES: tuple[str, ...] = (
    "os", "io", "socket", "mmap", "select", "selectors", "subprocess", "fcntl", "signal",
    "ctypes", "shutil", "tempfile", "multiprocessing", "multiprocess", "zmq", "pyxs", "psutil",
    "pcibackd.common.files",
    "pcibackd.hostpci.sysfs", "pcibackd.hostpci.seize", "pcibackd.hostpci.release", "pcibackd.hostpci.stubs",
    "pcibackd.hostpci.drivers", "pcibackd.platform.hostdrivers",
    "pcibackd.platform.xen", "pcibackd.platform.xenctrl", "pcibackd.platform.atomic",
    "pcibackd.platform.select",
    "pcibackd.xenstore",
)

# What must never be in the wheel.
WHEEL_FORBIDDEN: tuple[tuple[str, str], ...] = (
    ("*simdom0*", "the simulation"),
    ("*/dumps/*", "config-space dumps"),
    ("*.c", "C sources"),
    ("*.so", "native objects"),
    ("tests/*", "tests"),
    ("*/tests/*", "tests"),
    ("*test_*.py", "tests"),
    ("*_test.py", "tests"),
    ("*conftest.py", "tests"),
)

# ----------------------------------------------------------------- reading --


@dataclass(frozen=True)
class Import:
    path: str            # file, relative to the repository
    line: int
    target: str          # dotted module name the statement reaches
    scope: str           # "module" | "type-checking" | "function" | "class"
    late: bool           # at module level, but after the first def/class

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


@cache
def product_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module under pcibackd/."""
    return {_module_name(p.relative_to(ROOT)): p for p in sorted((ROOT / PRODUCT).rglob("*.py"))
            if "__pycache__" not in p.parts}


@cache
def _parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text(), str(path))
    except SyntaxError:
        return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, scope: str):
    """(node, scope) for every node; ``scope`` is the innermost import-relevant context."""
    for child in ast.iter_child_nodes(node):
        inner = scope
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inner = "function"
        elif isinstance(child, ast.ClassDef) and scope in ("module", "type-checking"):
            inner = "class"
        elif isinstance(child, ast.If) and _is_type_checking(child.test) and scope == "module":
            inner = "type-checking"
        yield child, scope
        yield from _walk(child, inner)


def _first_definition(tree: ast.Module) -> int | None:
    return next((n.lineno for n in tree.body
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))), None)


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@cache
def imports_of(module: str) -> tuple[Import, ...]:
    """Every import statement of a product module, resolved to module names."""
    path = product_files()[module]
    tree = _parse(path)
    if tree is None:
        return ()
    return read_imports(tree, module, str(path.relative_to(ROOT)), path.name == "__init__.py", product_files())


def read_imports(tree: ast.Module, module: str, rel: str, is_package: bool, known) -> tuple[Import, ...]:
    """The imports of one parsed module; ``known`` tells a submodule from a name in a package."""
    first_def = _first_definition(tree)
    out = []
    for node, scope in _walk(tree, "module"):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        late = scope == "module" and first_def is not None and node.lineno > first_def
        if isinstance(node, ast.Import):
            out += [Import(rel, node.lineno, a.name, scope, late) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, is_package, node)
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append(Import(rel, node.lineno, sub if sub in known else base, scope, late))
    return tuple(out)


def all_imports() -> list[Import]:
    return [imp for m in product_files() for imp in imports_of(m)]


def unit_of(module: str) -> str | None:
    """The unit of a product module (RANKS key); None outside the product."""
    parts = module.split(".")
    if parts[0] != PRODUCT:
        return None
    if len(parts) == 1:
        return UNIT_OF_TOP_MODULE["__init__"]
    if (ROOT / PRODUCT / parts[1]).is_dir():
        return parts[1]
    return UNIT_OF_TOP_MODULE.get(parts[1], parts[1])


def _rel(module: str) -> str:
    return str(product_files()[module].relative_to(ROOT))


def _fail(violations: list[str], rule: str) -> None:
    if violations:
        unique = sorted(set(violations))
        pytest.fail(f"{rule}: {len(unique)} violation(s)\n  " + "\n  ".join(unique), pytrace=False)

# ------------------------------------------------------------------- rules --


def test_every_product_module_parses():
    _fail([f"{_rel(m)}:1: does not parse" for m in product_files() if _parse(product_files()[m]) is None],
          "syntax")


def test_production_never_imports_the_simulation():
    bad = [f"{i.where}: imports {i.target}" for i in all_imports()
           if i.target.split(".")[0] == SIM_PACKAGE]
    pattern = re.compile(rf"(?<![\w/]){SIM_PACKAGE}[.:]\w")
    for module, path in product_files().items():
        tree = _parse(path)
        if tree is None:
            continue
        rel = _rel(module)
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                    and pattern.search(node.value) and SIM_BRIDGE.get(rel) != node.value):
                bad.append(f"{rel}:{node.lineno}: names a simulation module ({node.value[:60]!r}); "
                           f"the only bridge is {SIM_BRIDGE}")
    _fail(bad, "production imports simdom0")


def test_the_bridge_to_the_simulation_is_still_there():
    for rel, spec in SIM_BRIDGE.items():
        tree = _parse(ROOT / rel)
        assert tree is not None, rel
        found = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value == spec]
        assert found, f"{rel} no longer holds the platform spec string {spec!r}: update SIM_BRIDGE"


def test_every_unit_has_a_rank():
    units = {unit_of(m) for m in product_files()}
    missing = sorted(u for u in units if u not in RANKS)
    assert not missing, f"pcibackd/ units without a rank (add them to RANKS): {missing}"


def test_imports_point_down_the_ranks():
    bad = []
    for imp in all_imports():
        src, dst = unit_of(_module_name(Path(imp.path))), unit_of(imp.target)
        if dst is None or src == dst or src not in RANKS or dst not in RANKS:
            continue
        if RANKS[dst] > RANKS[src]:
            bad.append(f"{imp.where}: {src} (rank {RANKS[src]}) imports {imp.target} "
                       f"({dst}, rank {RANKS[dst]}): upward")
        elif RANKS[dst] == RANKS[src]:
            bad.append(f"{imp.where}: {src} imports {imp.target} ({dst}): same rank {RANKS[src]}, "
                       f"different units")
    _fail(bad, "layer order")


def test_no_product_module_imports_the_toolstack():
    bad = [f"{i.where}: imports {i.target}: {NOT_IMPORTED[i.target]}" for i in all_imports()
           if i.target in NOT_IMPORTED and _module_name(Path(i.path)) != i.target]
    _fail(bad, "imports of modules nothing may import")


def import_graph() -> dict[str, dict[str, Import]]:
    """Module -> {imported product module: the first statement importing it}."""
    graph: dict[str, dict[str, Import]] = {m: {} for m in product_files()}
    for m in product_files():
        for imp in imports_of(m):
            if imp.target in graph:
                graph[m].setdefault(imp.target, imp)
    return graph


def strongly_connected(graph: dict[str, dict]) -> list[set[str]]:
    """The components of ``graph`` that hold a cycle (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[set[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return comps


def find_cycles(graph: dict[str, dict]) -> list[list[tuple[str, object]]]:
    """One shortest cycle per component of :func:`strongly_connected`, through
    its smallest module, as [(module, edge to the next module), ...]."""
    cycles = []
    for comp in strongly_connected(graph):
        start = min(comp)
        prev: dict[str, str] = {}
        frontier, seen, end = [start], {start}, None
        while frontier and end is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        end = v
                        break
                    if w in comp and w not in seen:
                        seen.add(w)
                        prev[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        path = [end]
        while path[-1] != start:
            path.append(prev[path[-1]])
        path.reverse()
        cycles.append([(v, graph[v][path[(i + 1) % len(path)]]) for i, v in enumerate(path)])
    return cycles


def test_no_import_cycles():
    bad = []
    for cycle in find_cycles(import_graph()):
        hops = " -> ".join(f"{v} ({imp.where}, {imp.scope})" for v, imp in cycle)
        bad.append(f"{cycle[0][1].where}: cycle {hops} -> {cycle[0][0]}")
    bad += [f"{_rel(min(c))}:1: these modules all reach each other: {', '.join(sorted(c))}"
            for c in strongly_connected(import_graph()) if len(c) > 2]
    _fail(bad, "import cycles")


def _dynamic_import_calls(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name in ("import_module", "__import__"):
                yield node


def test_imports_stand_at_the_top_of_modules():
    bad = [f"{i.where}: import of {i.target} inside a {i.scope}" for i in all_imports()
           if i.scope in ("function", "class")]
    bad += [f"{i.where}: import of {i.target} after the first definition" for i in all_imports() if i.late]
    for module, path in product_files().items():
        tree = _parse(path)
        rel = _rel(module)
        if tree is not None and rel not in DYNAMIC_IMPORTS:
            bad += [f"{rel}:{n.lineno}: import by name at run time (importlib)" for n in _dynamic_import_calls(tree)]
    _fail(bad, "imports not at the top")


def test_modules_are_short():
    bad = []
    for module, path in product_files().items():
        n = len(path.read_text().splitlines())
        if n > MAX_LINES and _rel(module) not in LONG_MODULES:
            bad.append(f"{_rel(module)}:{n}: {n} lines (limit {MAX_LINES})")
    _fail(bad, "long modules")


def _is_io(target: str) -> bool:
    return any(target == m or target.startswith(m + ".") for m in IO_MODULES)


def test_pure_cores_do_no_io():
    cores = [m for m in product_files() if any(fnmatch.fnmatch(_rel(m), p) for p in PURE_CORES)]
    bad = []
    for core in cores:
        # Breadth-first over product modules: the first I/O import reached, and how.
        via: dict[str, list[Import]] = {core: []}
        queue = [core]
        while queue:
            m = queue.pop(0)
            for imp in imports_of(m):
                if _is_io(imp.target):
                    chain = via[m] + [imp]
                    how = "" if len(chain) == 1 else " via " + " -> ".join(i.where for i in chain[:-1])
                    bad.append(f"{chain[0].where}: pure core {_rel(core)} reaches I/O module {imp.target}"
                               f" ({imp.where}){how}")
                elif imp.target in product_files() and imp.target not in via:
                    via[imp.target] = via[m] + [imp]
                    queue.append(imp.target)
    _fail(bad, "I/O in pure cores")


def test_the_reading_sees_every_kind_of_import():
    """The checks are only as good as the reading: scopes, relative imports, cycles."""
    tree = ast.parse("from typing import TYPE_CHECKING\n"
                     "import os.path\n"
                     "if TYPE_CHECKING:\n"
                     "    from pcibackd.worker import ops\n"
                     "def f():\n"
                     "    from . import sibling\n"
                     "class C:\n"
                     "    import json\n"
                     "import late\n")
    known = {"pcibackd.worker.ops": None, "pcibackd.worker": None}
    seen = {(i.target, i.scope, i.late) for i in read_imports(tree, "pcibackd.worker.probe", "probe.py", False, known)}
    assert ("pcibackd.worker", "function", False) in seen
    assert ("os.path", "module", False) in seen
    assert ("pcibackd.worker.ops", "type-checking", False) in seen
    assert ("json", "class", False) in seen
    assert ("late", "module", True) in seen
    rel = ast.parse("from .. import wire\nfrom .pciif import Op\n").body
    assert _resolve_from("pcibackd.worker.ops", False, rel[0]) == "pcibackd"
    assert _resolve_from("pcibackd.wire", True, rel[1]) == "pcibackd.wire.pciif"
    cycles = find_cycles({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"e": 5}})
    assert sorted([v for v, _ in c] for c in cycles) == [["a", "b", "c"], ["e"]]
    assert unit_of("pcibackd.cli") == unit_of("pcibackd.__main__") == "entry"
    assert unit_of("pcibackd") == "version" and unit_of("zmq") is None

# -------------------------------------------------------------------- wheel --

_COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", ".hypothesis", ".pytest_cache", "__pycache__",
                                      "*.egg-info", "build", "dist", ".cache")


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> list[str]:
    """The files a wheel of this checkout carries besides its metadata.

    Built offline with the project's own setuptools configuration in a copy of
    the tree (nothing is written into the checkout): ``egg_info`` and
    ``build_py`` produce exactly the payload ``bdist_wheel`` would zip, without
    needing the ``wheel`` package or the network.
    """
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_COPY_IGNORE, symlinks=True)
    lib = tmp / "lib"
    proc = subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()", "-q",
         "egg_info", "--egg-base", str(tmp), "build_py", "--build-lib", str(lib)],
        cwd=src, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"setuptools build failed:\n{proc.stdout}\n{proc.stderr}"
    return sorted(str(p.relative_to(lib)) for p in lib.rglob("*") if p.is_file())


def test_wheel_holds_no_simulation_dumps_c_or_tests(wheel_files):
    assert wheel_files, "the build produced no files"
    bad = [f"{f}: {why}" for f in wheel_files for pattern, why in WHEEL_FORBIDDEN if fnmatch.fnmatch(f, pattern)]
    assert not bad, "the wheel carries what a dom0 must not get:\n  " + "\n  ".join(bad)
    assert {f.split("/")[0] for f in wheel_files} == {PRODUCT}, sorted({f.split("/")[0] for f in wheel_files})


def test_wheel_holds_every_product_module(wheel_files):
    # A package directory without __init__.py is silently left out of the wheel.
    expected = {str(p.relative_to(ROOT)) for p in product_files().values()}
    missing = sorted(expected - set(wheel_files))
    assert not missing, f"product modules missing from the wheel (no __init__.py?): {missing}"
