"""Metrics and honest counters on a running daemon: `pcibackctl metrics` read
back with prometheus_client's parser, counters that survive a worker restart,
probe misses apart from errors, and `pcibackd run --metrics-listen`."""

from __future__ import annotations

import os
import re
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import Err
from simdom0.dom0 import SimDom0
from test_control_commands import EDU, E1000E, ok, ok_json, two_guests
from waiting import wait_until

G0 = BDF(0, 0, 0, 0)


def metrics(text: str) -> dict:
    """{(sample name, frozenset of labels): value} of a metrics text."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def series(m: dict, sample: str, /, **labels) -> float:
    want = set(labels.items())
    hits = [v for (n, ls), v in m.items() if n == sample and want <= ls]
    assert len(hits) == 1, (sample, labels, hits)
    return hits[0]


def counters(m: dict) -> dict:
    return {k: v for k, v in m.items() if k[0].endswith(("_total", "_bucket", "_count", "_sum"))}


def test_metrics_and_counters_across_a_worker_restart(dom0):
    front = two_guests(dom0)
    assert front.conf_read(G0, 0x100, 4)[0] == Err.invalid_offset      # lspci's extended-space probe
    assert front.conf_read(G0, 1, 2)[0] == Err.invalid_offset          # a real error
    g1 = wait_until(lambda: (g := dom0.guest_status(1))["errors"] and g, what="the error in a heartbeat")
    assert g1["errors"] == {"conf_read": {"XEN_PCI_ERR_invalid_offset": 1}}
    assert g1["misses"]["conf_read"]["XEN_PCI_ERR_invalid_offset"] == 1
    assert g1["misses"]["conf_read"]["XEN_PCI_ERR_dev_not_found"] >= 250          # the bus scan
    before = metrics(ok(dom0, "metrics"))
    who = {"domid": "1", "name": "guest1"}
    assert series(before, "pcibackd_op_errors_total", op="conf_read", code="XEN_PCI_ERR_invalid_offset",
                  **who) == 1
    assert series(before, "pcibackd_op_misses_total", op="conf_read", code="XEN_PCI_ERR_dev_not_found",
                  **who) >= 250
    assert not [k for k in before if k[0] == "pcibackd_op_errors_total" and ("code", "XEN_PCI_ERR_dev_not_found")
                in k[1]], "probe misses counted as errors"
    assert series(before, "pcibackd_xenstore_connected") == 1
    assert series(before, "pcibackd_pool_size") == 0
    assert series(before, "pcibackd_worker_restarts_total", **who) == 0
    assert series(before, "pcibackd_denied_writes_total", bdf=EDU, **who) == 0
    served = series(before, "pcibackd_ops_total", op="conf_read", **who)
    assert series(before, "pcibackd_op_service_seconds_count", **who) == served

    old = dom0.guest_status(1)["pid"]
    ok(dom0, "restart", "1")
    wait_until(lambda: (g := dom0.guest_status(1))["pid"] not in (None, old) and g["worker_state"] == "RUNNING",
               what="dom1's new worker")
    assert front.conf_read(G0, 0, 2) == (Err.success, 0x1234)
    wait_until(lambda: series(metrics(ok(dom0, "metrics")), "pcibackd_ops_total", op="conf_read", **who)
               >= served + 1, what="the new worker's op in the totals")
    after = metrics(ok(dom0, "metrics"))
    lower = {k: (v, after.get(k)) for k, v in counters(before).items() if after.get(k, -1) < v}
    assert not lower, f"counters went down across the restart: {lower}"
    assert series(after, "pcibackd_worker_restarts_total", **who) == 1
    st = ok_json(dom0, "status")["guests"][0]
    assert st["errors"] == {"conf_read": {"XEN_PCI_ERR_invalid_offset": 1}} and st["restarts"] == 1
    assert st["served"]["conf_read"] >= served + 1


def test_metrics_json_is_the_data_behind_the_text(guests):
    dom0, _ = guests
    data = ok_json(dom0, "metrics")
    assert set(data) == {"daemon", "pool_size", "assignable", "guests"}
    assert [g["domid"] for g in data["guests"]] == [1, 2] and data["assignable"] == 4
    assert [d["bdf"] for d in data["guests"][0]["devices"]] == [EDU, E1000E]


@pytest.fixture
def guests(dom0):
    return dom0, two_guests(dom0)


@pytest.fixture
def listening_dom0(request):
    dom0 = SimDom0(log_level="DEBUG", extra_args=["--metrics-listen", "127.0.0.1:0"]).start()
    yield dom0
    if getattr(request.node, "rep_call", None) and request.node.rep_call.failed:
        print(dom0.log_tail(80))
    dom0.stop()


def test_metrics_listen_serves_what_pcibackctl_prints(listening_dom0):
    dom0 = listening_dom0
    two_guests(dom0)
    url = wait_until(lambda: (m := re.search(r"metrics on (http://\S+)", dom0.log_tail(400))) and m.group(1),
                     what="the listener's address in the log")
    with urllib.request.urlopen(url, timeout=30) as resp:
        served = metrics(resp.read().decode())
    printed = metrics(ok(dom0, "metrics"))
    assert {k for k in served if k[0] == "pcibackd_ops_total"} == {k for k in printed if k[0] == "pcibackd_ops_total"}
    assert series(served, "pcibackd_guests", state="RUNNING") == 2
    assert series(served, "pcibackd_xenstore_connected") == 1


def _wakeups(pid: int) -> int:
    """How often the threads of process ``pid`` (the supervisor's loop, the metrics listener,
    ZeroMQ's) went to sleep and woke again."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                total += next(int(ln.split()[1]) for ln in f if ln.startswith("voluntary_ctxt_switches"))
        except OSError:
            pass          # a thread that ended meanwhile
    return total


def test_an_idle_daemon_with_a_listener_sleeps_and_a_scrape_is_fresh(listening_dom0):
    dom0 = listening_dom0
    url = wait_until(lambda: (m := re.search(r"metrics on (http://\S+)", dom0.log_tail(400))) and m.group(1),
                     what="the listener's address in the log")
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert "pcibackd_guests" in resp.read().decode()
    before = _wakeups(dom0.daemon.pid)
    time.sleep(3.0)              # the window measured: nothing happens in it, so nothing may run
    # a straggler of the scrape's own traffic at most (loop and listener woke twice a second each: 12)
    assert _wakeups(dom0.daemon.pid) - before <= 3
    dom0.add_device("edu", EDU)
    dom0.create_guest(1, [EDU])
    wait_until(lambda: dom0.status()["guests"], what="the guest in status")
    with urllib.request.urlopen(url, timeout=30) as resp:       # answered by the loop: current at once
        assert sum(v for (n, _), v in metrics(resp.read().decode()).items() if n == "pcibackd_guests") == 1


def test_metrics_listen_on_a_busy_port_is_a_clear_error(tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    dom0 = SimDom0(extra_args=["--metrics-listen", f"127.0.0.1:{port}"])
    try:
        with pytest.raises(RuntimeError, match=f"--metrics-listen 127.0.0.1:{port}: Address already in use"):
            dom0.start()
    finally:
        s.close()
        dom0.stop()
