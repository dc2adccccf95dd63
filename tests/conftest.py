"""Shared fixtures: a simulated dom0 (private oxenstored + daemon), torn down
even when the test fails; the daemon log is printed for failed tests.

Tests are grouped by directory, and each group carries the marker of its name:
``unit`` (tests/unit), ``e2e`` (tests/e2e), ``lane`` (tests/lane), so
``pytest -m 'not lane'`` runs everything but the real-Xen lane.  The lane
always runs last: it holds both CPUs for many minutes.  The run ends with its
wall time, the lane's share apart (CI's log shows both).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import settings

from simdom0.dom0 import SimDom0

# Hypothesis fails an example slower than 200 ms by default: a clock bound a
# loaded machine breaks.  Off for every test that does not set its own.
settings.register_profile("pcibackd", deadline=None)
settings.load_profile("pcibackd")


GROUPS = ("unit", "e2e", "lane")
_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        group = Path(item.fspath).resolve().relative_to(_HERE).parts[0]
        if group in GROUPS:
            item.add_marker(getattr(pytest.mark, group))
    items.sort(key=lambda item: item.get_closest_marker("lane") is not None)   # stable: lane last


_CLOCK = {"start": time.monotonic(), "lane": 0.0, "lane_ran": False}    # this pytest run's


def pytest_configure(config):
    _CLOCK.update(start=time.monotonic(), lane=0.0, lane_ran=False)


def pytest_runtest_logreport(report):
    if "lane" in report.keywords:
        _CLOCK["lane"] += report.duration        # setup, call and teardown
        _CLOCK["lane_ran"] |= report.when == "call" and not report.skipped


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    total, lane = time.monotonic() - _CLOCK["start"], _CLOCK["lane"]
    share = f"the lane {lane:.0f} s" if _CLOCK["lane_ran"] else "the lane not run"
    terminalreporter.write_line(f"wall time {total:.0f} s: {share}, everything else {total - lane:.0f} s")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def _report(request, dom0: SimDom0) -> None:
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print("\n----- pcibackd log tail -----\n" + dom0.log_tail(80))


@pytest.fixture
def sim_dom0(request):
    """A simulated dom0 without the daemon (start it with ``start_daemon``)."""
    dom0 = SimDom0(log_level="DEBUG").start(daemon=False)
    yield dom0
    _report(request, dom0)
    dom0.stop()


@pytest.fixture
def dom0(request):
    """A simulated dom0 with ``pcibackd run`` up and answering."""
    dom0 = SimDom0(log_level="DEBUG").start()
    yield dom0
    _report(request, dom0)
    dom0.stop()


@pytest.fixture
def dom0_passthrough(request):
    dom0 = SimDom0(log_level="DEBUG", topology="passthrough").start()
    yield dom0
    _report(request, dom0)
    dom0.stop()
