"""The private oxenstored launcher and the native build helper it relies on."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

pyxs = pytest.importorskip("pyxs")

from simdom0.native import build  # noqa: E402
from simdom0.xenstored import Xenstored, XenstoredError, find_oxenstored  # noqa: E402
from waiting import wait_until  # noqa: E402

pytestmark = pytest.mark.skipif(find_oxenstored() is None, reason="oxenstored not installed")

HOST_DIRS = ("/var/run/xenstored", "/run/xenstored")
REPO = Path(__file__).resolve().parents[2]


def host_state() -> dict[str, object]:
    """Everything observable about the host's xenstored run dir."""
    state: dict[str, object] = {}
    for d in HOST_DIRS:
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            state[d] = None
            continue
        state[d] = (st.st_ino, st.st_mtime_ns, sorted(os.listdir(d)) if os.path.isdir(d) else None)
    return state


def bound_unix_paths() -> set[str]:
    """Paths of all bound AF_UNIX sockets on the host (from /proc/net/unix)."""
    paths = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7].startswith("/"):
                paths.add(fields[7])
    return paths


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # Not our child in these tests (or already reaped): only a zombie-free
    # disappearance counts; /proc/PID/stat shows Z for an unreaped one.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture
def xenstored():
    with Xenstored.start() as xsd:
        yield xsd


def test_read_write_through_pyxs(xenstored):
    with pyxs.Client(unix_socket_path=xenstored.socket_path) as c:
        c.write(b"/local/domain/0/name", b"Domain-0")
        assert c.read(b"/local/domain/0/name") == b"Domain-0"
        assert b"local" in c.list(b"/")


def test_env_points_clients_at_the_instance(xenstored, monkeypatch):
    assert xenstored.env == {"XENSTORED_PATH": xenstored.socket_path}
    for k, v in xenstored.env.items():
        monkeypatch.setenv(k, v)
    with pyxs.Client() as c:  # default path comes from XENSTORED_PATH
        c.write(b"/probe", b"1")
        assert c.read(b"/probe") == b"1"


def test_two_instances_run_in_parallel_isolated():
    with Xenstored.start() as a, Xenstored.start() as b:
        assert a.pid != b.pid
        assert a.socket_path != b.socket_path
        assert a.workdir != b.workdir
        with pyxs.Client(unix_socket_path=a.socket_path) as ca, pyxs.Client(unix_socket_path=b.socket_path) as cb:
            ca.write(b"/only-in-a", b"x")
            cb.write(b"/only-in-b", b"y")
            assert not cb.exists(b"/only-in-a")
            assert not ca.exists(b"/only-in-b")
            assert ca.read(b"/only-in-a") == b"x"


def host_sockets() -> set[str]:
    return {p for p in bound_unix_paths() if p.startswith(tuple(d + "/" for d in HOST_DIRS))}


def test_never_binds_or_touches_host_run_dir():
    before, sockets_before = host_state(), host_sockets()
    with Xenstored.start() as xsd:
        with pyxs.Client(unix_socket_path=xsd.socket_path) as c:
            c.write(b"/x", b"1")
        assert xsd.socket_path in bound_unix_paths()
        assert host_sockets() == sockets_before
        # The daemon's own files (pid, logs) are in the instance dir.
        assert (xsd.workdir / "xenstored.pid").read_text().strip() == str(xsd.pid)
        assert (xsd.workdir / "xenstored.log").exists()
    # On SIGTERM oxenstored dumps its db to /var/run/xenstored/db: redirected too.
    assert host_state() == before


@pytest.mark.skipif(os.path.exists("/var/run/xenstored/socket"), reason="a real xenstored runs here")
def test_stub_fails_closed_without_instance_dir(tmp_path):
    """Without PCIBACKD_XS_RUNDIR the stub refuses host paths instead of passing them through."""
    before = host_state()
    conf = tmp_path / "oxenstored.conf"
    conf.write_text(f"pid-file = {tmp_path}/pid\nxenstored-log-file = {tmp_path}/log\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCIBACKD_XS_")}
    env["LD_PRELOAD"] = str(build.native_lib("xsstub"))
    proc = subprocess.run(
        [find_oxenstored(), "--no-fork", "--no-domain-init", "--no-access-log", "--config-file", str(conf)],
        env=env, capture_output=True, timeout=10, check=False,
    )
    assert proc.returncode != 0
    assert b"Permission denied" in proc.stdout + proc.stderr  # the stub's EACCES
    assert host_state() == before


