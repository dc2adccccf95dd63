"""Hooks see views of a device, never the engine (tests/unit/test_layers.py checks cycles)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pcibackd.confspace as confspace
from pcibackd.confspace import DevicePolicy
from pcibackd.confspace.layout import Builder
from pcibackd.confspace.spec import BuildView, HookView

PKG = "pcibackd.confspace"
ROOT = Path(confspace.__file__).parent


def _imports(path: Path, modules: set[str]) -> set[str]:
    """confspace modules ``path`` imports anywhere, ``if TYPE_CHECKING:`` blocks included."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else f"{PKG}.{node.module}"
            if base == PKG:
                deps |= {alias.name for alias in node.names if alias.name in modules}
            elif base.startswith(PKG + "."):
                deps.add(base.split(".")[2])
        elif isinstance(node, ast.Import):
            deps |= {alias.name.split(".")[2] for alias in node.names
                     if alias.name.startswith(PKG + ".")}
    return deps - {path.stem}


def _graph() -> dict[str, set[str]]:
    modules = {p.stem for p in ROOT.glob("*.py") if p.stem != "__init__"}
    return {m: _imports(ROOT / f"{m}.py", modules) for m in modules}


def test_hooks_import_no_engine():
    """Every import counts here, ``if TYPE_CHECKING:`` ones too."""
    graph = _graph()
    for low in ("spec", "header", "caps", "power", "policy"):
        assert not graph[low] & {"layout", "space"}, low


@pytest.mark.parametrize("module", ["header", "caps"])
def test_hooks_do_not_reach_through_the_engine(module):
    """Hooks ask their view (``cs.bar(off)``), never ``cs.layout.bars`` or ``cs.port``."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    reached = [f"{module}.py:{node.lineno}: .{node.attr}" for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and node.attr in {"layout", "port", "policy"}]
    assert reached == []


def _members(protocol: type) -> list[str]:
    return [n for n in vars(protocol) if not n.startswith("_")]


@pytest.mark.parametrize("protocol", [HookView, BuildView])
def test_views_name_something(protocol):
    assert len(_members(protocol)) >= 5


def test_confspace_is_a_hook_view(rig_e1000e):
    cs = rig_e1000e.cs
    missing = [n for n in _members(HookView) if not hasattr(cs, n)]
    assert missing == []
    assert cs.bar(0x10) == cs.layout.bars[0x10]
    assert cs.decode_bits == cs.layout.decode_bits


def test_builder_is_a_build_view(rig_e1000e):
    builder = Builder(rig_e1000e.dev, DevicePolicy())
    missing = [n for n in _members(BuildView) if not hasattr(builder, n)]
    assert missing == []
    assert builder.next_cap(builder.first_cap) != builder.first_cap
