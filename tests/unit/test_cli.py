"""``pcibackd run`` off a Xen dom0: a clear message and exit 1, never the simulation."""

from __future__ import annotations

from pcibackd import cli
from pcibackd.platform import select as platform_select


def test_run_off_xen_says_so_and_exits_1(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(platform_select, "XEN_MARKERS", (str(tmp_path / "no-proc-xen"),))
    assert cli.main(["run", "--config", "/dev/null", "--runtime-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "not a Xen dom0" in err and "./dev demo" in err and "Traceback" not in err
    assert cli.main(["run", "--config", "/dev/null", "--platform", "xen"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pcibackd: platform xen: this machine is not running on Xen") and "Errno" not in err
    assert "./dev demo" in err
    assert not (tmp_path / "run").exists()              # nothing was set up


def test_unknown_platform_is_refused(capsys):
    assert cli.main(["run", "--config", "/dev/null", "--platform", "kvm"]) == 1
    assert "unknown platform 'kvm'" in capsys.readouterr().err
