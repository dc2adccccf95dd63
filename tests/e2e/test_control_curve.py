"""The optional TCP control endpoint: off unless configured, then CURVE only,
and only for the client keys the daemon's curve dir allows."""

from __future__ import annotations

import json
import os
import shutil

import psutil
import pytest
import zmq
from zmq.utils.monitor import parse_monitor_message

from pcibackd.control.curve import keygen
from simdom0.dom0 import SimDom0

from test_control_commands import ctl, two_guests


@pytest.fixture
def keys(tmp_path):
    """Daemon dir (server key pair, clients/admin.key) and two client dirs: allowed and not."""
    server = tmp_path / "curve"
    keygen(server, "server")
    (server / "clients").mkdir()
    clients = {}
    for name in ("allowed", "stranger"):
        d = tmp_path / name
        keygen(d, "client")
        shutil.copy(server / "server.key", d / "server.key")
        clients[name] = d
    shutil.copy(clients["allowed"] / "client.key", server / "clients" / "admin.key")
    return server, clients


def _start(request, config):
    dom0 = SimDom0(log_level="DEBUG", config=config)
    try:
        dom0.start()
    except BaseException:
        dom0.stop()
        raise
    request.addfinalizer(dom0.stop)
    return dom0


@pytest.fixture
def tcp_dom0(request, keys):
    server, clients = keys
    dom0 = _start(request, {"control_tcp": "tcp://127.0.0.1:*", "control_curve_dir": str(server)})
    endpoint = dom0.status()["daemon"]["control"]["tcp"]
    assert endpoint.startswith("tcp://127.0.0.1:")
    return dom0, endpoint, clients


def test_allowed_key_over_tcp_table_and_json(tcp_dom0):
    dom0, endpoint, clients = tcp_dom0
    two_guests(dom0)
    over_tcp = ["--runtime-dir", "/nonexistent", "--endpoint", endpoint, "--curve-dir", str(clients["allowed"])]
    p = ctl(dom0, *over_tcp, "status")
    assert p.returncode == 0, p.stderr
    assert "2 guest(s)" in p.stdout and ["1", "0000:00:05.0", "0000:00:00.0"] in [x.split()[:3] for x in
                                                                                  p.stdout.splitlines()]
    p = ctl(dom0, *over_tcp, "--json", "list")
    assert p.returncode == 0 and [g["domid"] for g in json.loads(p.stdout)] == [1, 2]
    assert dom0.status()["guests"][0]["domid"] == 1         # ipc keeps working alongside


def test_other_keys_are_refused(tcp_dom0):
    dom0, endpoint, clients = tcp_dom0
    p = ctl(dom0, "--endpoint", endpoint, "--curve-dir", str(clients["stranger"]), "status")
    assert p.returncode == 4 and "refused this client's CURVE key" in p.stderr and p.stdout == ""
    # a client with the wrong server key cannot get in either
    shutil.copy(clients["stranger"] / "client.key", clients["allowed"] / "server.key")
    p = ctl(dom0, "--endpoint", endpoint, "--curve-dir", str(clients["allowed"]), "--timeout", "2", "status")
    assert p.returncode in (4, 5) and p.stdout == "", p.stderr
    assert dom0.daemon.poll() is None and dom0.status()["guests"] == []


def test_plain_tcp_client_gets_nothing(tcp_dom0):
    dom0, endpoint, _ = tcp_dom0
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    events = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                                  | zmq.EVENT_DISCONNECTED)
    s.connect(endpoint)
    s.send(b'{"id": 1, "command": "status"}')
    assert events.poll(5000), "the NULL-mechanism client was not cut off"
    assert parse_monitor_message(events.recv_multipart())["event"] in (
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_DISCONNECTED)
    assert not s.poll(500)
    s.disable_monitor()
    events.close()
    s.close()
    p = ctl(dom0, "--endpoint", endpoint, "status")          # pcibackctl will not even try
    assert p.returncode == 2 and "CURVE only" in p.stderr


def test_no_tcp_unless_configured(dom0):
    assert dom0.status()["daemon"]["control"]["tcp"] is None
    daemon = psutil.Process(dom0.daemon.pid)
    assert daemon.net_connections(kind="inet") == []


def test_a_readable_server_key_stops_the_daemon(request, keys):
    server, _ = keys
    os.chmod(server / "server.key_secret", 0o644)
    with pytest.raises(RuntimeError, match="chmod 600"):
        _start(request, {"control_tcp": "tcp://127.0.0.1:*", "control_curve_dir": str(server)})


def test_control_tcp_must_be_tcp(request, tmp_path):
    with pytest.raises(RuntimeError, match="control_tcp: must be tcp://"):
        _start(request, {"control_tcp": f"ipc://{tmp_path}/x.sock"})
