"""The xenstore gate beside a running daemon: a connection exactly like the one a
worker gets (paired by the supervisor's gate for its domid) tries what a guest that
took over its worker would try in xenstore, and fails; the gate outlives a killed
supervisor, and a killed gate costs only a worker restart."""

from __future__ import annotations

import os
import signal
import traceback
from pathlib import Path


from pcibackd.daemon.xsgate import XsGate
from pcibackd.wire.bdf import BDF
from pcibackd.wire.paths import backend_path, frontend_path
from pcibackd.wire.pciif import Err, XenbusState as S
from pcibackd.worker import privileges
from pcibackd.xenstore.client import Transaction, XenStore
from pcibackd.xenstore.codec import HEADER, PAYLOAD_MAX, Op
from pcibackd.xenstore.toolstack import Toolstack
from waiting import process_gone, wait_until

G0 = BDF(0, 0, 0, 0)
BE1, BE2, FE1, FE2 = backend_path(1), backend_path(2), frontend_path(1), frontend_path(2)
FREE = "0000:00:07.0"       # in the pool, assigned to nobody


def _guests(dom0):
    dom0.add_device("edu", "0000:00:05.0")
    dom0.add_device("pci-testdev", "0000:00:06.0")
    dom0.add_device("edu", FREE)
    dom0.create_guest(1, ["0000:00:05.0"])
    dom0.create_guest(2, ["0000:00:06.0"])
    f1, f2 = dom0.frontend(1), dom0.frontend(2)
    f1.connect(), f2.connect()
    for d in (1, 2):
        _running(dom0, d)
    return f1, f2


def _running(dom0, domid, not_pid=None):
    return wait_until(lambda: (g := dom0.guest_status(domid)) and g["worker_state"] == "RUNNING"
                      and g["pid"] not in (None, not_pid) and g, what=f"a RUNNING worker for dom{domid}")


def _gate(dom0) -> XsGate:
    return XsGate(dom0.runtime, spawner=None, xenstored_path=None)


def _as_worker(dom0, domid) -> XenStore:
    """A xenstore connection exactly as domid's worker gets one from the supervisor."""
    return XenStore(sock=_gate(dom0).pair(domid), timeout=5.0)


def _refused(action) -> bool:
    try:
        action()
    except PermissionError:
        return True
    return False


def test_a_worker_reaches_only_its_own_guests_nodes(dom0):
    _guests(dom0)
    xs = _as_worker(dom0, 1)
    try:
        # what a worker does
        assert xs.read(f"{BE1}/state") == "4" and xs.read(f"{BE1}/frontend") == FE1
        assert "state" in xs.ls(FE1) and xs.read(f"{FE1}/state") == "4"
        assert xs.exists(BE1) and xs.read("/local/domain/1/name") is not None
        xs.watch(BE1, "mine")
        assert wait_until(lambda: xs.events(), what="the watch's first event") == [(BE1, "mine")]
        xs.run_transaction(lambda t: t.write(f"{BE1}/state", t.read(f"{BE1}/state")))
        # what it must not
        attempts = {
            "read another guest's backend": lambda: xs.read(f"{BE2}/dev-0"),
            "list another guest's backend": lambda: xs.ls(BE2),
            "read another guest's frontend": lambda: xs.read(f"{FE2}/state"),
            "watch another guest's backend": lambda: xs.watch(BE2, "theirs"),
            "watch another guest's frontend": lambda: xs.watch(FE2, "theirs"),
            "write another guest's backend": lambda: xs.write(f"{BE2}/state", "6"),
            "remove another guest's backend": lambda: xs.rm(f"{BE2}/vdev-0"),
            "write its own frontend": lambda: xs.write(f"{FE1}/state", "6"),
            "list a free function in its own backend": lambda: xs.write(f"{BE1}/dev-1", FREE),
            "count it in": lambda: xs.write(f"{BE1}/num_devs", "2"),
            "write its own opts-0": lambda: xs.write(f"{BE1}/opts-0", "permissive=1"),
            "point its frontend elsewhere": lambda: xs.write(f"{BE1}/frontend", FE2),
            "remove its dev-0": lambda: xs.rm(f"{BE1}/dev-0"),
            "set permissions": lambda: xs.set_perms(BE1, ["n1"]),
            "make a directory": lambda: xs.mkdir(f"{BE1}/extra"),
            "introduce a domain": lambda: xs._call(Op.INTRODUCE, b"7\0" b"1234\0" b"5\0"),
            "release a domain": lambda: xs._call(Op.RELEASE, b"2\0"),
            "get another domain's path": lambda: xs._call(Op.GET_DOMAIN_PATH, b"2\0"),
            "reset watches": lambda: xs._call(21, b""),
            "watch domains come and go": lambda: xs.watch("@introduceDomain", "t"),
            "read dom0's own nodes": lambda: xs.read("/local/domain/0/name"),
            "use a relative path": lambda: xs.read("backend/pci/2/0/dev-0"),
        }
        passed = [what for what, action in attempts.items() if not _refused(action)]
        assert passed == []
        assert xs.connected          # a refusal is an answer, not a broken connection
        assert xs.read(f"{BE1}/state") == "4"
    finally:
        xs.close()
    assert dom0.xs.read(f"{BE1}/dev-1") is None and dom0.xs.read(f"{BE1}/num_devs") == "1"
    assert dom0.xs.read(f"{BE1}/opts-0") != "permissive=1" and dom0.xs.read(f"{BE2}/state") == "4"
    assert dom0.xs.get_perms(BE1)[0] == "n0"
    wait_until(lambda: "xenstore gate: refused domain 1's worker" in dom0.log_tail(400),
               what="the refusals in the log")


