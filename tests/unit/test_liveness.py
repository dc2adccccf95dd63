"""The supervisor's wake-ups (one epoll set, a deadline heap, a clock without its
own stalls), the worker's op watchdog, and the backend event filter."""

from __future__ import annotations

import os
import resource
import time

import pytest

from pcibackd.daemon.backends import CachedReads, touched_domids, touched_nodes
from pcibackd.daemon.workers import raise_open_file_limit, wait_all
from pcibackd.daemon.wakeups import Wakeups
from pcibackd.worker.stuck import OpWatchdog, StuckOp, run_delay_ns

ROOT = "/local/domain/0/backend/pci"


def test_deadlines_come_due_in_order_and_only_when_due():
    w = Wakeups()
    now = time.monotonic()
    w.at(now + 100, 3, "restart")
    w.at(now - 1, 1, "stop")
    w.at(now - 2, 2, "silence")
    assert w.due(now) == [(2, "silence"), (1, "stop")]
    assert w.due(now) == [] and len(w.heap) == 1


def test_ready_fds_are_reported_by_key_and_unwatched_ones_not():
    w = Wakeups()
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    w.watch(r1, 7)
    w.watch(r2, "other")
    os.write(w1, b"x")
    os.write(w2, b"x")
    w.unwatch(r2)
    assert w.wait(10.0) == [7]


def test_the_loops_own_stall_is_left_out_of_its_clock():
    w = Wakeups()
    w.wait(0, at_once=True)
    time.sleep(0.5)                 # a long iteration: the supervisor starved or busy
    w.wait(0, at_once=True)
    assert w.stalled >= 0.5
    assert time.monotonic() - w.clock() >= 0.5


def test_wait_all_polls_fds_beyond_select_limit():
    raise_open_file_limit()
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1200:
        pytest.skip("the hard open-file limit is too low")
    pipes = [os.pipe() for _ in range(600)]          # fd numbers past 1024 (select()'s FD_SETSIZE)
    try:
        r, wr = pipes[-1]
        assert r > 1024
        os.write(wr, b"x")
        assert wait_all({r: "done", pipes[-2][0]: "not"}, time.monotonic() + 0.2) == {pipes[-2][0]: "not"}
    finally:
        for a, b in pipes:
            os.close(a), os.close(b)


def test_stuck_op_raises_after_its_own_time():
    dog = OpWatchdog(first=0.1, tick=0.05, confirm=0.1)
    dog.install()
    try:
        with pytest.raises(StuckOp):
            dog.arm()
            time.sleep(60)         # a hung handler; the watchdog ends it
        assert not dog.armed
    finally:
        dog.disarm()


def test_waiting_for_the_supervisor_is_not_counted():
    dog = OpWatchdog(first=0.1, tick=0.05, confirm=0.1)
    dog.install()
    dog.arm()
    with dog.paused():
        time.sleep(0.5)            # longer than first + confirm
    dog.disarm()                   # no StuckOp


def test_run_delay_is_readable_here():
    assert run_delay_ns() is None or run_delay_ns() >= 0


@pytest.mark.parametrize("paths,touched", [
    ([f"{ROOT}/5/0/frontend"], {5}),
    ([f"{ROOT}/5"], {5}),                        # removal of the whole domain
    ([f"{ROOT}/5/0"], {5}),
    ([f"{ROOT}/5/0/dev-0", f"{ROOT}/6/0/num_devs"], {5, 6}),
    ([f"{ROOT}/5/0/root-0", f"{ROOT}/5/0/vdev-0"], set()),    # a worker's own nodes
    ([ROOT], None),                              # the root: read everything
    (["/elsewhere/1"], set()),
])
def test_touched_domids(paths, touched):
    assert touched_domids(paths, set()) == touched


def test_only_device_listings_need_the_interrupt_brokers_scan():
    paths = [f"{ROOT}/5/0/state", f"{ROOT}/6/0/dev-0", f"{ROOT}/7", f"{ROOT}/8/0/frontend"]
    assert touched_nodes(paths, set()) == ({5, 6, 7, 8}, {6, 7})


def test_touched_domids_warns_about_a_bad_name_once(caplog):
    warned: set[str] = set()
    assert touched_domids([f"{ROOT}/evil/0/frontend", f"{ROOT}/evil/0/state"], warned) == set()
    assert warned == {"evil"}


def test_cached_reads_read_a_domain_again_only_after_forget():
    class XS:
        reads = 0

        def read(self, path):
            XS.reads += 1
            return "v"
    c = CachedReads(XS())
    c.read(f"{ROOT}/5/0/num_devs"), c.read(f"{ROOT}/5/0/num_devs"), c.read(f"{ROOT}/6/0/num_devs")
    assert XS.reads == 2
    c.forget(5)
    c.read(f"{ROOT}/5/0/num_devs")
    assert XS.reads == 3


def test_a_replaced_workers_last_report_is_not_taken_unparsed():
    from pcibackd.daemon.guests import Guest, GuestEvent
    g = Guest(5, f"{ROOT}/5/0")
    r, w = os.pipe()
    g.attach(100, r, None, adopted=False, now=0.0)
    g.last_frame = b"report of pid 100"
    g.detach()
    assert g.last_frame == b""
    g.change_state(GuestEvent.KILLED)
    g.attach(101, r, None, adopted=False, now=0.0)
    assert g.last_frame == b""
    os.close(r), os.close(w)


def test_the_stuck_op_limit_is_a_setting_of_the_whole_wait():
    from pcibackd.daemon.config import LIVE, DaemonConfig
    from pcibackd.worker.main import WorkerConfig
    assert DaemonConfig().stuck_op_seconds == WorkerConfig(domid=1, backend_path="b").stuck_op_seconds == 0.9
    assert "stuck_op_seconds" in LIVE, "a reload gives new workers the new limit"
    default = OpWatchdog.after(0.9)
    assert (default.first, default.confirm) == pytest.approx((0.5, 0.4))
    slow = OpWatchdog.after(30.0)          # an emulated dom0 on a loaded host
    assert slow.first + slow.confirm == pytest.approx(30.0) and slow.first == 0.5
    short = OpWatchdog.after(0.45)
    assert (short.first, short.confirm) == pytest.approx((0.25, 0.2))
