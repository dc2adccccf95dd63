"""The demo as a front door: --keep-running prints a pcibackctl line that works;
SIGTERM and Ctrl-C (SIGINT to the whole process group) stop everything it
started, without tracebacks; --help states the limits."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from waiting import wait_until


def _start_demo(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "simdom0", "demo", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _read_until(proc: subprocess.Popen, pattern: str) -> tuple[list[str], re.Match]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        m = re.search(pattern, line)
        if m:
            return lines, m
    raise AssertionError(f"demo ended before {pattern!r}:\n{''.join(lines)}\n{proc.stderr.read()}")


def _everything(proc: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def _title(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:          # exited meanwhile
        return ""


def _assert_all_gone(tree: list[psutil.Process], sim_dir: Path) -> None:
    _, alive = psutil.wait_procs(tree, timeout=20)
    assert not alive, [(p.pid, p.cmdline()) for p in alive if p.is_running()]
    assert not sim_dir.exists()


@pytest.mark.parametrize("how", ["SIGTERM", "ctrl-c"])
def test_keep_running_then_stop(how):
    demo = _start_demo("--guests", "2", "--duration", "0.2", "--keep-running")
    try:
        head, _ = _read_until(demo, r"simulated dom0 in (\S+)")
        sim_dir = Path(re.search(r"simulated dom0 in (\S+)", head[0]).group(1))
        lines, m = _read_until(demo, r"^\s+(\S*pcibackctl --runtime-dir \S+ status)\s*$")
        ctl = subprocess.run(shlex.split(m.group(1)), capture_output=True, text=True, timeout=30)
        assert ctl.returncode == 0, ctl.stderr
        assert "2 guest(s)" in ctl.stdout
        tree = wait_until(lambda: (t := _everything(demo)) and
                          sum(_title(p).startswith("pcibackd: worker") for p in t) == 2 and t,
                          timeout=60, what="both workers in the demo's process tree")
        if how == "SIGTERM":
            demo.send_signal(signal.SIGTERM)
        else:                                   # a terminal's Ctrl-C: the whole foreground group
            os.killpg(demo.pid, signal.SIGINT)
        out, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 0, err
    assert "Traceback" not in out + err and "stopping everything" in err
    _assert_all_gone(tree, sim_dir)


def test_sigterm_mid_run_exits_143_and_cleans_up():
    demo = _start_demo("--guests", "1", "--duration", "30")
    try:
        head, _ = _read_until(demo, r"simulated dom0 in (\S+)")
        sim_dir = Path(re.search(r"simulated dom0 in (\S+)", head[0]).group(1))
        _read_until(demo, r"dom1: 0000:00:00\.0")          # the guest connected: traffic is running
        tree = _everything(demo)
        demo.send_signal(signal.SIGTERM)
        out, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 143 and "Traceback" not in out + err, err
    _assert_all_gone(tree, sim_dir)


def test_help_states_the_limits():
    p = subprocess.run([sys.executable, "-m", "simdom0", "demo", "--help"], capture_output=True, text=True)
    assert p.returncode == 0
    for words in ("1..64", "PV guests", "--keep-running", "--lspci", "no host device touched"):
        assert words in p.stdout
