"""A worker-like process under its own uid, holding the descriptors the device
gate lent it: it serves its own function through them and reaches nothing else
(another function's config, the control socket, the runtime state)."""

from __future__ import annotations

import errno
import os
import socket
import traceback

import pytest

from pcibackd.daemon.devicegate import DeviceGate
from pcibackd.hostpci.sysfs import devices_dir
from pcibackd.wire.bdf import BDF
from pcibackd.worker import privileges, seccomp
from pcibackd.worker.devicegate import GateOpener
from simdom0.platform import SimPlatform

MINE, THEIRS = BDF.parse("0000:00:05.0"), BDF.parse("0000:00:06.0")
DOMID = 1


@pytest.fixture
def setup(sim_dom0):
    sim_dom0.add_device("edu", MINE)
    sim_dom0.add_device("edu", THEIRS)
    sim_dom0.create_guest(DOMID, [MINE])
    sim_dom0.create_guest(2, [THEIRS])
    for d in (sim_dom0.dir, sim_dom0.sim_dir):      # the harness's scratch dirs are private
        os.chmod(d, 0o711)
    runtime = sim_dom0.runtime
    runtime.mkdir(mode=0o711, exist_ok=True)
    state = runtime / "state"
    state.mkdir(mode=0o700)
    (state / "dom2-0000:00:06.0.snap").write_bytes(b"another guest's state")
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.bind(str(runtime / "control.sock"))
    os.chmod(runtime / "control.sock", 0o600)
    control.listen(1)
    workers = {}
    gate = DeviceGate(runtime / "devices.sock", SimPlatform(sim_dom0.sim_dir, 0), runtime / "claims",
                      workers.get, sim_dom0.xenstored.socket_path, mode=0o666)
    gate.start()
    yield sim_dom0, workers
    gate.close()
    control.close()


def _worker_like(sim_dom0) -> int:
    """Run in the child: claim through the gate, drop everything, then try."""
    uid = privileges.worker_uid(privileges.DEFAULT_UID_BASE, DOMID)
    claim, port = GateOpener(SimPlatform(sim_dom0.sim_dir, 0), sim_dom0.runtime / "devices.sock").claim(MINE)
    privileges.drop(uid=uid, gid=uid)
    seccomp.install()
    # its own function, through the lent descriptors
    if port.read(0, 2) != 0x1234:
        return 20
    port.write(0x04, 2, port.read(0x04, 2))
    failures = 0
    # another guest's function: neither through the gate nor directly
    try:
        GateOpener(SimPlatform(sim_dom0.sim_dir, 0), sim_dom0.runtime / "devices.sock").claim(THEIRS)
        failures += 1
    except PermissionError:
        pass
    try:
        os.open(devices_dir(sim_dom0.sim_dir / "pci") / str(THEIRS) / "config", os.O_RDWR)
        failures += 1
    except PermissionError:
        pass
    # the control socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(sim_dom0.runtime / "control.sock"))
            failures += 1
        except PermissionError:
            pass
    # the runtime state (another guest's snapshot, the claims)
    for path in (sim_dom0.runtime / "state" / "dom2-0000:00:06.0.snap", sim_dom0.runtime / "claims" / f"{THEIRS}.lock"):
        try:
            open(path, "rb").close()
            failures += 1
        except PermissionError:
            pass
    try:
        os.execv("/bin/true", ["true"])
    except PermissionError:
        pass
    st = privileges.status()
    if st["CapEff"] != "0" * 16 or st["CapPrm"] != "0" * 16:
        failures += 1
    os.close(claim)
    return 10 + failures


def test_a_worker_under_its_own_uid_reaches_only_its_own_function(setup):
    sim_dom0, workers = setup
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.read(rfd, 1)              # wait until the gate knows this pid as dom1's worker
            os._exit(_worker_like(sim_dom0))
        except BaseException:
            traceback.print_exc()
            os._exit(99)
    workers[pid] = (DOMID, f"/local/domain/0/backend/pci/{DOMID}/0")
    os.write(wfd, b"x")
    _, status = os.waitpid(pid, 0)
    os.close(rfd)
    os.close(wfd)
    assert os.waitstatus_to_exitcode(status) == 10


def test_worker_uids_are_one_per_guest():
    base = privileges.DEFAULT_UID_BASE
    assert privileges.worker_uid(base, 0) == base and privileges.worker_uid(base, 7) == base + 7
    for bad in (-1, 0x7FF0):
        with pytest.raises(ValueError):
            privileges.worker_uid(base, bad)
