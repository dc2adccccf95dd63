"""Prometheus metrics: the text pcibackctl prints and the HTTP listener serves,
read back with prometheus_client's own parsers; counters that survive a worker
restart; probe misses that are not errors; a listener that never reads the
supervisor's tables from its own thread."""

from __future__ import annotations

import threading
import urllib.request

import pytest
import zmq
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from pcibackd.control import cli
from pcibackd.control.commands import COMMANDS
from pcibackd.control.exposition import MetricsListener, parse_address, text
from pcibackd.control.metricsdata import collect
from pcibackd.control.server import ControlServer
from pcibackd.daemon.guests import Guest
from pcibackd.daemon.states import WorkerState
from pcibackd.daemon.views import DaemonInfo
from pcibackd.wire import pciif
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import Err, Op
from pcibackd.worker.link import DeviceReport, ServiceTimes, WorkerReport
from pcibackd.worker.ops import SERVICE_BOUNDS_US, Dispatcher

DEV = BDF(0, 0, 5, 0)


class Face:
    """What collect() sees of the daemon: real Guest records, as the supervisor keeps them."""

    def __init__(self, *guests: Guest, xenstore_connected=True):
        self.records = list(guests)
        self.xenstore_connected = xenstore_connected
        self.threads: set[str] = set()

    def about(self):
        return DaemonInfo(version="9.9", pid=1, uptime=5.0, platform="sim", topology="vpci", xenstore="x",
                          xenstore_connected=self.xenstore_connected, control={"ipc": "x", "tcp": None})

    def guests(self):
        self.threads.add(threading.current_thread().name)
        return [g.info(0.0) for g in self.records]

    def assignable(self):
        return [DEV, BDF(0, 0, 7, 0)]

    def observe_cpu(self, domid, pid, seconds):
        return next((g.tally.observe_cpu(pid, seconds) for g in self.records if g.domid == domid), None)


def report(pid, reads=0, errors=0, misses=0, fast=0, slow=0, denied=0, cpu=0.0) -> WorkerReport:
    counts = [0] * (len(SERVICE_BOUNDS_US) + 1)
    counts[1], counts[-1] = fast, slow
    return WorkerReport(domid=3, pid=pid, token="t", served={"conf_read": reads},
                        op_errors={"conf_write": {"XEN_PCI_ERR_access_denied": errors}} if errors else {},
                        op_misses={"conf_read": {"XEN_PCI_ERR_dev_not_found": misses}} if misses else {},
                        service=ServiceTimes(SERVICE_BOUNDS_US, tuple(counts), fast * 8.0 + slow * 2e6),
                        cpu_seconds=cpu, devices=(DeviceReport(DEV, BDF(0, 0, 0, 0), False, denied),),
                        started=float(pid))


def guest(*reports, restarts=0) -> Guest:
    g = Guest(3, "p", name="web-1")
    g.restarts = restarts
    for r in reports:
        g.report = r
    return g


def families(data, openmetrics=False) -> dict:
    out = text(data, openmetrics=openmetrics)
    parse = parse_openmetrics if openmetrics else text_string_to_metric_families
    return {f.name: f for f in parse(out)}


