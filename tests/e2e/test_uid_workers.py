"""Real workers under uids of their own: the kernel shows their ids and no
capability in any thread; each writes only its own state directory; a process
holding a worker's uid and gid (and nothing of Landlock or seccomp: the ids
alone must stop it) reaches nothing of another guest or of the daemon; a
supervisor killed and restarted adopts them and talks to them again."""

from __future__ import annotations

import grp
import os
import signal
import stat
from pathlib import Path

import pytest

from pcibackd.control.client import call
from pcibackd.hostpci.sysfs import devices_dir
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import Err
from pcibackd.worker import privileges
from helpers import Refusals, connect_unix, in_child
from simdom0.dom0 import SimDom0
from waiting import wait_until

MINE, THEIRS = "0000:00:05.0", "0000:00:06.0"
G0 = BDF(0, 0, 0, 0)
MONITOR = grp.getgrnam("nogroup")          # an existing group stands for pcibackd-monitor
ZERO = "0" * 16


def uid_of(domid: int) -> int:
    return privileges.worker_uid(privileges.DEFAULT_UID_BASE, domid)


@pytest.fixture
def guests():
    with SimDom0(log_level="DEBUG", config={"status_group": MONITOR.gr_name, "orphan_grace": 60.0}) as dom0:
        dom0.start()
        dom0.add_device("edu", MINE)
        dom0.add_device("pci-testdev", THEIRS)
        dom0.create_guest(1, [MINE])
        dom0.create_guest(2, [THEIRS])
        fronts = dom0.frontend(1), dom0.frontend(2)
        for f in fronts:
            f.connect()
        for d in (1, 2):
            running(dom0, d)
        try:
            yield dom0, fronts
        except BaseException:
            print(dom0.log_tail(80))
            raise


def running(dom0, domid: int) -> dict:
    return wait_until(lambda: (g := dom0.guest_status(domid)) and g["worker_state"] == "RUNNING" and g,
                      what=f"a RUNNING worker for dom{domid}")


def proc_status(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def test_each_worker_has_its_own_ids_and_no_capability_in_any_thread(guests):
    dom0, _ = guests
    for domid in (1, 2):
        pid, uid = running(dom0, domid)["pid"], uid_of(domid)
        threads = sorted((Path(f"/proc/{pid}/task")).iterdir())
        assert len(threads) >= 2                     # ZeroMQ's threads, started before the drop
        for task in threads:
            st = proc_status(task / "status")
            assert st["Uid"].split() == [str(uid)] * 4, (domid, task.name, st["Uid"])
            assert st["Gid"].split() == [str(uid)] * 4, (domid, task.name, st["Gid"])
            assert st["Groups"] == ""
            for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb", "CapBnd"):
                assert st[cap] == ZERO, (domid, task.name, cap, st[cap])
            assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", (domid, task.name)


def test_each_worker_writes_only_its_own_state_directory(guests):
    dom0, (f1, _) = guests
    assert f1.conf_write(G0, 0x10, 4, 0xFFFFFFFF) == Err.success      # a change: a snapshot
    state = dom0.runtime / "state"
    st = state.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o711)          # searchable, not listable
    for domid in (1, 2):
        own = state / f"dom{domid}"
        st = own.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid_of(domid), uid_of(domid), 0o700)
    snap = state / "dom1" / f"{MINE}.snap"
    assert wait_until(snap.exists, what="dom1's snapshot")
    assert snap.stat().st_uid == uid_of(1)


def _as_worker_uid(dom0, domid: int, supervisor: int, other_worker: int) -> list[str]:
    """In a child holding ``domid``'s worker uid and gid: each attempt that should fail and did not."""
    refusals = Refusals()
    must_fail, connect = refusals.must_fail, connect_unix

    run = dom0.runtime
    theirs = devices_dir(dom0.sim_dir / "pci") / THEIRS
    must_fail("read another worker's snapshot", lambda: open(run / "state" / "dom2" / f"{THEIRS}.snap", "rb").close())
    must_fail("list another worker's state", lambda: os.listdir(run / "state" / "dom2"))
    must_fail("list the shared state", lambda: os.listdir(run / "state"))
    must_fail("plant a file in the shared state", lambda: open(run / "state" / f"{THEIRS}.quarantine", "w").close())
    must_fail("open another function's config for writing", lambda: os.close(os.open(theirs / "config", os.O_RDWR)))
    must_fail("connect to the control socket", lambda: connect(run / "control.sock"))
    must_fail("connect to the status socket", lambda: connect(run / "status.sock"))
    must_fail("read the interrupt journal", lambda: os.listdir(run / "irq"))
    must_fail("open the interrupt journal", lambda: open(run / "irq" / "dom2.json", "rb").close())
    must_fail("take another function's claim", lambda: os.close(os.open(run / "claims" / f"{THEIRS}.lock", os.O_RDONLY)))
    must_fail("read a pid file", lambda: open(run / "workers" / "dom2.pid").close())
    must_fail("signal another guest's worker", lambda: os.kill(other_worker, 0))
    must_fail("signal the supervisor", lambda: os.kill(supervisor, 0))
    # what it may: its own directory (so the refusals above are the ids' doing)
    (run / "state" / f"dom{domid}" / "probe").write_bytes(b"mine")
    (run / "state" / f"dom{domid}" / "probe").unlink()
    return refusals.unexpected


def test_a_process_with_a_workers_ids_reaches_nothing_else(guests):
    dom0, _ = guests
    other = running(dom0, 2)["pid"]
    for target in ("status.sock", f"state/dom2/{THEIRS}.snap", f"claims/{THEIRS}.lock", "workers/dom2.pid"):
        assert (dom0.runtime / target).exists(), target      # each attempt aims at something real

    def attempts() -> list[str]:
        privileges.drop(uid=uid_of(1), gid=uid_of(1))
        return _as_worker_uid(dom0, 1, dom0.daemon.pid, other)
    assert in_child(attempts) == ""


def test_a_restarted_supervisor_adopts_uid_workers_and_reaches_them(guests):
    dom0, (f1, f2) = guests
    pids = {d: running(dom0, d)["pid"] for d in (1, 2)}
    dom0.stop_daemon(signal.SIGKILL)
    assert f1.conf_read(G0, 0, 2) == (Err.success, 0x1234)             # served with no supervisor
    dom0.start_daemon()
    for d in (1, 2):
        g = running(dom0, d)
        assert g["pid"] == pids[d] and g["adopted"]
    # a command needs the worker's own connection to the new supervisor's socket
    reply = call(dom0.runtime, "permissive", {"mode": "on", "bdf": MINE})
    assert reply["status"] == "ok", reply
    wait_until(lambda: dom0.guest_status(1)["devices"][0]["permissive"], what="the adopted worker's report")
    assert f2.conf_read(G0, 0, 2) == (Err.success, 0x1b36)
    assert proc_status(Path(f"/proc/{pids[1]}/status"))["Uid"].split()[0] == str(uid_of(1))
