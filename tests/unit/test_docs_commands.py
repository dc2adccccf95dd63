"""Every `pcibackd ...` / `pcibackctl ...` command the docs and the samples
quote (in backquotes) exists in the parsers."""

from __future__ import annotations

import re
from pathlib import Path

from pcibackd import cli
from pcibackd.control import cli as ctl

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "etc").glob("*"))]
QUOTED = re.compile(r"`(pcibackctl|pcibackd)((?: [a-z][a-z-]*)+)")
PARSERS = {"pcibackd": cli.build_parser, "pcibackctl": ctl.build_parser}


def _subparsers(parser):
    return next((a.choices for a in parser._actions if isinstance(a.choices, dict)), None)


def _exists(parser, words: list[str]) -> bool:
    """Whether ``words`` start with a (nested) sub-command path of ``parser`` that ends in a leaf."""
    for word in words:
        subs = _subparsers(parser)
        if subs is None:
            return True             # a leaf: the rest are its arguments
        if word not in subs:
            return False
        parser = subs[word]
    return _subparsers(parser) is None


def test_every_quoted_command_exists():
    bad, seen = [], 0
    for path in DOCS:
        for m in QUOTED.finditer(path.read_text(errors="replace")):
            seen += 1
            if not _exists(PARSERS[m.group(1)](), m.group(2).split()):
                bad.append(f"{path.relative_to(ROOT)}: {m.group(0)}`")
    assert seen >= 10 and not bad, bad


def test_the_checker_catches_a_missing_command():
    assert not _exists(ctl.build_parser(), ["policy-reload"])
    assert not _exists(ctl.build_parser(), ["policy"])          # needs its second word
    assert _exists(ctl.build_parser(), ["policy", "reload"])
    assert _exists(cli.build_parser(), ["check-config"])
