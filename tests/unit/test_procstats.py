"""Worker figures the supervisor samples from /proc (control/procstats.py) and the status
answer kept rendered between requests (control/statusview.py)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from pcibackd.control import procstats, statusview
from pcibackd.control.commands import COMMANDS
from pcibackd.control.procstats import USS_PER_PASS, WATCHED, WINDOW, ProcSampler, read_stat, read_uss
from pcibackd.control.protocol import reply
from pcibackd.control.statusview import StatusView
from pcibackd.daemon.guests import Guest
from pcibackd.daemon.views import DaemonInfo
from pcibackd.worker.link import WorkerReport

TICK, PAGE = procstats.TICK, procstats.PAGE


class FakeProc:
    """A /proc of fake workers: CPU seconds, RSS pages and start (s after boot) per pid."""

    def __init__(self, root):
        self.root = root

    def set(self, pid: int, cpu: float, rss_pages: int = 100, start: float = 0.0, comm: str = "pcibackd: w (x) y"):
        d = self.root / str(pid)
        d.mkdir(exist_ok=True)
        fields = ["S", "1"] + ["0"] * 9 + [str(round(cpu * TICK)), "0"] + ["0"] * 6 + [str(round(start * TICK)),
                                                                               "0", str(rss_pages), "0"]
        (d / "stat").write_text(f"{pid} ({comm}) {' '.join(fields)}\n")
        (d / "smaps_rollup").write_text("Rss: 900 kB\nPrivate_Clean: 10 kB\nPrivate_Dirty: 20 kB\n")

    def gone(self, pid: int):
        for f in (self.root / str(pid)).iterdir():
            f.unlink()
        (self.root / str(pid)).rmdir()


@pytest.fixture
def proc(tmp_path, monkeypatch):
    monkeypatch.setattr(procstats, "since_boot", lambda: 1000.0)
    return FakeProc(tmp_path)


def g(domid, pid):
    return SimpleNamespace(domid=domid, pid=pid)


def test_read_stat_of_a_real_process_and_a_comm_with_parentheses(proc):
    cpu, rss, start = read_stat(os.getpid())
    assert cpu > 0 and rss > 0 and start > 0
    proc.set(7, cpu=2.5, rss_pages=3, start=40.0)
    assert read_stat(7, str(proc.root)) == (2.5, 3 * PAGE, 40.0)
    assert read_uss(7, str(proc.root)) == 30 * 1024
    assert read_stat(8, str(proc.root)) is None and read_uss(8, str(proc.root)) is None
    assert 0 < read_uss(os.getpid()) < read_stat(os.getpid())[1] * 2


def test_cpu_percent_over_the_window_between_passes_even_for_an_idle_worker(proc):
    s = ProcSampler(proc=str(proc.root))
    totals = {1: 0.0, 2: 0.0}

    def observe(domid, pid, cpu):       # the guest's tally: one worker each here
        totals[domid] = max(totals[domid], cpu)
        return totals[domid]
    proc.set(10, cpu=1.0, start=990.0)             # 1 s of CPU in its 10 s of life
    proc.set(20, cpu=0.5, start=995.0)
    s.sample([g(1, 10), g(2, 20)], observe, now=100.0)
    # no earlier pass: over each worker's life so far
    assert (s.figures(1).cpu_percent, s.figures(1).cpu_window) == (10.0, 10.0)
    assert (s.figures(2).cpu_percent, s.figures(2).cpu_window) == (10.0, 5.0)
    assert s.figures(1).rss == 100 * PAGE and s.figures(1).uss == 30 * 1024
    proc.set(10, cpu=3.0, start=990.0)             # 2 s in the next 10 s
    s.sample([g(1, 10), g(2, 20)], observe, now=100.0 + WINDOW)     # worker 20 idle: a real 0.0
    assert (s.figures(1).cpu_percent, s.figures(1).cpu_window) == (20.0, WINDOW)
    assert (s.figures(2).cpu_percent, s.figures(2).cpu_window) == (0.0, WINDOW)
    assert totals == {1: 3.0, 2: 0.5}             # the readings went into the tallies
    proc.gone(20)
    s.sample([g(1, 10), g(2, 20)], observe, now=100.0 + 2 * WINDOW)
    assert s.figures(2).cpu_percent is None and s.figures(2).rss is None      # gone: not known


def test_passes_run_only_while_someone_watches(proc):
    s = ProcSampler(proc=str(proc.root))
    proc.set(10, cpu=1.0, start=990.0)
    assert s.stale(0.0) and s.due(0.0) is None                # nothing ever asked: nothing to do
    s.sample([g(1, 10)], lambda *a: None, now=50.0)
    assert s.due(50.0) is None                                 # a metrics scrape does not watch
    assert not s.stale(50.0 + WINDOW - 1) and s.stale(50.0 + WINDOW)
    s.watch(55.0)                                              # a status request
    assert s.due(56.0) == 50.0 + WINDOW
    s.sample([g(1, 10)], lambda *a: None, now=60.0)
    assert s.due(61.0) == 60.0 + WINDOW
    assert s.due(55.0 + WATCHED) is None                       # nobody asked for WATCHED s
    s.watch(70.0)
    s.sample([g(1, None)], lambda *a: None, now=70.0)
    assert s.due(71.0) is None                                 # no live worker: nothing to watch


def test_uss_walks_are_bounded_per_pass_and_go_round(proc):
    s = ProcSampler(proc=str(proc.root))
    workers = [g(i, 10 + i) for i in range(USS_PER_PASS + 2)]
    for w in workers:
        proc.set(w.pid, cpu=0.0, start=990.0)
    s.sample(workers, lambda *a: None, now=100.0)
    first = {w.domid for w in workers if s.figures(w.domid).uss is not None}
    assert len(first) == USS_PER_PASS and all(s.figures(w.domid).rss for w in workers)
    s.sample(workers, lambda *a: None, now=100.0 + WINDOW)
    assert all(s.figures(w.domid).uss is not None for w in workers)     # the others' turn came next


def test_a_worker_started_after_the_pass_is_measured_at_once(proc):
    s = ProcSampler(proc=str(proc.root))
    proc.set(10, cpu=1.0, start=990.0)
    s.sample([g(1, 10)], lambda d, p, c: c, now=100.0)
    assert not s.top_up([g(1, 10)], lambda d, p, c: c, now=101.0)       # nothing new: nothing read
    proc.set(11, cpu=0.2, start=998.0)                                   # its replacement
    assert s.top_up([g(1, 11)], lambda d, p, c: c, now=102.0)
    assert (s.figures(1).pid, s.figures(1).cpu_percent, s.figures(1).uss) == (11, 10.0, 30 * 1024)
    assert s.last == 100.0                                               # the pass's schedule stays


# ------------------------------------------------------------ status view --
def report(pid, reads, cpu=0.0):
    return WorkerReport(domid=1, pid=pid, token="t", served={"conf_read": reads}, cpu_seconds=cpu, started=1.0)


class Face:
    """The supervisor as the status view sees it: real Guest records."""

    def __init__(self, *guests):
        self.records = {x.domid: x for x in guests}

    def about(self):
        return DaemonInfo(version="0", pid=1, uptime=1.0, platform="sim", topology="vpci", xenstore="x",
                          xenstore_connected=True, control={})

    def guests(self):
        return [x.info(0.0, {}) for x in self.records.values()]

    def observe_cpu(self, domid, pid, seconds):
        return self.records[domid].tally.observe_cpu(pid, seconds)


def worker(domid, pid, reads, cpu=0.0) -> Guest:
    x = Guest(domid, f"/b/{domid}", name=f"vm{domid}")
    x.pid, x.sentinel = pid, 99
    x.report = report(pid, reads, cpu)
    return x


def status(view) -> dict:
    return json.loads(reply(1, view.status()))["result"]


def test_status_renders_a_guest_once_per_change(proc, monkeypatch):
    a, b = worker(1, 10, 5, cpu=0.5), worker(2, 20, 7)
    proc.set(10, cpu=2.0, start=990.0)
    proc.set(20, cpu=0.1, start=990.0)
    face = Face(a, b)
    view = StatusView(face, ProcSampler(proc=str(proc.root)))
    built = []
    real = statusview.guest_dict
    monkeypatch.setattr(statusview, "guest_dict", lambda x, fig=None: built.append(x.domid) or real(x, fig))
    first = status(view)
    assert [x["served"] for x in first["guests"]] == [{"conf_read": 5}, {"conf_read": 7}]
    # CPU seconds as read from /proc, not the last report's 0.5; percent and memory from the same pass
    assert [(x["cpu_seconds"], x["cpu_percent"], x["rss"], x["uss"]) for x in first["guests"]] == \
        [(2.0, 20.0, 100 * PAGE, 30 * 1024), (0.1, 1.0, 100 * PAGE, 30 * 1024)]
    assert "heartbeat_age" in first["guests"][0] and built == [1, 2]
    assert "CPU%: of one CPU over the last 10.0s\n" in COMMANDS["status"].render(first)
    assert status(view) == first and built == [1, 2]                  # nothing changed: nothing built
    a.report = report(10, 6, cpu=2.0)
    assert [x["served"] for x in status(view)["guests"]] == [{"conf_read": 6}, {"conf_read": 7}]
    assert built == [1, 2, 1]                                          # only the guest that changed
    del face.records[2]
    assert [x["domid"] for x in status(view)["guests"]] == [1] and set(view._rows) == {1}


def test_a_status_request_never_reads_more_than_new_workers_between_passes(proc, monkeypatch):
    face = Face(worker(1, 10, 5))
    proc.set(10, cpu=1.0, start=990.0)
    view = StatusView(face, ProcSampler(proc=str(proc.root)))
    status(view)
    reads = []
    real = procstats.read_stat
    monkeypatch.setattr(procstats, "read_stat", lambda pid, root: reads.append(pid) or real(pid, root))
    status(view)
    assert reads == []                                 # within the window: cached figures only
    face.records[2] = worker(2, 20, 1)
    proc.set(20, cpu=0.1, start=999.0)
    assert status(view)["guests"][1]["rss"] == 100 * PAGE and reads == [20]
