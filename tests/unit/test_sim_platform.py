"""Tests for the simulated Xen platform (simdom0.platform).

Cross-process behaviour is exercised with "agents": this file run as a script
(``python test_sim_platform.py <sim_dir> <domid>``) acts as one domain and
executes JSON commands read from stdin, so tests can kill -9 it.
"""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pcibackd.platform.api import EventChannel, Platform, PlatformError, SharedPage
from simdom0.platform import NR_PORTS, SimPlatform

DEADLINE = 5.0


# -- the agent (runs in a child process) -----------------------------------------

def _hammer(page, offset: int, bit: int, rounds: int) -> int:
    """Toggle our own bit; any surprise means someone lost our update."""
    surprises = 0
    for _ in range(rounds):
        surprises += page.set_bit(offset, bit)
        surprises += not page.clear_bit(offset, bit)
    return surprises


def _wait(channel, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        select.select([channel], [], [], left)
        port = channel.pending()
        if port is not None:
            return port
    return None


def _agent_main(sim_dir: str, domid: int) -> None:
    platform = SimPlatform(Path(sim_dir), domid)
    pages: list = []
    channels: list = []

    def new_page(page) -> int:
        pages.append(page)
        return len(pages) - 1

    def open_channel() -> int:
        channels.append(platform.open_evtchn())
        return len(channels) - 1

    def flood(h: int, port: int, count: int) -> None:
        for _ in range(count):
            channels[h].notify(port)

    def ping_pong(h: int, port: int, rounds: int) -> int:
        """Answer each event on ``port`` with a notify."""
        for _ in range(rounds):
            got = _wait(channels[h], DEADLINE)
            if got != port:
                return -1
            channels[h].unmask(port)
            channels[h].notify(port)
        return rounds

    commands = {
        "grant": lambda remote: (lambda gref, page: [gref, new_page(page)])(*platform.grant_page(remote)),
        "map": lambda remote, gref: new_page(platform.map_grant(remote, gref)),
        "end": platform.end_grant,
        "write": lambda i, offset, data: pages[i].buf.__setitem__(
            slice(offset, offset + len(data) // 2), bytes.fromhex(data)),
        "read": lambda i, offset, n: bytes(pages[i].buf[offset:offset + n]).hex(),
        "hammer": lambda i, offset, bit, rounds: _hammer(pages[i], offset, bit, rounds),
        "open": open_channel,
        "alloc": lambda h, remote: channels[h].alloc_unbound(remote),
        "bind": lambda h, remote, port: channels[h].bind_interdomain(remote, port),
        "notify": flood,
        "wait": lambda h, timeout: _wait(channels[h], timeout),
        "unmask": lambda h, port: channels[h].unmask(port),
        "ping_pong": ping_pong,
    }
    print(json.dumps({"ok": os.getpid()}), flush=True)
    for line in sys.stdin:
        name, *args = json.loads(line)
        try:
            reply = {"ok": commands[name](*args)}
        except PlatformError as e:
            reply = {"errno": e.errno}
        print(json.dumps(reply), flush=True)


class Agent:
    """A child process acting as domain ``domid`` of the simulation."""

    def __init__(self, sim_dir: Path, domid: int):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(sim_dir), str(domid)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._pending = b""
        assert "ok" in self._reply()

    def send(self, *command) -> None:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def _reply(self) -> dict:
        # Raw reads: a buffered readline() would hide queued lines from select().
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            ready, _, _ = select.select([fd], [], [], 20)
            assert ready, "agent did not answer"
            chunk = os.read(fd, 65536)
            assert chunk, f"agent died (exit {self.proc.wait()})"
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def result(self):
        reply = self._reply()
        if "errno" in reply:
            raise PlatformError(reply["errno"], "in agent")
        return reply["ok"]

    def __call__(self, *command):
        self.send(*command)
        return self.result()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)


# -- fixtures and helpers --------------------------------------------------------

def _new_sim_dir(tmp_path: Path) -> Path:
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="pcibackd-simtest-", dir=shm if shm.is_dir() else tmp_path))