def test_stop_kills_reaps_and_removes_dir():
    xsd = Xenstored.start()
    pid, workdir = xsd.pid, xsd.workdir
    assert xsd.alive() and workdir.is_dir()
    xsd.stop()
    assert not xsd.alive()
    with pytest.raises(ProcessLookupError):  # reaped, not a zombie
        os.kill(pid, 0)
    assert not workdir.exists()
    xsd.stop()  # idempotent


def test_ready_when_started():
    """start() returns once the daemon answers: the first request needs no retry."""
    with Xenstored.start() as xsd:
        with pyxs.Client(unix_socket_path=xsd.socket_path) as c:
            assert c.exists(b"/")


def test_exception_inside_with_still_cleans_up():
    seen = {}
    with pytest.raises(RuntimeError, match="test blew up"):
        with Xenstored.start() as xsd:
            seen.update(pid=xsd.pid, workdir=xsd.workdir)
            raise RuntimeError("test blew up")
    with pytest.raises(ProcessLookupError):
        os.kill(seen["pid"], 0)
    assert not seen["workdir"].exists()


def test_caller_workdir_is_used_and_removed(tmp_path):
    workdir = tmp_path / "xs"
    with Xenstored.start(workdir) as xsd:
        assert xsd.workdir == workdir
        assert Path(xsd.socket_path).parent == workdir
        assert (workdir / "oxenstored.conf").read_text().count(str(workdir)) >= 3
    assert not workdir.exists()


def test_nonempty_workdir_rejected(tmp_path):
    (tmp_path / "junk").write_text("x")
    with pytest.raises(XenstoredError, match="not empty"):
        Xenstored.start(tmp_path)
    assert (tmp_path / "junk").exists()


def test_too_long_socket_path_rejected_and_cleaned(tmp_path):
    workdir = tmp_path / ("d" * 120)
    with pytest.raises(XenstoredError, match="too long"):
        Xenstored.start(workdir)
    assert not workdir.exists()


def test_start_failure_reports_daemon_output(tmp_path):
    fake = tmp_path / "fake-oxenstored"
    fake.write_text("#!/bin/sh\necho 'fatal: cannot frobnicate' >&2\nexit 3\n")
    fake.chmod(0o755)
    workdir = tmp_path / "xs"
    with pytest.raises(XenstoredError) as info:
        Xenstored.start(workdir, binary=str(fake))
    assert "exited with status 3" in str(info.value)
    assert "cannot frobnicate" in str(info.value)
    assert not workdir.exists()


def wait_for_text(path: Path, needle: str) -> None:
    wait_until(lambda: path.exists() and needle in path.read_text(errors="replace"), timeout=5.0,
               what=f"{needle!r} in {path}")


def test_config_overrides_and_access_log_reach_the_daemon():
    with Xenstored.start(access_log=True, config={"xenstored-log-level": "debug", "merge-activate": False}) as xsd:
        text = (xsd.workdir / "oxenstored.conf").read_text()
        assert "xenstored-log-level = debug\n" in text and "merge-activate = false\n" in text
        with pyxs.Client(unix_socket_path=xsd.socket_path) as c:
            c.write(b"/probe", b"1")
        wait_for_text(xsd.workdir / "access.log", "write     /probe")
        wait_for_text(xsd.log_path, "|debug|")  # only logged at the overridden level


def test_access_log_off_by_default(xenstored):
    with pyxs.Client(unix_socket_path=xenstored.socket_path) as c:
        c.write(b"/probe", b"1")
    assert not (xenstored.workdir / "access.log").exists()
    assert "|debug|" not in xenstored.log_tail(1000)


_CHILD = textwrap.dedent(
    """
    import os, sys
    from simdom0.xenstored import Xenstored
    xsd = Xenstored.start()
    print(xsd.pid, xsd.workdir, flush=True)
    if sys.argv[1] == "hard":
        os._exit(0)  # no atexit: only PR_SET_PDEATHSIG can stop the daemon
    """
)


@pytest.mark.parametrize("how", ["atexit", "hard"])
def test_daemon_dies_with_its_parent(how):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, how], env=env, capture_output=True, text=True, timeout=30, check=True
    ).stdout
    pid_s, workdir_s = out.split()
    wait_until(lambda: gone(int(pid_s)), timeout=5.0, what=f"the daemon (pid {pid_s}) gone")
    workdir = Path(workdir_s)
    if how == "hard":
        # Nobody could clean up; the next start sweeps it (or a concurrent
        # test run's start already did).
        with Xenstored.start():
            pass
    assert not workdir.exists()