def samples(fams: dict, name: str) -> dict:
    """{(sample name, sorted labels): value} of one family."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fams[name].samples}


def value(fams, family, sample, **labels):
    return samples(fams, family)[(sample, tuple(sorted(labels.items())))]


WHO = {"domid": "3", "name": "web-1"}


@pytest.mark.parametrize("openmetrics", [False, True])
def test_text_parses_with_the_client_library(openmetrics):
    fams = families(collect(Face(guest(report(10, reads=300, errors=2, misses=250, fast=290, slow=10,
                                                    denied=4, cpu=1.25), restarts=1))), openmetrics)
    assert value(fams, "pcibackd_ops", "pcibackd_ops_total", op="conf_read", **WHO) == 300
    assert value(fams, "pcibackd_op_errors", "pcibackd_op_errors_total", op="conf_write",
                 code="XEN_PCI_ERR_access_denied", **WHO) == 2
    assert value(fams, "pcibackd_op_misses", "pcibackd_op_misses_total", op="conf_read",
                 code="XEN_PCI_ERR_dev_not_found", **WHO) == 250
    assert value(fams, "pcibackd_worker_restarts", "pcibackd_worker_restarts_total", **WHO) == 1
    assert value(fams, "pcibackd_worker_cpu_seconds", "pcibackd_worker_cpu_seconds_total", **WHO) == 1.25
    assert value(fams, "pcibackd_denied_writes", "pcibackd_denied_writes_total", bdf=str(DEV), **WHO) == 4
    assert value(fams, "pcibackd_xenstore_connected", "pcibackd_xenstore_connected") == 1
    assert value(fams, "pcibackd_pool_size", "pcibackd_pool_size") == 0          # no pool in this daemon
    assert value(fams, "pcibackd_assignable_functions", "pcibackd_assignable_functions") == 2
    assert value(fams, "pcibackd_guests", "pcibackd_guests", state="NEW") == 1
    assert value(fams, "pcibackd_info", "pcibackd_info", version="9.9", platform="sim", topology="vpci") == 1
    for family in ("pcibackd_ops", "pcibackd_op_errors", "pcibackd_op_misses", "pcibackd_worker_restarts",
                   "pcibackd_denied_writes", "pcibackd_worker_cpu_seconds"):
        assert fams[family].type == "counter"
    hist = fams["pcibackd_op_service_seconds"]
    assert hist.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in hist.samples if s.name.endswith("_bucket")}
    assert buckets[repr(SERVICE_BOUNDS_US[0] / 1e6)] == 0 and buckets[repr(SERVICE_BOUNDS_US[1] / 1e6)] == 290
    assert buckets["+Inf"] == 300 and list(buckets.values()) == sorted(buckets.values())   # cumulative
    got = {s.name: s.value for s in hist.samples if not s.name.endswith("_bucket")}
    assert got["pcibackd_op_service_seconds_count"] == 300
    assert got["pcibackd_op_service_seconds_sum"] == pytest.approx((290 * 8.0 + 10 * 2e6) / 1e6)


def test_a_lost_xenstore_and_a_guest_without_reports():
    fams = families(collect(Face(Guest(4, "p"), xenstore_connected=False)))
    assert value(fams, "pcibackd_xenstore_connected", "pcibackd_xenstore_connected") == 0
    assert value(fams, "pcibackd_worker_restarts", "pcibackd_worker_restarts_total", domid="4", name="") == 0
    assert samples(fams, "pcibackd_ops") == {}


def _counters(fams) -> dict:
    out = {}
    for name, fam in fams.items():
        if fam.type in ("counter", "histogram"):
            out.update({(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples})
    return out


def test_counters_are_monotonic_across_a_worker_restart():
    g = guest(report(10, reads=100, errors=3, misses=50, fast=100, denied=2, cpu=2.0))
    face = Face(g)
    before = _counters(families(collect(face)))
    g.report = report(10, reads=120, errors=3, misses=60, fast=120, denied=3, cpu=2.5)   # its last beat
    g.restarts += 1
    g.report = report(11, reads=5, fast=5, denied=3, cpu=0.1)        # the successor: from zero again
    after = _counters(families(collect(face)))
    assert set(before) <= set(after)
    assert all(after[k] >= v for k, v in before.items()), [(k, v, after[k]) for k, v in before.items()
                                                           if after[k] < v]
    assert after[("pcibackd_ops_total", tuple(sorted({**WHO, "op": "conf_read"}.items())))] == 125
    assert after[("pcibackd_worker_restarts_total", tuple(sorted(WHO.items())))] == 1
    assert after[("pcibackd_denied_writes_total", tuple(sorted({**WHO, "bdf": str(DEV)}.items())))] == 3


class _Conventional:
    """A conventional function: 256 bytes of config space."""

    def read(self, offset, size):
        return (Err.invalid_offset, 0) if offset >= 0x100 else (Err.success, 0xFFFF)

    def write(self, offset, size, value):
        return Err.access_denied


def _op(cmd, devfn, offset=0, size=4):
    return pciif.OP_HEADER.pack(cmd, 0, 0, 0, devfn, offset, size, 0, 0) + bytes(512)


def test_probe_misses_are_not_counted_as_errors():
    d = Dispatcher({(0, 0, 0): _Conventional()})
    for devfn in range(256):                          # the guest enumerates its bus
        d.dispatch(_op(Op.conf_read, devfn))
    d.dispatch(_op(Op.conf_read, 0, offset=0x100))     # pci_cfg_space_size / lspci
    d.dispatch(_op(Op.conf_write, 0, offset=4, size=2))          # a real error
    s = d.stats
    g = Guest(3, "p", name="web-1")
    g.report = WorkerReport(domid=3, pid=10, token="t", served=dict(s.served),
                            op_errors={op: dict(c) for op, c in s.errors.items()},
                            op_misses={op: dict(c) for op, c in s.misses.items()})
    fams = families(collect(Face(g)))
    assert samples(fams, "pcibackd_op_errors") == {
        ("pcibackd_op_errors_total", tuple(sorted({**WHO, "op": "conf_write",
                                                   "code": "XEN_PCI_ERR_access_denied"}.items()))): 1}
    assert value(fams, "pcibackd_op_misses", "pcibackd_op_misses_total", op="conf_read",
                 code="XEN_PCI_ERR_dev_not_found", **WHO) == 255
    assert value(fams, "pcibackd_op_misses", "pcibackd_op_misses_total", op="conf_read",
                 code="XEN_PCI_ERR_invalid_offset", **WHO) == 1
    assert value(fams, "pcibackd_ops", "pcibackd_ops_total", op="conf_read", **WHO) == 257


@pytest.mark.parametrize("addr,want", [("127.0.0.1:9477", ("127.0.0.1", 9477)), (":9477", ("0.0.0.0", 9477)),
                                       ("[::1]:0", ("::1", 0)), ("localhost:1", ("localhost", 1))])
def test_parse_address(addr, want):
    assert parse_address(addr) == want


@pytest.mark.parametrize("addr", ["9477", "host:", "host:port", "h:70000", ""])
def test_parse_address_refuses(addr):
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address(addr)


def _get(url, accept=None) -> tuple[str, str]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.headers["Content-Type"], resp.read().decode()


def test_listener_asks_the_loop_which_has_nothing_to_do_between_scrapes(tmp_path):
    g = guest(report(10, reads=7, misses=3, fast=7))
    face = Face(g)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    ctx = zmq.Context()
    listener = MetricsListener("127.0.0.1:0")
    url = listener.start()
    server = ControlServer(ctx, runtime / "control.sock", face, metrics=listener)
    stop, woke, timeouts = threading.Event(), [], set()

    def loop():            # the supervisor's loop: the only thread that reads the face
        poller = zmq.Poller()
        poller.register(server.sock, zmq.POLLIN)
        while not stop.is_set():
            timeouts.add(server.next_deadline())       # the loop sleeps until then (None: until woken)
            if poller.poll(50):                        # (50 ms: only so that the test can stop it)
                woke.append(1)
                server.handle_ready()
            server.flush_pending()
    t = threading.Thread(target=loop, name="supervisor-loop")
    t.start()
    try:
        kind, body = _get(url)
        assert kind.startswith("text/plain")
        fams = {f.name: f for f in text_string_to_metric_families(body)}
        assert value(fams, "pcibackd_ops", "pcibackd_ops_total", op="conf_read", **WHO) == 7
        g.report = report(10, reads=9, misses=3, fast=9)
        kind, body = _get(url, accept="application/openmetrics-text; version=1.0.0")
        assert kind.startswith("application/openmetrics-text") and body.endswith("# EOF\n")
        fams = {f.name: f for f in parse_openmetrics(body)}
        assert value(fams, "pcibackd_ops", "pcibackd_ops_total", op="conf_read", **WHO) == 9    # fresh at once
        assert face.threads == {"supervisor-loop"}
        assert timeouts == {None} and len(woke) >= 2       # no periodic wake-up: only the scrapes woke it
    finally:
        stop.set()
        t.join()
        server.close()
        ctx.term()


def test_listener_serves_the_last_snapshot_when_the_loop_does_not_answer():
    listener = MetricsListener("127.0.0.1:0")
    url = listener.start()
    try:
        assert "pcibackd_ops" not in _get(url)[1]                  # no loop yet, nothing known
        answers = [collect(Face(guest(report(10, reads=4)))), None]
        listener.attach(lambda timeout: answers.pop(0))
        for _ in range(2):                                         # answered, then not in time
            fams = {f.name: f for f in text_string_to_metric_families(_get(url)[1])}
            assert value(fams, "pcibackd_ops", "pcibackd_ops_total", op="conf_read", **WHO) == 4
    finally:
        listener.close()


def test_listener_bind_error():
    first = MetricsListener("127.0.0.1:0")
    first.start()
    try:
        with pytest.raises(OSError):
            MetricsListener(f"127.0.0.1:{first.port}").start()
    finally:
        first.close()


def test_metrics_command_renders_text_and_registry():
    data = collect(Face(guest(report(10, reads=1))))
    out = COMMANDS["metrics"].render(data)
    assert "pcibackd_ops_total{" in out and not out.endswith("\n")
    assert COMMANDS["metrics"].execute(Face(), {})["guests"] == []


def test_cli_prints_an_error_when_render_is_unavailable(monkeypatch, capsys):
    monkeypatch.setattr("pcibackd.control.commands.metrics.exposition", None)
    monkeypatch.setattr(cli, "call", lambda *a, **k: {"status": "ok", "result": collect(Face())})
    assert cli.main(["metrics"]) == 1
    assert "needs prometheus_client" in capsys.readouterr().err
    assert cli.main(["metrics", "--json"]) == 0
    assert '"pool_size": 0' in capsys.readouterr().out


def test_pcibackd_run_refuses_a_bad_metrics_address(capsys, tmp_path):
    from pcibackd import cli as daemon_cli
    with pytest.raises(SystemExit) as exc:
        daemon_cli.main(["run", "--platform", f"sim:{tmp_path}", "--metrics-listen", "9477"])
    assert exc.value.code == 2 and "expected HOST:PORT" in capsys.readouterr().err