def test_another_connections_transaction_cannot_be_used(dom0):
    _guests(dom0)
    mine, same_guest, other = (_as_worker(dom0, d) for d in (1, 1, 2))
    try:
        tx = mine.transaction()
        tx_id = tx._tx_id
        assert tx.read(f"{BE1}/state") == "4"
        for conn in (same_guest, other):
            stolen = Transaction(conn._router, tx_id, 5.0)
            assert _refused(lambda: stolen.read(f"{BE1}/state"))
            assert _refused(lambda: stolen.write(f"{BE1}/state", "6"))
            assert _refused(stolen.commit)
        tx.abort()
        assert _refused(lambda: Transaction(mine._router, tx_id, 5.0).read(f"{BE1}/state"))   # ended
        assert _refused(lambda: Transaction(mine._router, tx_id + 1000, 5.0).read(f"{BE1}/state"))  # guessed
    finally:
        for conn in (mine, same_guest, other):
            conn.close()
    assert dom0.xs.read(f"{BE1}/state") == "4"


def test_the_gate_outlives_a_killed_supervisor_and_serves_the_adopted_workers(dom0):
    f1, _ = _guests(dom0)
    gate = _gate(dom0).ping()
    pid1 = dom0.guest_status(1)["pid"]
    dom0.stop_daemon(signal.SIGKILL)
    assert _gate(dom0).ping()["pid"] == gate["pid"]
    dom0.start_daemon()
    assert _running(dom0, 1)["pid"] == pid1 and dom0.guest_status(1)["adopted"]
    assert _gate(dom0).ping()["pid"] == gate["pid"]
    # the adopted worker still follows xenstore through the gate: a hot-plug reaches the guest
    xs = XenStore(dom0.xenstored.socket_path)
    try:
        Toolstack(xs).attach(1, BDF.parse(FREE), wait=False)
    finally:
        xs.close()
    wait_until(lambda: (f1.follow(timeout=0.05), len(f1.devices) == 2)[1], what="the hot-plugged device")
    assert dom0.guest_status(1)["pid"] == pid1
    assert f1.conf_read(G0, 0, 2) == (Err.success, 0x1234)


def test_a_killed_gate_costs_a_worker_restart_and_is_replaced(dom0):
    f1, f2 = _guests(dom0)
    old = _gate(dom0).ping()["pid"]
    pids = {d: dom0.guest_status(d)["pid"] for d in (1, 2)}
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: process_gone(old), what="the gate gone")
    for d in (1, 2):
        _running(dom0, d, not_pid=pids[d])
    assert _gate(dom0).ping()["pid"] != old
    assert f1.state() == S.Connected and f1.conf_read(G0, 0, 2) == (Err.success, 0x1234)
    assert f2.conf_read(G0, 0, 2) == (Err.success, 0x1b36)


def _own_uid_worker(sock, xenstored_socket: str) -> int:
    """In the child: become domain 1's worker uid, then try xenstore both ways."""
    uid = privileges.worker_uid(privileges.DEFAULT_UID_BASE, 1)
    privileges.drop(uid=uid, gid=uid)
    xs = XenStore(sock=sock, timeout=5.0)
    if xs.read(f"{BE1}/state") != "4":
        return 20
    failures = 0
    if not _refused(lambda: xs.read(f"{BE2}/dev-0")):
        failures += 1
    if not _refused(lambda: XenStore(xenstored_socket).close()):       # around the gate
        failures += 1
    xs.close()
    return 10 + failures


def test_under_its_own_uid_a_worker_has_no_way_around_the_gate(dom0):
    """Only with a uid of its own: a uid 0 worker could still connect to xenstored's
    root-owned socket (Landlock does not mediate connect)."""
    _guests(dom0)
    for d in (dom0.dir, Path(dom0.xenstored.socket_path).parent):
        os.chmod(d, 0o711)       # only the socket's own mode stands in the way, as in /var/run/xenstored
    sock = _gate(dom0).pair(1)
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(_own_uid_worker(sock, dom0.xenstored.socket_path))
        except BaseException:
            traceback.print_exc()
            os._exit(99)
    sock.close()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 10


def test_a_garbled_or_flooding_connection_costs_only_itself(dom0):
    _guests(dom0)
    garbled, flood = _gate(dom0).pair(1), _gate(dom0).pair(1)
    other = _as_worker(dom0, 2)
    try:
        garbled.sendall(HEADER.pack(Op.READ, 1, 0, PAYLOAD_MAX + 1) + b"x" * 64)      # a length past the limit
        garbled.settimeout(10.0)
        assert garbled.recv(64) == b""          # that pair is closed, nothing else
        # many requests, no reply ever read: the gate stops reading this worker, not the others
        request = HEADER.pack(Op.READ, 1, 0, len(f"{BE1}/state\0")) + f"{BE1}/state\0".encode()
        flood.setblocking(False)
        sent = 0
        try:
            while sent < 64 << 20:
                sent += flood.send(request * 256)
        except BlockingIOError:
            pass
        assert sent < 64 << 20, "the gate kept reading a worker that reads nothing"
        for _ in range(20):
            assert other.read(f"{BE2}/state") == "4"
        assert other.connected
    finally:
        for s in (garbled, flood):
            s.close()
        other.close()
    assert _gate(dom0).ping()["links"] >= 2       # the workers' own pairs are still served