def test_start_sweeps_only_dirs_of_dead_owners():
    dead = Path(tempfile.mkdtemp(prefix="pcibackd-xs-"))
    live = Path(tempfile.mkdtemp(prefix="pcibackd-xs-"))
    foreign = Path(tempfile.mkdtemp(prefix="pcibackd-xs-"))  # no owner file: not ours
    try:
        (dead / "owner").write_text("999999999 12345\n")  # pid beyond pid_max: dead
        with open(f"/proc/{os.getpid()}/stat") as f:
            started = f.read().rsplit(")", 1)[1].split()[19]
        (live / "owner").write_text(f"{os.getpid()} {started}\n")
        with Xenstored.start():
            pass
        assert not dead.exists()
        assert live.exists() and foreign.exists()
    finally:
        for d in (dead, live, foreign):
            shutil.rmtree(d, ignore_errors=True)


def test_forked_child_does_not_stop_parents_daemon(xenstored):
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=Xenstored._stop_all)  # what atexit would run in the child
    proc.start()
    proc.join(10)
    assert proc.exitcode == 0
    assert xenstored.alive()
    with pyxs.Client(unix_socket_path=xenstored.socket_path) as c:
        assert c.exists(b"/")


# -- native build -------------------------------------------------------------


@pytest.fixture
def scratch_native(tmp_path, monkeypatch):
    src_dir = tmp_path / "native"
    src_dir.mkdir()
    (src_dir / "probe.c").write_text("int probe_answer(void) { return 42; }\n")
    monkeypatch.setattr(build, "SOURCE_DIR", src_dir)
    return src_dir


def test_native_lib_builds_loadable_object(scratch_native):
    so = build.native_lib("probe")
    assert so == scratch_native / "probe.so"
    assert ctypes.CDLL(str(so)).probe_answer() == 42


def test_native_lib_rebuilds_only_when_source_is_newer(scratch_native):
    so = build.native_lib("probe")
    first = so.stat().st_ino
    assert build.native_lib("probe").stat().st_ino == first  # fresh: not rebuilt
    src = scratch_native / "probe.c"
    src.write_text("int probe_answer(void) { return 43; }\n")
    newer = so.stat().st_mtime_ns + 1_000_000_000
    os.utime(src, ns=(newer, newer))
    rebuilt = build.native_lib("probe")
    assert rebuilt.stat().st_ino != first  # replaced by rename, not rewritten in place
    assert ctypes.CDLL(str(rebuilt)).probe_answer() == 43


def _build_probe(_):
    return str(build.native_lib("probe"))


def test_native_lib_concurrent_builders_agree(scratch_native):
    ctx = multiprocessing.get_context("fork")  # children inherit the monkeypatched SOURCE_DIR
    with ctx.Pool(6) as pool:
        paths = pool.map(_build_probe, range(12))
    assert set(paths) == {str(scratch_native / "probe.so")}
    assert sorted(p.name for p in scratch_native.iterdir()) == ["probe.c", "probe.so"]  # no temp files
    assert ctypes.CDLL(paths[0]).probe_answer() == 42


def test_native_lib_uses_cache_when_package_dir_readonly(scratch_native, tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(build.os, "access", lambda p, m: False if Path(p) == scratch_native else real_access(p, m))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    so = build.native_lib("probe")
    assert so.parent == tmp_path / "cache" / "pcibackd" / "native"
    assert so.name.startswith("probe-") and so.suffix == ".so"
    assert not (scratch_native / "probe.so").exists()
    assert ctypes.CDLL(str(so)).probe_answer() == 42


def test_native_lib_reports_compiler_errors(scratch_native):
    (scratch_native / "broken.c").write_text("this is not C\n")
    with pytest.raises(build.NativeBuildError, match="broken.c"):
        build.native_lib("broken")
    assert not (scratch_native / "broken.so").exists()


def test_build_module_entry_point_builds_everything():
    proc = subprocess.run(
        [sys.executable, "-m", "simdom0.native.build"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    built = [Path(line) for line in proc.stdout.split()]
    assert any(p.name.startswith("xsstub") for p in built)
    assert all(p.is_file() for p in built)


def test_shutil_which_wrapper_is_not_picked():
    path = find_oxenstored()
    assert path is not None
    assert "xen-utils-wrapper" not in os.path.realpath(path)
    assert shutil.which(path)
