"""The front doors of a checkout and an install: ./dev's help, man pages and
shell completion generated from the argparse parsers, process titles."""

from __future__ import annotations

import importlib
import os
import subprocess
from pathlib import Path

import pytest

from pcibackd import cli
from pcibackd.common import proctitle
from pcibackd.control import cli as ctl

ROOT = Path(__file__).resolve().parents[2]


def needed(module: str):
    """``module`` from the docs extra: under ``./dev test`` (which installs it: .ci/run) a
    missing one fails the test; elsewhere the test is skipped."""
    if "docs" in os.environ.get("PCIBACKD_TEST_EXTRAS", "").split(","):
        return importlib.import_module(module)
    return pytest.importorskip(module)


@pytest.mark.parametrize("arg", ["--help", "-h", "help"])
def test_dev_help_exits_0_with_clean_text(arg):
    p = subprocess.run([str(ROOT / "dev"), arg], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and p.stderr == ""
    assert "./dev install" in p.stdout and "./dev demo" in p.stdout
    assert not any(ln.startswith(("#", "set ")) for ln in p.stdout.splitlines())


def test_dev_unknown_command_exits_2():
    p = subprocess.run([str(ROOT / "dev"), "frobnicate"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "unknown command 'frobnicate'" in p.stderr


@pytest.mark.parametrize("mod, words", [(cli, ["run", "check-config", "--heartbeat-timeout"]),
                                        (ctl, ["status", "restart", "policy", "keygen"])])
def test_completion_from_the_parser(mod, words):
    shtab = needed("shtab")
    script = shtab.complete(mod.build_parser(), "bash")
    assert all(w in script for w in words)


@pytest.mark.parametrize("mod, name", [(cli, "pcibackd"), (ctl, "pcibackctl")])
def test_man_page_from_the_parser(mod, name):
    manpage = needed("build_manpages.manpage")
    text = str(manpage.Manpage(mod.build_parser(), format="pretty"))
    assert text.startswith(".TH") and name.upper() in text and "\\-\\-version" in text


def test_worker_title():
    assert proctitle.worker_title(3, "web1") == "worker dom3 (web1)"
    assert proctitle.worker_title(3, None) == "worker dom3"
    assert proctitle.worker_title(3, "evil\nname") == "worker dom3"
    assert proctitle.worker_title(3, "x" * 100) == "worker dom3"


def test_under_dev_test_a_missing_docs_module_fails_instead_of_skipping(monkeypatch):
    monkeypatch.setenv("PCIBACKD_TEST_EXTRAS", "test,docs")
    with pytest.raises(ImportError):
        needed("pcibackd_no_such_module")
    monkeypatch.delenv("PCIBACKD_TEST_EXTRAS")
    with pytest.raises(pytest.skip.Exception):
        needed("pcibackd_no_such_module")
