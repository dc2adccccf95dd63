"""A guest's counters over its workers (daemon/tally.py): they add up across
restarts, never go down, and CPU seconds take the supervisor's readings."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pcibackd.daemon.tally import Tally
from pcibackd.wire.bdf import BDF
from pcibackd.worker.link import DeviceReport, ServiceTimes, WorkerReport
from pcibackd.worker.ops import SERVICE_BOUNDS_US

DEV = BDF(0, 0, 5, 0)


def beat(pid, reads=0, misses=0, errors=0, denied=None, cpu=0.0, started=100.0, fast=0) -> WorkerReport:
    counts = [0] * (len(SERVICE_BOUNDS_US) + 1)
    counts[0] = fast
    return WorkerReport(domid=1, pid=pid, token="t", served={"conf_read": reads} if reads else {},
                        op_errors={"conf_read": {"XEN_PCI_ERR_access_denied": errors}} if errors else {},
                        op_misses={"conf_read": {"XEN_PCI_ERR_dev_not_found": misses}} if misses else {},
                        cpu_seconds=cpu, started=started,
                        service=ServiceTimes(SERVICE_BOUNDS_US, tuple(counts), fast * 2.0),
                        devices=(DeviceReport(DEV, BDF(0, 0, 0, 0), False, denied),) if denied is not None else ())


def test_counters_add_up_across_workers():
    t = Tally()
    t.add(beat(10, reads=5, misses=3, errors=1, fast=4))
    t.add(beat(10, reads=8, misses=3, errors=2, fast=6))
    t.add(beat(11, reads=1, fast=1))                 # the successor counts from zero
    tot = t.totals()
    assert tot.served == {"conf_read": 9}
    assert tot.misses == {"conf_read": {"XEN_PCI_ERR_dev_not_found": 3}}
    assert tot.errors == {"conf_read": {"XEN_PCI_ERR_access_denied": 2}}
    assert tot.service_counts[0] == 7 and sum(tot.service_counts) == 7 and tot.service_sum_us == 14.0
    assert tot.workers == 2
    t.add(beat(11, reads=4, errors=1, fast=2))
    tot = t.totals()
    assert tot.served == {"conf_read": 12} and tot.errors == {"conf_read": {"XEN_PCI_ERR_access_denied": 3}}


def test_same_pid_new_start_is_a_new_worker():
    t = Tally()
    t.add(beat(10, reads=5, started=1.0))
    t.add(beat(10, reads=2, started=2.0))            # a recycled pid: a different worker
    assert t.totals().served == {"conf_read": 7}


def test_denied_writes_resume_from_the_saved_state():
    t = Tally()
    t.add(beat(10, denied=3))
    t.add(beat(10, denied=5))
    t.add(beat(11, denied=4))      # restored from a snapshot taken at 4: not new denials
    assert t.totals().denied_writes == {str(DEV): 5}
    t.add(beat(11, denied=6))
    assert t.totals().denied_writes == {str(DEV): 7}
    t.add(beat(11, denied=1))      # unplugged and plugged back: its count restarted
    assert t.totals().denied_writes == {str(DEV): 8}


def test_a_device_new_to_the_guest_counts_from_zero():
    t = Tally()
    t.add(beat(10, reads=1))
    t.add(beat(11, denied=2))
    assert t.totals().denied_writes == {str(DEV): 2}


def test_cpu_seconds_add_up_workers_and_take_the_supervisors_readings():
    t = Tally()
    assert t.observe_cpu(10, 5.0) is None                  # no report yet: nothing to add it to
    t.add(beat(10, cpu=1.0))
    assert t.observe_cpu(10, 1.5) == 1.5                    # read from /proc after the report
    version = t.version
    assert t.observe_cpu(10, 1.5) == 1.5 and t.version == version      # no change: totals stay as they are
    assert t.observe_cpu(99, 7.0) == 1.5                    # not the worker counting now
    t.add(beat(10, cpu=1.2))                               # a report made before that reading
    assert t.totals().cpu_seconds == 1.5
    t.add(beat(11, cpu=0.5))                               # the successor's CPU adds to the guest's
    assert t.observe_cpu(11, 0.75) == 2.25 and t.totals().cpu_seconds == 2.25


def test_totals_are_computed_once_per_change():
    t = Tally()
    t.add(beat(10, reads=1))
    first = t.totals()
    assert t.totals() is first
    t.add(beat(10, reads=2))
    assert t.totals() is not first and t.totals().served == {"conf_read": 2}


def _flat(tot) -> dict:
    out = {("served", k): v for k, v in tot.served.items()}
    out.update({("errors", o, c): v for o, cs in tot.errors.items() for c, v in cs.items()})
    out.update({("misses", o, c): v for o, cs in tot.misses.items() for c, v in cs.items()})
    out.update({("bucket", i): v for i, v in enumerate(tot.service_counts)})
    out[("cpu",)] = tot.cpu_seconds
    return out


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5), st.integers(0, 5), st.integers(0, 5),
                          st.integers(0, 3)), max_size=40))
def test_totals_never_go_down(steps):
    """Whatever the order of restarts and of the supervisor's CPU readings, every total is monotonic."""
    t, pid, counts, before = Tally(), 1, [0, 0, 0], {}
    for restart, a, b, c, read_later in steps:
        if restart:
            pid, counts = pid + 1, [0, 0, 0]
        counts = [counts[0] + a, counts[1] + b, counts[2] + c]
        t.add(beat(pid, reads=counts[0], misses=counts[1], errors=counts[2], fast=counts[0], cpu=counts[0] / 10))
        if read_later:        # /proc read after the report: at least what it said
            t.observe_cpu(pid, counts[0] / 10 + read_later / 100)
        now = _flat(t.totals())
        assert all(now.get(k, 0) >= v for k, v in before.items()), (before, now)
        before = now


def test_a_guest_record_feeds_its_tally_and_shows_totals():
    from pcibackd.daemon.guests import Guest
    g = Guest(1, "p", name="web")
    assert g.info(0.0).totals is None and g.info(0.0).name == "web"
    g.report = beat(10, reads=3, denied=1)
    g.report = beat(11, reads=2, denied=1)
    info = g.info(0.0)
    assert info.totals.served == {"conf_read": 5} and info.report.pid == 11
    assert [(str(d.bdf), d.denied_writes) for d in info.devices] == [(str(DEV), 1)]