@pytest.fixture
def sim_dir(tmp_path):
    path = _new_sim_dir(tmp_path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agents(sim_dir):
    started: list[Agent] = []

    def start(domid: int, where: Path = sim_dir) -> Agent:
        started.append(Agent(where, domid))
        return started[-1]

    yield start
    for agent in started:
        agent.close()


def wait_event(channel, timeout: float = DEADLINE) -> int | None:
    return _wait(channel, timeout)


def readable(channel) -> bool:
    return bool(select.select([channel], [], [], 0)[0])


def connect(fe_platform, be_platform):
    """Frontend allocates, backend binds, the bind's initial event is consumed."""
    fe, be = fe_platform.open_evtchn(), be_platform.open_evtchn()
    fe_port = fe.alloc_unbound(be_platform.domid)
    be_port = be.bind_interdomain(fe_platform.domid, fe_port)
    assert be.pending() == be_port      # Xen marks a freshly bound port pending
    be.unmask(be_port)
    assert be.pending() is None
    return fe, fe_port, be, be_port


@pytest.fixture
def pair(sim_dir):
    fe_platform, be_platform = SimPlatform(sim_dir, 1), SimPlatform(sim_dir, 0)
    fe, fe_port, be, be_port = connect(fe_platform, be_platform)
    yield fe, fe_port, be, be_port
    fe.close()
    be.close()


# -- grants ------------------------------------------------------------------------

def test_implements_protocols(sim_dir):
    platform = SimPlatform(sim_dir, 3)
    assert isinstance(platform, Platform) and platform.name == "sim" and platform.domid == 3
    _, page = platform.grant_page(0)
    with platform.open_evtchn() as channel:
        assert isinstance(page, SharedPage) and isinstance(channel, EventChannel)
    page.close()


def test_grant_shares_memory_across_processes_and_restarts(sim_dir, agents):
    guest = SimPlatform(sim_dir, 1)
    gref, page = guest.grant_page(0)
    assert len(page.buf) == 4096 and bytes(page.buf) == bytes(4096)
    page.buf[100:104] = b"ping"

    backend = agents(0)
    mapped = backend("map", 1, gref)
    assert backend("read", mapped, 100, 4) == b"ping".hex()
    backend("write", mapped, 200, b"pong".hex())
    assert bytes(page.buf[200:204]) == b"pong"

    backend.kill()
    restarted = agents(0)
    again = restarted("map", 1, gref)
    assert restarted("read", again, 200, 4) == b"pong".hex()
    page.buf[300:302] = b"hi"
    assert restarted("read", again, 300, 2) == b"hi".hex()
    page.close()


def test_map_errors(sim_dir):
    guest, other_guest, backend = SimPlatform(sim_dir, 1), SimPlatform(sim_dir, 2), SimPlatform(sim_dir, 0)
    gref, page = guest.grant_page(0)
    other_gref, other_page = other_guest.grant_page(5)
    cases = [
        (1, gref + 1000, errno.ENOENT),    # unknown gref
        (3, gref, errno.ENOENT),           # granted by domain 1, not by 3
        (2, other_gref, errno.EPERM),      # granted to domain 5, not to us
        (1, -1, errno.EINVAL),
        (1, str(gref), errno.EINVAL),
        (0x7FF0, gref, errno.EINVAL),      # reserved domid
    ]
    for remote, bad_gref, expected in cases:
        with pytest.raises(PlatformError) as info:
            backend.map_grant(remote, bad_gref)
        assert info.value.errno == expected, (remote, bad_gref)
    backend.map_grant(1, gref).close()     # the good one works
    page.close()
    other_page.close()


def test_end_grant_revokes_but_keeps_mappings(sim_dir):
    guest, backend = SimPlatform(sim_dir, 1), SimPlatform(sim_dir, 0)
    gref, page = guest.grant_page(0)
    mapped = backend.map_grant(1, gref)
    guest.end_grant(gref)
    with pytest.raises(PlatformError) as info:
        backend.map_grant(1, gref)
    assert info.value.errno == errno.ENOENT
    with pytest.raises(PlatformError) as info:
        guest.end_grant(gref)
    assert info.value.errno == errno.EINVAL
    mapped.buf[0:3] = b"abc"               # the existing mapping still shares memory
    assert bytes(page.buf[0:3]) == b"abc"
    mapped.close()
    page.close()


def test_grefs_unique_per_domain_across_processes(sim_dir, agents):
    a, b = agents(1), agents(1)
    for _ in range(40):
        a.send("grant", 0)
        b.send("grant", 0)
    grefs = [agent.result()[0] for _ in range(40) for agent in (a, b)]
    assert len(set(grefs)) == 80
    other_gref, page = SimPlatform(sim_dir, 2).grant_page(0)
    assert other_gref == min(grefs)       # separate numbering per granting domain
    page.close()


# -- shared page bit operations ----------------------------------------------------

def test_bit_ops_semantics(sim_dir):
    _, page = SimPlatform(sim_dir, 1).grant_page(0)
    assert page.set_bit(8, 3) is False and page.set_bit(8, 3) is True
    assert page.test_bit(8, 3) and page.buf[8] == 0x08
    page.set_bit(8, 33)                    # continues into the next word
    assert page.buf[12] == 0x02
    assert page.clear_bit(8, 3) is True and page.clear_bit(8, 3) is False
    assert not page.test_bit(8, 3)
    for offset, bit in [(2, 0), (4096, 0), (4092, 32), (-4, 0), (0, -1)]:
        with pytest.raises(ValueError):
            page.set_bit(offset, bit)
    page.close()
    page.close()                           # idempotent
    with pytest.raises(ValueError):
        page.test_bit(0, 0)


def test_atomic_bits_from_two_processes_lose_no_update(sim_dir, agents):
    gref, page = SimPlatform(sim_dir, 1).grant_page(0)
    a, b = agents(0), agents(0)
    pa, pb = a("map", 1, gref), b("map", 1, gref)
    rounds = 100_000
    a.send("hammer", pa, 0, 0, rounds)
    b.send("hammer", pb, 0, 1, rounds)
    # Meanwhile this process toggles a third bit of the same word.
    mine = _hammer(page, 0, 2, rounds // 4)
    assert (a.result(), b.result(), mine) == (0, 0, 0)
    assert bytes(page.buf[0:4]) == bytes(4)
    page.close()


# -- event channels (in one process) ----------------------------------------------

def test_notify_both_directions(pair):
    fe, fe_port, be, be_port = pair
    assert fe_port != 0 and be_port != 0
    fe.notify(fe_port)
    assert wait_event(be) == be_port
    assert be.pending() is None
    be.unmask(be_port)
    be.notify(be_port)
    assert wait_event(fe) == fe_port
    fe.unmask(fe_port)
    assert fe.pending() is None and be.pending() is None


def test_masked_port_latches_one_event(pair):
    fe, fe_port, be, be_port = pair
    fe.notify(fe_port)
    assert wait_event(be) == be_port       # now masked
    fe.notify(fe_port)
    assert be.pending() is None            # latched, not reported
    assert not readable(be)
    be.unmask(be_port)
    assert readable(be)                    # unmask re-arms the fd
    assert be.pending() == be_port
    be.unmask(be_port)
    assert be.pending() is None and not readable(be)


def test_flood_coalesces(pair):
    fe, fe_port, be, be_port = pair
    for _ in range(10_000):
        fe.notify(fe_port)
    assert be.pending() == be_port
    assert be.pending() is None and not readable(be)   # no backlog of 10 000 wake-ups
    for _ in range(10_000):
        fe.notify(fe_port)                 # while masked
    assert be.pending() is None
    be.unmask(be_port)
    assert be.pending() == be_port
    be.unmask(be_port)
    assert be.pending() is None and not readable(be)


def test_select_readiness(pair):
    fe, fe_port, be, be_port = pair
    assert not readable(be)
    fe.notify(fe_port)
    assert readable(be)
    poller = select.poll()
    poller.register(be.fileno(), select.POLLIN)
    assert poller.poll(0)
    assert be.pending() == be_port
    assert not readable(be) and not poller.poll(0)


def test_events_are_per_port(sim_dir):
    backend = SimPlatform(sim_dir, 0)
    be = backend.open_evtchn()
    links = []
    for domid in (1, 2, 3):
        fe = SimPlatform(sim_dir, domid).open_evtchn()
        fe_port = fe.alloc_unbound(0)
        be_port = be.bind_interdomain(domid, fe_port)
        links.append((fe, fe_port, be_port))
    initial = {be.pending() for _ in links}
    assert initial == {be_port for _, _, be_port in links}
    for _, _, be_port in links:
        be.unmask(be_port)
    links[2][0].notify(links[2][1])
    links[0][0].notify(links[0][1])
    fired = {wait_event(be), wait_event(be)}
    assert fired == {links[0][2], links[2][2]} and be.pending() is None
    for fe, _, _ in links:
        fe.close()
    be.close()


def test_bind_errors(sim_dir):
    guest, backend, stranger = SimPlatform(sim_dir, 1), SimPlatform(sim_dir, 0), SimPlatform(sim_dir, 2)
    fe, be, st = guest.open_evtchn(), backend.open_evtchn(), stranger.open_evtchn()
    for_dom5 = fe.alloc_unbound(5)
    for_us = fe.alloc_unbound(0)
    stranger_port = st.alloc_unbound(0)
    assert for_us != stranger_port
    cases = [
        (1, for_us + 100, errno.EINVAL),       # no such port
        (1, for_dom5, errno.EINVAL),           # unbound for another domain
        (2, for_us, errno.EINVAL),             # that number is not a port of domain 2
        (1, 0, errno.EINVAL),
        (1, NR_PORTS, errno.EINVAL),
        (9, for_us, errno.ESRCH),              # domain never opened event channels
    ]
    for remote, port, expected in cases:
        with pytest.raises(PlatformError) as info:
            be.bind_interdomain(remote, port)
        assert info.value.errno == expected, (remote, port)
    be_port = be.bind_interdomain(1, for_us)
    with pytest.raises(PlatformError) as info:   # already bound to a live backend
        backend.open_evtchn().bind_interdomain(1, for_us)
    assert info.value.errno == errno.EINVAL
    assert be.bind_interdomain(2, stranger_port) != be_port
    for op in (fe.notify, fe.unmask, fe.unbind):
        with pytest.raises(PlatformError) as info:
            op(be_port + 1000)
        assert info.value.errno == errno.EINVAL
    for channel in (fe, be, st):
        channel.close()


def test_unbind_and_rebind(pair, sim_dir):
    fe, fe_port, be, be_port = pair
    be.unbind(be_port)
    fe.notify(fe_port)                         # peer gone: no error, no event
    with pytest.raises(PlatformError):
        be.notify(be_port)
    new_be = SimPlatform(sim_dir, 0).open_evtchn()
    new_port = new_be.bind_interdomain(1, fe_port)
    assert new_be.pending() == new_port
    new_be.unmask(new_port)
    fe.notify(fe_port)
    assert wait_event(new_be) == new_port and be.pending() is None
    new_be.close()


def test_unbound_port_notify_is_dropped(sim_dir):
    with SimPlatform(sim_dir, 1).open_evtchn() as fe:
        port = fe.alloc_unbound(0)
        fe.notify(port)
        assert fe.pending() is None


def test_closed_handle_refuses(sim_dir):
    channel = SimPlatform(sim_dir, 1).open_evtchn()
    port = channel.alloc_unbound(0)
    channel.close()
    channel.close()
    for call in (channel.fileno, channel.pending, lambda: channel.notify(port),
                 lambda: channel.alloc_unbound(0)):
        with pytest.raises(PlatformError) as info:
            call()
        assert info.value.errno == errno.EBADF


def test_parallel_sims_are_isolated(sim_dir, tmp_path):
    other_dir = _new_sim_dir(tmp_path)
    try:
        a_fe, a_be = SimPlatform(sim_dir, 1), SimPlatform(sim_dir, 0)
        b_fe, b_be = SimPlatform(other_dir, 1), SimPlatform(other_dir, 0)
        a = connect(a_fe, a_be)
        b = connect(b_fe, b_be)
        assert (a[1], a[3]) == (b[1], b[3])     # same port numbers, different instances
        a[0].notify(a[1])
        assert wait_event(a[2]) == a[3]
        assert b[2].pending() is None and not readable(b[2])
        (a_gref, a_page), (b_gref, b_page) = a_fe.grant_page(0), b_fe.grant_page(0)
        assert a_gref == b_gref
        a_page.buf[0] = 0xAA
        with b_be.map_grant(1, b_gref) as mapped:
            assert mapped.buf[0] == 0
        for channel in (a[0], a[2], b[0], b[2]):
            channel.close()
        a_page.close()
        b_page.close()
    finally:
        shutil.rmtree(other_dir, ignore_errors=True)


def test_forked_child_does_not_keep_ports_alive(sim_dir):
    fe = SimPlatform(sim_dir, 1).open_evtchn()
    fe_port = fe.alloc_unbound(0)
    be = SimPlatform(sim_dir, 0).open_evtchn()
    be.bind_interdomain(1, fe_port)
    release_r, release_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(release_w)
        try:
            be.pending()
            code = 1
        except PlatformError:                 # the child's copy is dead on arrival
            code = 0
        os.write(ready_w, b"x")
        os.read(release_r, 1)                 # stay alive until the parent has checked
        os._exit(code)
    os.close(release_r)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"x"    # the child's fork hook has run
        be._forget_inherited()                # the parent "crashes": fds gone, slots untouched
        with SimPlatform(sim_dir, 0).open_evtchn() as new:
            new.bind_interdomain(1, fe_port)  # EINVAL if the child still held the port
    finally:
        os.close(release_w)
        os.close(ready_r)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    fe.close()


# -- event channels across processes ----------------------------------------------

def test_notify_across_processes_and_ping_pong(sim_dir, agents):
    fe = SimPlatform(sim_dir, 1).open_evtchn()
    fe_port = fe.alloc_unbound(0)
    backend = agents(0)
    h = backend("open")
    be_port = backend("bind", h, 1, fe_port)
    assert backend("wait", h, DEADLINE) == be_port   # Xen's initial event
    backend("unmask", h, be_port)
    rounds = 500
    backend.send("ping_pong", h, be_port, rounds)
    # A lost wake-up shows as a wait that runs into DEADLINE (None, or -1 from
    # the agent), never as a slow round: how fast is bench/oplat.py's question.
    for _ in range(rounds):
        fe.notify(fe_port)
        assert wait_event(fe) == fe_port
        fe.unmask(fe_port)
    assert backend.result() == rounds
    fe.close()


def test_backend_killed_port_rebinds_in_new_process(sim_dir, agents):
    fe = SimPlatform(sim_dir, 1).open_evtchn()
    fe_port = fe.alloc_unbound(0)
    first = agents(0)
    h = first("open")
    first_port = first("bind", h, 1, fe_port)
    assert first("wait", h, DEADLINE) == first_port
    first("unmask", h, first_port)

    rival = agents(0)
    rh = rival("open")
    with pytest.raises(PlatformError) as info:       # still bound to a live backend
        rival("bind", rh, 1, fe_port)
    assert info.value.errno == errno.EINVAL

    first.kill()
    fe.notify(fe_port)                                # peer gone: silently dropped
    second = agents(0)
    h2 = second("open")
    port2 = second("bind", h2, 1, fe_port)
    assert port2 == first_port                        # the dead owner's port number is reused
    assert second("wait", h2, DEADLINE) == port2
    second("unmask", h2, port2)
    fe.notify(fe_port)
    assert second("wait", h2, DEADLINE) == port2
    second("unmask", h2, port2)
    second("notify", h2, port2, 1)
    assert wait_event(fe) == fe_port
    fe.close()


def test_rebind_when_dead_port_number_went_to_another_guest(sim_dir, agents):
    """The new backend's first port goes to another guest; the old guest's
    cached route must not leak into that channel."""
    fe = SimPlatform(sim_dir, 1).open_evtchn()
    fe_port = fe.alloc_unbound(0)
    other = SimPlatform(sim_dir, 2).open_evtchn()
    other_port = other.alloc_unbound(0)
    first = agents(0)
    h = first("open")
    old_port = first("bind", h, 1, fe_port)
    fe.notify(fe_port)
    first.kill()

    second = agents(0)
    h2 = second("open")
    stolen = second("bind", h2, 2, other_port)
    assert stolen == old_port
    assert second("wait", h2, DEADLINE) == stolen
    second("unmask", h2, stolen)
    fe.notify(fe_port)                                # stale route: must not hit guest 2's channel
    assert second("wait", h2, 0.2) is None
    new_port = second("bind", h2, 1, fe_port)
    assert second("wait", h2, DEADLINE) == new_port
    second("unmask", h2, new_port)
    fe.notify(fe_port)
    assert second("wait", h2, DEADLINE) == new_port
    fe.close()
    other.close()


if __name__ == "__main__":
    _agent_main(sys.argv[1], int(sys.argv[2]))


def test_xen_boot_options_size_the_pirq_pool(tmp_path):
    from simdom0.platform import BOOT_OPTIONS, DEFAULT_EXTRA_GUEST_IRQS
    assert SimPlatform(tmp_path, 0).physdev().extra_guest_irqs == DEFAULT_EXTRA_GUEST_IRQS
    (tmp_path / "xen" / BOOT_OPTIONS).write_text('{"extra_guest_irqs": 128}')
    assert SimPlatform(tmp_path, 0).physdev().extra_guest_irqs == 128
    (tmp_path / "xen" / BOOT_OPTIONS).write_text('{"extra_guest_irqs": "lots"}')
    with pytest.raises(ValueError, match="extra_guest_irqs"):
        SimPlatform(tmp_path, 0).physdev()
