"""The device gate: a worker gets descriptors for its own guest's functions and
nothing else (another guest's function, one another worker holds, or anything
at all when the asker is not a worker)."""

from __future__ import annotations

import errno
import socket
import os

import pytest

from pcibackd.daemon.devicegate import DeviceGate
from pcibackd.hostpci.release import ReleaseRecord
from pcibackd.hostpci.records import write_record
from pcibackd.wire.bdf import BDF
from pcibackd.worker.devicegate import GateOpener, ask_gate
from simdom0.platform import SimPlatform

MINE, THEIRS = BDF.parse("0000:00:05.0"), BDF.parse("0000:00:06.0")


@pytest.fixture
def gate(sim_dom0):
    sim_dom0.add_device("edu", MINE)
    sim_dom0.add_device("edu", THEIRS)
    sim_dom0.create_guest(1, [MINE])
    sim_dom0.create_guest(2, [THEIRS])
    workers = {os.getpid(): (1, "/local/domain/0/backend/pci/1/0")}
    sim_dom0.runtime.mkdir(parents=True, exist_ok=True)
    g = DeviceGate(sim_dom0.runtime / "devices.sock", SimPlatform(sim_dom0.sim_dir, 0),
                   sim_dom0.runtime / "claims", workers.get, sim_dom0.xenstored.socket_path)
    g.start()
    yield g
    g.close()


def test_worker_gets_its_own_function(gate, sim_dom0):
    claim, port = GateOpener(SimPlatform(sim_dom0.sim_dir, 0), gate.path).claim(MINE)
    try:
        assert port.read(0, 2) == 0x1234                    # the edu device's vendor id
        port.write(0x04, 2, port.read(0x04, 2))              # served writable
        # a second claim of a held function is refused before any file is opened
        with pytest.raises(OSError) as exc:
            ask_gate(gate.path, "claim", MINE)
        assert exc.value.errno == errno.EBUSY
    finally:
        os.close(claim)
        port.close()
    files = ask_gate(gate.path, "claim", MINE)               # the claim went with its descriptor
    assert set(files) == {"claim", "config", "log"}
    for fd in files.values():
        os.close(fd)


@pytest.mark.parametrize("op", ["claim", "peek"])
def test_worker_cannot_get_another_guests_function(gate, op):
    with pytest.raises(PermissionError, match="not assigned to domain 1"):
        ask_gate(gate.path, op, THEIRS)
    assert gate.refused == 1


def test_a_process_that_is_no_worker_gets_nothing(gate):
    pid = os.fork()
    if pid == 0:          # another pid: the gate knows it from the kernel, not from the request
        try:
            ask_gate(gate.path, "peek", MINE)
            os._exit(0)
        except OSError as exc:
            os._exit(10 if exc.errno == errno.ESRCH else 11)
        except BaseException:
            os._exit(12)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 10


def test_malformed_requests_are_refused(gate):
    for raw in (b"", b"{", b'{"op": "exec", "bdf": "0000:00:05.0"}', b'{"op": "claim", "bdf": "nope"}', b"\xff" * 300):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(5)
            s.connect(str(gate.path))
            s.send(raw)
            answer, fds, _, _ = socket.recv_fds(s, 1024, 4)
        assert fds == [] and b'"ok": false' in answer


class _NothingAssignable(SimPlatform):
    def assignable(self):
        return []


def test_a_listed_function_dom0_uses_is_not_lent(sim_dom0):
    """A worker can write xenstore: listing dom0's own device in its backend gets it nothing."""
    sim_dom0.add_device("edu", MINE)
    sim_dom0.create_guest(1, [MINE])
    sim_dom0.runtime.mkdir(parents=True, exist_ok=True)
    g = DeviceGate(sim_dom0.runtime / "devices.sock", _NothingAssignable(sim_dom0.sim_dir, 0),
                   sim_dom0.runtime / "claims", {os.getpid(): (1, "/local/domain/0/backend/pci/1/0")}.get,
                   sim_dom0.xenstored.socket_path)
    g.start()
    try:
        with pytest.raises(FileNotFoundError, match="not assignable"):
            ask_gate(g.path, "claim", MINE)
    finally:
        g.close()


def test_a_quarantined_function_is_not_lent(gate, sim_dom0):
    (sim_dom0.runtime / "state").mkdir(exist_ok=True)
    write_record(sim_dom0.runtime / "state", ReleaseRecord(str(MINE), "flr", False, "no response"))
    with pytest.raises(OSError, match="quarantined") as exc:
        ask_gate(gate.path, "claim", MINE)
    assert exc.value.errno == errno.EBUSY
