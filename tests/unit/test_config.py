"""Config validation: every key typed and range-checked, each problem with file and key;
``pcibackd check-config``; the shipped sample config is valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from pcibackd import cli
from pcibackd.daemon.config import SETTINGS, ConfigError, DaemonConfig

ETC = Path(__file__).resolve().parents[2] / "etc"


def _load(tmp_path, text: str, **overrides) -> DaemonConfig:
    path = tmp_path / "pcibackd.toml"
    path.write_text(text)
    return DaemonConfig.load(path, **overrides)


@pytest.mark.parametrize("line, key, words", [
    ("heartbeat_timeout = -3", "heartbeat_timeout", "must be > 0"),
    ("heartbeat_timeout = 0", "heartbeat_timeout", "must be > 0"),
    ('heartbeat_timeout = "1"', "heartbeat_timeout", "must be a number"),
    ("heartbeat_timeout = true", "heartbeat_timeout", "must be a number"),
    ("heartbeat_timeout = nan", "heartbeat_timeout", "finite"),
    ("restart_max_failures = 2.5", "restart_max_failures", "must be an integer"),
    ("restart_max_failures = 0", "restart_max_failures", "must be >= 1"),
    ("poll_window_us = -1", "poll_window_us", "must be >= 0"),
    ("handover_grace = -1", "handover_grace", "must be >= 0"),
    ('handover_grace = "10"', "handover_grace", "must be a number"),
    ('topology = "flat"', "topology", "must be one of vpci, passthrough"),
    ('log_level = "LOUD"', "log_level", "must be one of"),
    ('runtime_dir = "run/pcibackd"', "runtime_dir", "absolute path"),
    ('runtime_dir = ""', "runtime_dir", "non-empty string"),
    ("policy_path = 3", "policy_path", "non-empty string"),
    ('platform = "kvm"', "platform", "unknown platform 'kvm'"),
    ('platform = "sim"', "platform", "sim:DIR"),
    ('control_tcp = "127.0.0.1:5555"', "control_tcp", "tcp://ADDRESS:PORT"),
    ('control_tcp = "tcp://127.0.0.1:99999"', "control_tcp", "tcp://ADDRESS:PORT"),
    ("colour = true", "colour", "unknown setting"),
])
def test_bad_value_names_file_and_key(tmp_path, line, key, words):
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, f"[pcibackd]\n{line}\n")
    msg = str(exc.value)
    assert msg.startswith(f"{tmp_path / 'pcibackd.toml'}: {key}: ") and words in msg


def test_every_problem_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, "heartbeat_timeout = -3\nstop_timeout = 'soon'\nbogus = 1\n")
    lines = str(exc.value).splitlines()
    assert sorted(ln.split(": ")[1] for ln in lines) == ["bogus", "heartbeat_timeout", "stop_timeout"]


def test_toml_syntax_error_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'pcibackd.toml'}: not valid TOML: .*line 2"):
        _load(tmp_path, "[pcibackd]\nheartbeat_timeout = = 1\n")


def test_unreadable_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"missing.toml: cannot read"):
        DaemonConfig.load(tmp_path / "missing.toml")


def test_unknown_table_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"\[guests\]: unknown table"):
        _load(tmp_path, "[pcibackd]\n[guests]\nx = 1\n")


def test_relations_between_settings(tmp_path):
    with pytest.raises(ConfigError, match="heartbeat_timeout .* must be longer than heartbeat_interval"):
        _load(tmp_path, "heartbeat_interval = 1.0\nheartbeat_timeout = 0.5\n")
    with pytest.raises(ConfigError, match="orphan_grace .* must be longer than heartbeat_interval"):
        _load(tmp_path, "heartbeat_interval = 1.0\nheartbeat_timeout = 5.0\norphan_grace = 0.5\n")
    # a long heartbeat_timeout alone is fine (slow emulators): a boot gets at least as long
    assert _load(tmp_path, "", heartbeat_timeout=30.0).heartbeat_timeout == 30.0


def test_flags_are_checked_too_and_named_as_flags(tmp_path):
    with pytest.raises(ConfigError, match=r"^--heartbeat-timeout: heartbeat_timeout: must be > 0"):
        _load(tmp_path, "", heartbeat_timeout=-1.0)


def test_good_values_are_normalised(tmp_path):
    cfg = _load(tmp_path, '[pcibackd]\nlog_level = "debug"\nheartbeat_timeout = 200\nrestart_stable_after = 0\n')
    assert cfg.log_level == "DEBUG" and cfg.heartbeat_timeout == 200.0 and isinstance(cfg.heartbeat_timeout, float)
    assert cfg.restart_stable_after == 0.0
    assert set(cfg.settings()) == set(SETTINGS)


def test_the_shipped_sample_is_valid():
    cfg = DaemonConfig.load(ETC / "pcibackd.toml")
    assert cfg.source.endswith("etc/pcibackd.toml") and cfg.runtime_dir == "/run/pcibackd"


def test_check_config_ok_and_bad(tmp_path, capsys):
    assert cli.main(["check-config", str(ETC / "pcibackd.toml")]) == 0
    out = capsys.readouterr().out
    assert "pcibackd.toml: ok" in out and "heartbeat_timeout = 90.0" in out
    bad = tmp_path / "bad.toml"
    bad.write_text("heartbeat_timeout = -3\n")
    assert cli.main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: heartbeat_timeout: must be > 0" in err and "Traceback" not in err
    assert cli.main(["check-config", "--quiet", str(ETC / "pcibackd.toml")]) == 0
    assert capsys.readouterr().out == ""
    assert cli.main(["check-config", "-q", str(bad)]) == 1
    assert "heartbeat_timeout" in capsys.readouterr().err


def test_check_config_checks_the_policy_it_names(tmp_path, capsys):
    policy = tmp_path / "policy.toml"
    policy.write_text("permissive = 7\n")
    conf = tmp_path / "pcibackd.toml"
    conf.write_text(f'policy_path = "{policy}"\n')
    assert cli.main(["check-config", str(conf)]) == 1
    assert f"{conf}: policy_path:" in capsys.readouterr().err
    assert cli.main(["check-config", str(ETC / "pcibackd.toml")]) == 0
    policy.write_text((ETC / "pcibackd-policy.toml").read_text())
    assert cli.main(["check-config", str(conf)]) == 0


def test_run_with_a_bad_config_exits_1_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[pcibackd\n")
    assert cli.main(["run", "--config", str(bad), "--platform", f"sim:{tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"pcibackd: {bad}: not valid TOML") and "Traceback" not in err


def test_version_flags(capsys):
    from pcibackd import __version__
    from pcibackd.control import cli as ctl
    for main in (cli.main, ctl.main):
        with pytest.raises(SystemExit) as exc:
            main(["--version"])
        assert exc.value.code == 0
        assert capsys.readouterr().out.strip().endswith(__version__)
