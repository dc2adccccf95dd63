"""Prometheus metrics with the standard client library (prometheus_client; extra ``metrics``).

:func:`families` turns :func:`~pcibackd.control.metricsdata.collect`'s data into
metric families; :func:`text` prints them in the Prometheus text format (what
node_exporter's textfile collector reads) or OpenMetrics.
:class:`MetricsListener` serves them over HTTP (``pcibackd run --metrics-listen
ADDR``) from a thread: the supervisor's loop owns its tables, so the thread
never reads them.  A scrape asks the loop as a read-only control client does
(the control endpoint's ``inproc`` door, :meth:`MetricsListener.attach`): the
request wakes the loop, which answers it like any other, so an idle daemon
with a listener does no periodic work.  If no answer comes in time the last
snapshot is served.

Every series is labelled ``domid`` and ``name`` (the domain's name); counters
add up all of a guest's workers, so they only go back to zero when pcibackd
itself restarts.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time
from typing import Callable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from loguru import logger
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from pcibackd.common.ratelimit import worth_logging


GUEST = ["domid", "name"]


def families(data: dict) -> Iterator[Metric]:
    """The metric families of one snapshot (see the module docstring)."""
    d = data["daemon"]
    info = GaugeMetricFamily("pcibackd_info", "pcibackd's version, platform and guest topology",
                             labels=["version", "platform", "topology"])
    info.add_metric([str(d["version"]), str(d["platform"]), str(d["topology"])], 1)
    yield info
    yield GaugeMetricFamily("pcibackd_start_time_seconds", "When pcibackd started (Unix time)",
                            value=round(time.time() - d["uptime"], 1))
    yield GaugeMetricFamily("pcibackd_xenstore_connected", "1 while the supervisor is connected to xenstored",
                            value=1 if d["xenstore_connected"] else 0)
    yield GaugeMetricFamily("pcibackd_pool_size", "Functions in pcibackd's pool of hidden functions",
                            value=data["pool_size"])
    yield GaugeMetricFamily("pcibackd_assignable_functions", "Host functions that can be given to guests",
                            value=data["assignable"])
    guests = data["guests"]
    states = GaugeMetricFamily("pcibackd_guests", "Guests by worker state", labels=["state"])
    for state in sorted({g["state"] for g in guests}):
        states.add_metric([state], sum(g["state"] == state for g in guests))
    yield states
    ops = CounterMetricFamily("pcibackd_ops", "Ops served (all answers)", labels=[*GUEST, "op"])
    errors = CounterMetricFamily("pcibackd_op_errors", "Failed answers other than probe misses, by code",
                                 labels=[*GUEST, "op", "code"])
    misses = CounterMetricFamily("pcibackd_op_misses", "Probe misses: empty slots enumerated, the "
                                 "extended-space probe of a conventional function", labels=[*GUEST, "op", "code"])
    service = HistogramMetricFamily("pcibackd_op_service_seconds", "Op service time, request seen to reply "
                                    "posted", labels=GUEST)
    restarts = CounterMetricFamily("pcibackd_worker_restarts", "Workers started again for the guest",
                                   labels=GUEST)
    cpu = CounterMetricFamily("pcibackd_worker_cpu_seconds", "CPU time of the guest's workers (user + system)",
                              labels=GUEST)
    denied = CounterMetricFamily("pcibackd_denied_writes", "Guest config writes dropped or refused, by function",
                                 labels=[*GUEST, "bdf"])
    for g in guests:
        who = [str(g["domid"]), g["name"]]
        for op, n in sorted(g["served"].items()):
            ops.add_metric([*who, op], n)
        for family, by_op in ((errors, g["errors"]), (misses, g["misses"])):
            for op, codes in sorted(by_op.items()):
                for code, n in sorted(codes.items()):
                    family.add_metric([*who, op, code], n)
        if g["service"] is not None:
            service.add_metric(who, _buckets(g["service"]), sum_value=g["service"]["sum_us"] / 1e6)
        restarts.add_metric(who, g["restarts"])
        cpu.add_metric(who, g["cpu_seconds"])
        for dev in g["devices"]:
            denied.add_metric([*who, dev["bdf"]], dev["denied_writes"])
    yield from (ops, errors, misses, service, restarts, cpu, denied)


def _buckets(service: dict) -> list[tuple[str, float]]:
    """Cumulative 'le' buckets in seconds, +Inf last."""
    out, total = [], 0
    for bound, n in zip([*service["bounds_us"], None], service["counts"]):
        total += n
        out.append(("+Inf" if bound is None else repr(bound / 1e6), total))
    return out


class _Snapshot:
    """A registry collector over one data snapshot."""

    def __init__(self, data: dict | None):
        self.data = data

    def collect(self) -> Iterator[Metric]:
        return families(self.data) if self.data is not None else iter(())


def text(data: dict, openmetrics: bool = False) -> str:
    """The snapshot in the Prometheus text format (or OpenMetrics, which ends in ``# EOF``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(data))
    return (generate_openmetrics if openmetrics else generate_latest)(registry).decode()


def parse_address(addr: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all addresses) -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--metrics-listen {addr!r}: expected HOST:PORT, [IPV6]:PORT or :PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


class _Quiet(WSGIRequestHandler):
    timeout = 10       # s: a client that connects and sends nothing cannot hold the one serving thread
    def log_message(self, format, *args):      # one line per scrape on stderr is noise
        pass


class MetricsListener:
    """Serves the metrics over HTTP from a thread (see the module docstring)."""

    WAIT = 2.0         # seconds a scrape waits for the loop before serving an older snapshot

    def __init__(self, addr: str):
        self.host, self.port = parse_address(addr)
        self._data: dict | None = None
        self._ask: Callable[[float], dict | None] | None = None
        self._missed = 0
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Bind and serve; OSError when the address cannot be bound.  Returns where it listens."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        server_class = _V6Server if ":" in self.host else WSGIServer
        self._server = make_server(self.host, self.port, make_wsgi_app(registry), server_class,
                                   handler_class=_Quiet)
        self.port = self._server.server_port
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name="pcibackd-metrics", daemon=True)
        self._thread.start()
        return f"http://{self.host}:{self.port}/metrics"

    def _serve(self) -> None:
        """Serve until :meth:`close`, asleep on the listening socket and a stop pipe (not
        socketserver's serve_forever, which wakes every half second to look for a stop)."""
        with selectors.DefaultSelector() as sel:
            sel.register(self._server, selectors.EVENT_READ)
            sel.register(self._stop_r, selectors.EVENT_READ)
            while all(key.fileobj is not self._stop_r for key, _ in sel.select()):
                self._server.handle_request()

    def attach(self, ask: Callable[[float], dict | None]) -> None:
        """How a scrape gets :func:`~pcibackd.control.metricsdata.collect`'s data from the
        supervisor's loop: ``ask(timeout)``, called from this listener's thread, None when
        no answer came within ``timeout`` seconds."""
        self._ask = ask

    def collect(self) -> Iterator[Metric]:
        """From the HTTP thread (the registry's collector): a snapshot the loop took for
        this scrape, or the last one if it does not answer within :data:`WAIT`."""
        ask = self._ask
        data = ask(self.WAIT) if ask is not None else None
        if data is not None:
            self._data = data
        elif ask is not None:
            self._missed += 1
            if worth_logging(self._missed):
                logger.warning("metrics: no snapshot from the supervisor within {} s ({} times so far): "
                               "serving the last one", self.WAIT, self._missed)
        return families(self._data) if self._data is not None else iter(())

    def close(self) -> None:
        """Stop serving (a scrape in progress ends first: at most :data:`WAIT` s)."""
        self._ask = None
        if self._server is not None:
            os.write(self._stop_w, b"x")
            self._thread.join()
            self._server.server_close()
            self._server = None
            os.close(self._stop_r)
            os.close(self._stop_w)


class _V6Server(WSGIServer):
    address_family = socket.AF_INET6
