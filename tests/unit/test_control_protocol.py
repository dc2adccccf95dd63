"""The control protocol without a daemon: request parsing, argument checks,
worker round trips, framing, the command registry and the renderers."""

from __future__ import annotations

import json
import os
import time

import pytest
import zmq

from pcibackd.control import cli
from pcibackd.control.client import NotRunning, call
from pcibackd.control.commands import COMMANDS
from pcibackd.control.commands.base import WORKER_TIMEOUT
from pcibackd.control.protocol import Errno
from pcibackd.control.protocol import reply as encode_reply
from pcibackd.control.server import MAX_PENDING, ControlServer, ControlSetupError
from pcibackd.daemon.states import WorkerState
from pcibackd.daemon.tally import Tally
from pcibackd.daemon.views import DaemonInfo, GuestInfo
from pcibackd.wire.bdf import BDF
from pcibackd.worker.link import DeviceReport, Latency, WorkerReply, WorkerReport


PID0 = 4_195_000       # workers' pids: above the kernel's largest (4194304), so never a live process


def guest(domid, state="RUNNING", devices=(), pid=None, latency=None, last_exit="", beat=True) -> GuestInfo:
    """A guest as the daemon shows it, with a heartbeat listing ``devices`` (host BDFs)."""
    running = state == "RUNNING"
    report = WorkerReport(domid=domid, pid=PID0 + domid, token="t", xenbus_state=4, connected=True,
                          served={"conf_read": 10}, op_errors={"conf_read": {"XEN_PCI_ERR_invalid_offset": 1}},
                          op_misses={"conf_read": {"XEN_PCI_ERR_dev_not_found": 7}}, latency_us=latency,
                          cpu_seconds=1.5, devices=tuple(DeviceReport(BDF.parse(b), BDF(0, 0, i, 0), False, 0)
                                                         for i, b in enumerate(devices)))
    tally = Tally()
    tally.add(report)
    return GuestInfo(domid=domid, state=WorkerState(state), pid=(pid or PID0 + domid) if running else None,
                     adopted=False, restarts=0, last_exit=last_exit, heartbeat_age=0.1 if running else None,
                     report=report if beat else None, name=f"guest{domid}",
                     totals=tally.totals() if beat else None)


class FakeDaemon:
    """A DaemonFace recording what the commands asked of it."""

    def __init__(self, guests=None):
        self.policy_path = None
        self.guest_list = guests if guests is not None else [guest(1, devices=["0000:00:05.0"]), guest(2)]
        self.sent, self.restarted, self.level = [], [], None
        self.send_ok = True
        self.control = None

    def about(self):
        return DaemonInfo(version="0", pid=1, uptime=1.0, platform="sim", topology="vpci", xenstore="x",
                          xenstore_connected=True, control=self.control and self.control.endpoints)

    def guests(self):
        return list(self.guest_list)

    def assignable(self):
        return [BDF.parse("0000:00:05.0"), BDF.parse("0000:00:07.0")]

    def observe_cpu(self, domid, pid, seconds):
        return None

    release_records: dict = {}

    def releases(self):
        return dict(self.release_records)

    def clear_quarantine(self, bdf):
        record, quarantined = self.release_records.get(bdf, (None, False))
        self.release_records = {**self.release_records, bdf: (record, False)}
        return quarantined

    def restart(self, domid):
        self.restarted.append(domid)
        return any(g.domid == domid for g in self.guest_list)

    def set_log_level(self, level):
        self.level = level

    def send_worker(self, domid, cmd, args=None, req_id=None):
        self.sent.append((domid, cmd, args, req_id))
        return self.send_ok


def reply(domid, req_id, ok=True, result=None) -> WorkerReply:
    return WorkerReply(domid=domid, pid=PID0 + domid, token="t", id=req_id, ok=ok, result=result)


@pytest.fixture
def runtime(tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def server(runtime):
    ctx = zmq.Context()
    srv = ControlServer(ctx, runtime / "control.sock", FakeDaemon())
    yield srv
    srv.close()
    ctx.term()


def dispatch(server, req) -> dict:
    raw = req if isinstance(req, bytes) else json.dumps(req).encode()
    answer = server.dispatch(raw)
    assert isinstance(answer, bytes), answer
    rep = json.loads(answer)
    assert set(rep) == {"id", "status", "errno", "reason", "result"}
    assert (rep["status"] == "ok") == (rep["errno"] == 0)
    return rep


# ------------------------------------------------------------- requests --
@pytest.mark.parametrize("raw,errno", [
    (b"{", Errno.INVALID_JSON),
    (b"", Errno.INVALID_JSON),
    (b"\xff\xfe\x00", Errno.INVALID_JSON),
    (b"[" * 200_000, Errno.INVALID_JSON),              # nests past the recursion limit
    (b'{"command": "status"' + b" " * 10, Errno.INVALID_JSON),
    (b"null", Errno.BAD_MESSAGE),
    (b"[1, 2]", Errno.BAD_MESSAGE),
    (b'"status"', Errno.BAD_MESSAGE),
    (b'{"id": {"a": 1}, "command": "status"}', Errno.BAD_MESSAGE),
    (b'{"id": "' + b"x" * 200 + b'", "command": "status"}', Errno.BAD_MESSAGE),
    (b'{"id": 1, "command": 7}', Errno.BAD_MESSAGE),
    (b'{"id": 1}', Errno.BAD_MESSAGE),
    (b'{"id": 1, "command": "status", "args": [1]}', Errno.BAD_ARGUMENTS),
    (b'{"id": 1, "command": "reboot-dom0"}', Errno.UNKNOWN_COMMAND),
    (b'{"id": 1, "command": "STATUS"}', Errno.UNKNOWN_COMMAND),
])
def test_bad_requests_get_an_error_reply(server, raw, errno):
    rep = dispatch(server, raw)
    assert rep["status"] == "error" and rep["errno"] == errno and rep["reason"]
    assert rep["result"] is None


def test_request_id_is_echoed_even_on_errors(server):
    assert dispatch(server, {"id": "abc", "command": "nope"})["id"] == "abc"
    assert dispatch(server, {"id": 7, "command": "restart", "args": {}})["id"] == 7
    assert dispatch(server, {"id": "s1", "command": "status"}) ["id"] == "s1"


@pytest.mark.parametrize("command,args,fragment", [
    ("restart", {}, "missing argument(s) domid"),
    ("restart", {"domid": "3"}, "domid must be an integer"),
    ("restart", {"domid": True}, "domid must be an integer"),
    ("restart", {"domid": 3.0}, "domid must be an integer"),
    ("restart", {"domid": None}, "domid must be an integer"),
    ("restart", {"domid": 0}, "domid must be 1.."),
    ("restart", {"domid": 0x7FF0}, "domid must be 1.."),
    ("restart", {"domid": 1, "force": True}, "unknown argument(s) force"),
    ("permissive", {"mode": "maybe", "bdf": "0000:00:05.0"}, "mode must be one of on, off"),
    ("permissive", {"mode": "on", "bdf": 5}, "bdf must be a string"),
    ("permissive", {"mode": "on", "bdf": "zz:00.0"}, "not a PCI address"),
    ("permissive", {"mode": "on", "bdf": "0" * 1000}, "at most 64"),
    ("log-level", {"level": ["DEBUG"]}, "level must be a string"),
    ("log-level", {"level": "LOUD"}, "level must be one of"),
    ("status", {"verbose": 1}, "unknown argument(s) verbose"),
])
def test_wrong_arguments_are_rejected(server, command, args, fragment):
    rep = dispatch(server, {"id": 1, "command": command, "args": args})
    assert rep["errno"] == Errno.BAD_ARGUMENTS and fragment in rep["reason"], rep
    assert server.face.restarted == [] and server.face.sent == [] and server.face.level is None


def test_not_found_and_failing_command(server):
    rep = dispatch(server, {"id": 1, "command": "restart", "args": {"domid": 9}})
    assert rep["errno"] == Errno.NOT_FOUND and "domid 9" in rep["reason"]
    rep = dispatch(server, {"id": 1, "command": "permissive", "args": {"mode": "on", "bdf": "00:07.0"}})
    assert rep["errno"] == Errno.NOT_FOUND
    server.face.guests = lambda: 1 / 0            # a bug in a hook: answered, not raised
    rep = dispatch(server, {"id": 1, "command": "status"})
    assert rep["errno"] == Errno.COMMAND_FAILED and "ZeroDivisionError" in rep["reason"]


def test_permissive_on_a_worker_that_is_not_running(server):
    server.face.guest_list = [guest(3, state="BACKOFF", devices=["0000:00:05.0"])]
    rep = dispatch(server, {"id": 1, "command": "permissive", "args": {"mode": "on", "bdf": "0000:00:05.0"}})
    assert rep["errno"] == Errno.COMMAND_FAILED and "BACKOFF" in rep["reason"]


# ---------------------------------------------------- worker round trips --
def start(server, req):
    answer = server.dispatch(json.dumps(req).encode())
    assert isinstance(answer, tuple), answer
    sent = []
    server._send = lambda envelope, data: sent.append(json.loads(data))
    server._start_pending([b"client"], *answer)
    return sent


def worker_ids(server):
    return {domid: req_id for domid, _, _, req_id in server.face.sent}


def test_fan_out_collects_every_worker(server):
    sent = start(server, {"id": "r", "command": "log-level", "args": {"level": "debug"}})
    assert server.face.level == "DEBUG"
    assert sorted((d, c, a) for d, c, a, _ in server.face.sent) == [(1, "log-level", {"level": "DEBUG"}),
                                                                   (2, "log-level", {"level": "DEBUG"})]
    ids = worker_ids(server)
    server.worker_reply(reply(1, ids[1], result="DEBUG"))
    server.worker_reply(reply(1, "someone-else", ok=False))            # ignored
    server.worker_reply(reply(3, ids[1], ok=False))                    # not asked: ignored
    server.flush_pending()
    assert sent == []                                                  # still waiting for dom2
    server.worker_reply(reply(2, ids[2], result="DEBUG"))
    server.flush_pending()
    assert sent == [{"id": "r", "status": "ok", "errno": 0, "reason": "",
                     "result": {"level": "DEBUG", "workers": [{"domid": 1, "result": "DEBUG"},
                                                              {"domid": 2, "result": "DEBUG"}]}}]
    assert server.pending == {}


def test_fan_out_worker_failure_and_timeout(server):
    sent = start(server, {"id": "r", "command": "policy-reload"})
    ids = worker_ids(server)
    server.worker_reply(reply(2, ids[2], result=[]))
    server.flush_pending()
    assert sent == []
    for p in server.pending.values():
        assert p.deadline <= time.monotonic() + WORKER_TIMEOUT
        p.deadline = time.monotonic() - 1                               # time is up
    server.flush_pending()
    assert [(r["id"], r["errno"]) for r in sent] == [("r", Errno.TIMEOUT)] and "domain(s) 1" in sent[0]["reason"]

    sent = start(server, {"id": "p", "command": "permissive", "args": {"mode": "on", "bdf": "00:05.0"}})
    server.worker_reply(reply(1, worker_ids(server)[1], ok=False, result="LookupError: gone"))
    server.flush_pending()
    assert sent[0]["errno"] == Errno.COMMAND_FAILED and "LookupError: gone" in sent[0]["reason"]


def test_unreachable_worker_fails_at_once(server):
    server.face.send_ok = False
    sent = start(server, {"id": "r", "command": "log-level", "args": {"level": "INFO"}})
    assert sent and sent[0]["errno"] == Errno.COMMAND_FAILED and "not reachable" in sent[0]["reason"]


def test_no_running_worker_needs_no_round_trip(server):
    server.face.guest_list = [guest(4, state="FATAL")]
    rep = dispatch(server, {"id": 1, "command": "policy-reload"})
    assert rep["result"] == {"policy": None, "workers": []}


def test_pending_requests_are_bounded(server):
    for i in range(MAX_PENDING):
        start(server, {"id": i, "command": "log-level", "args": {"level": "INFO"}})
    rep = dispatch(server, {"id": "more", "command": "log-level", "args": {"level": "INFO"}})
    assert rep["errno"] == Errno.BUSY and rep["id"] == "more"
    assert dispatch(server, {"id": 1, "command": "status"})["status"] == "ok"     # reads still answered


def test_policy_reload_checks_the_file_first(server, tmp_path):
    bad = tmp_path / "policy.toml"
    bad.write_text("permissive = maybe\n")
    server.face.policy_path = str(bad)
    rep = dispatch(server, {"id": 1, "command": "policy-reload"})
    assert rep["errno"] == Errno.COMMAND_FAILED and "not reloaded" in rep["reason"]
    assert server.face.sent == []


# ------------------------------------------------------------- sockets --
def test_socket_is_private_and_answers_dealer_and_req(server, runtime):
    assert oct(os.stat(runtime / "control.sock").st_mode & 0o777) == "0o600"
    ctx = zmq.Context.instance()
    for kind in (zmq.DEALER, zmq.REQ):
        s = ctx.socket(kind)
        s.linger = 0
        s.connect(f"ipc://{runtime}/control.sock")
        s.send(b'{"id": "k", "command": "list"}')
        rep = _serve_until_reply(server, s)
        assert rep["id"] == "k" and rep["status"] == "ok" and [g["domid"] for g in rep["result"]] == [1, 2]
        s.close()


def test_multi_frame_request_gets_an_error_reply(server, runtime):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    s.connect(f"ipc://{runtime}/control.sock")
    s.send_multipart([b'{"id": 1, "command": "status"}', b"extra"])
    rep = _serve_until_reply(server, s)
    assert rep["errno"] == Errno.BAD_MESSAGE and "one frame" in rep["reason"]
    s.close()


def _serve_until_reply(server, sock, timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.sock.poll(50):
            server.handle_ready()
        if sock.poll(0):
            return json.loads(sock.recv())
    raise AssertionError("no reply")


def test_a_second_server_does_not_steal_a_live_socket(server, runtime):
    with pytest.raises(ControlSetupError, match="another pcibackd"):
        ControlServer(zmq.Context.instance(), runtime / "control.sock", FakeDaemon())


def test_refuses_an_open_runtime_dir(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o755)
    with pytest.raises(ControlSetupError, match="mode 0700"):
        ControlServer(zmq.Context.instance(), d / "control.sock", FakeDaemon())


def test_client_not_running_and_stale_socket(runtime):
    with pytest.raises(NotRunning, match="no control socket"):
        call(runtime, "status", timeout=1)
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(runtime / "control.sock"))
    s.close()                                                   # a socket file nobody listens on
    with pytest.raises(NotRunning, match="stale"):
        call(runtime, "status", timeout=1)


# ------------------------------------------------------------ registry --
def test_registry_one_module_per_command_docstring_is_help(capsys):
    assert set(COMMANDS) == {"status", "list", "devices", "restart", "permissive", "policy-reload", "log-level",
                             "quarantine-clear", "metrics", "assignable-add", "assignable-remove",
                             "assignable-list", "pci-attach", "pci-detach", "pci-list"}
    for name, cmd in COMMANDS.items():
        assert cmd.execute.__module__ == f"pcibackd.control.commands.{name.replace('-', '_')}"
        assert cmd.doc == __import__(cmd.execute.__module__, fromlist=["x"]).__doc__.strip()
        with pytest.raises(SystemExit) as exc:
            cli.main([*cmd.words, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert cmd.doc.splitlines()[0] in out and cmd.doc.splitlines()[-1].strip() in out
    assert COMMANDS["policy-reload"].words == ("policy", "reload")


@pytest.mark.parametrize("argv", [["policy-reload"], ["policy"], ["restart", "one"], ["permissive", "maybe", "00:05.0"],
                                  ["restart"], ["frobnicate"], ["--endpoint", "tcp://127.0.0.1:1", "status"]])
def test_cli_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2


def test_cli_daemon_not_running_exit_3(runtime, capsys):
    assert cli.main(["--runtime-dir", str(runtime), "status"]) == 3
    assert "pcibackd is not running" in capsys.readouterr().err


# ----------------------------------------------------------- renderers --
def status_of(*guests) -> dict:
    """What the status command returns (as its client gets it) for these guests."""
    return json.loads(encode_reply(1, COMMANDS["status"].execute(FakeDaemon(list(guests)), {})))["result"]


def test_status_render_latency_dash_until_workers_report_it():
    st = status_of(guest(1, devices=["0000:00:05.0"]),
                   guest(2, state="FATAL", last_exit="exit 1", latency=Latency(12.4, 2500.0, 7)))
    st["guests"][0].update(rss=30 << 20, uss=8 << 20)
    text = COMMANDS["status"].render(st)
    lines = text.splitlines()
    assert lines[1] == "xenstore x: connected"
    head = lines[lines.index("") + 1].split()
    assert head == ["DOMID", "NAME", "XENBUS", "WORKER", "PID", "RESTARTS", "RSS", "USS", "CPU", "CPU%", "OPS",
                    "MISSES", "ERRORS", "P50", "P99"]
    row1 = next(line.split() for line in lines if line.startswith("1 ") and "RUNNING" in line)
    assert row1 == ["1", "guest1", "Connected", "RUNNING", str(PID0 + 1), "0", "30.0M", "8.0M", "1.50s", "-", "10", "7",
                    "1", "-", "-"]                    # CPU% unknown without a process; P50, P99 too
    row2 = next(line for line in lines if line.startswith("2 ") and "FATAL" in line)
    assert "12us" in row2 and "2.5ms" in row2
    assert any("conf_read=10" in line and "XEN_PCI_ERR_dev_not_found=7" in line
               and "XEN_PCI_ERR_invalid_offset=1" in line for line in lines)
    assert any(line.startswith("2 ") and line.rstrip().endswith("exit 1") for line in lines)
    dev = next(line.split() for line in lines if line.startswith("1 ") and "0000:00:05.0" in line)
    assert dev == ["1", "0000:00:05.0", "0000:00:00.0", "no", "0", "off", "off", "no", "-"]


def test_status_header_shows_a_lost_xenstore():
    st = status_of()
    st["daemon"]["xenstore_connected"] = False
    assert COMMANDS["status"].render(st).splitlines()[1].startswith("xenstore x: DISCONNECTED")


def test_renderers_of_empty_results():
    st = status_of()
    assert st["guests"] == [] and COMMANDS["status"].render(st).endswith("0 guest(s)")
    assert COMMANDS["list"].render([]).split() == ["DOMID", "NAME", "WORKER", "XENBUS", "HOST", "BDF", "GUEST",
                                                   "BDF"]
    assert COMMANDS["list"].render([{"domid": 3, "name": "", "worker_state": "RUNNING", "xenbus_state": None,
                                     "devices": []}]).splitlines()[1].split() == ["3", "-", "RUNNING", "-", "-", "-"]
    assert COMMANDS["devices"].render([{"bdf": "0000:00:07.0", "held_by": None}]).splitlines()[1].split() == \
        ["0000:00:07.0", "-", "-", "-"]


GUEST_KEYS = {"domid", "name", "worker_state", "pid", "adopted", "restarts", "last_exit", "xenbus_state",
              "connected", "served", "misses", "errors", "cpu_seconds", "cpu_percent", "cpu_window", "latency_us",
              "devices", "heartbeat_age"}


def test_status_json_shape():
    st = status_of(guest(1, devices=["0000:00:05.0"], latency=Latency(12.5, 99.0, 3)), guest(2, beat=False))
    assert set(st) == {"daemon", "guests"}
    assert set(st["daemon"]) == {"version", "pid", "uptime", "platform", "topology", "xenstore",
                                 "xenstore_connected", "control"}
    g1, g2 = st["guests"]
    assert set(g1) == set(g2) == GUEST_KEYS            # no process figures: no such pids
    assert g1["devices"] == [{"bdf": "0000:00:05.0", "vbdf": "0000:00:00.0", "permissive": False,
                              "denied_writes": 0, "msi": None, "msix": {}, "msix_prepared": False,
                              "irq_error": None}]
    assert (g1["name"], g1["worker_state"], g1["xenbus_state"], g1["connected"], g1["latency_us"]) == \
        ("guest1", "RUNNING", 4, True, {"p50": 12.5, "p99": 99.0, "n": 3})
    assert (g1["served"], g1["errors"], g1["misses"]) == \
        ({"conf_read": 10}, {"conf_read": {"XEN_PCI_ERR_invalid_offset": 1}},
         {"conf_read": {"XEN_PCI_ERR_dev_not_found": 7}})
    assert (g1["cpu_seconds"], g1["cpu_percent"]) == (1.5, None)
    # no heartbeat yet: nothing known
    assert (g2["xenbus_state"], g2["connected"], g2["served"], g2["errors"], g2["misses"], g2["latency_us"],
            g2["devices"], g2["cpu_seconds"]) == (None, False, {}, {}, {}, None, [], None)


def test_list_and_devices_read_the_reports(server):
    server.face.guest_list = [guest(1, devices=["0000:00:05.0", "0000:02:00.0"]), guest(2, beat=False)]
    assert dispatch(server, {"id": 1, "command": "list"})["result"] == [
        {"domid": 1, "name": "guest1", "worker_state": "RUNNING", "xenbus_state": 4,
         "devices": [{"bdf": "0000:00:05.0", "vbdf": "0000:00:00.0"}, {"bdf": "0000:02:00.0", "vbdf": "0000:00:01.0"}]},
        {"domid": 2, "name": "guest2", "worker_state": "RUNNING", "xenbus_state": None, "devices": []}]
    assert dispatch(server, {"id": 1, "command": "devices"})["result"] == [
        {"bdf": "0000:00:05.0", "held_by": 1, "reset": None, "quarantined": False},
        {"bdf": "0000:00:07.0", "held_by": None, "reset": None, "quarantined": False}]


def test_devices_shows_the_last_reset_and_a_quarantine_only_force_clears(server):
    from pcibackd.hostpci.release import ReleaseRecord
    ok = ReleaseRecord("0000:00:05.0", "flr", True, restored=("header.0x04",), when=1.0)
    bad = ReleaseRecord("0000:00:09.0", "pm", False, "every method failed (ENOTTY)", when=2.0)
    server.face.release_records = {BDF.parse(ok.bdf): (ok, False), BDF.parse(bad.bdf): (bad, True)}
    result = dispatch(server, {"id": 1, "command": "devices"})["result"]
    assert [(d["bdf"], d["reset"] and (d["reset"]["method"], d["reset"]["result"]), d["quarantined"])
            for d in result] == [("0000:00:05.0", ("flr", "ok"), False), ("0000:00:07.0", None, False),
                                 ("0000:00:09.0", ("pm", "failed"), True)]   # quarantined, even if not assignable
    rows = [line.split() for line in COMMANDS["devices"].render(result).splitlines()]
    assert rows[0] == ["BDF", "HELD", "BY", "LAST", "RESET", "QUARANTINED"]
    assert rows[1:] == [["0000:00:05.0", "1", "flr", "ok", "-"], ["0000:00:07.0", "-", "-", "-"],
                        ["0000:00:09.0", "-", "pm", "failed", "yes"]]
    clear = {"id": 2, "command": "quarantine-clear", "args": {"bdf": "0000:00:09.0", "force": False}}
    rep = dispatch(server, clear)
    assert rep["errno"] == Errno.BAD_ARGUMENTS and "--force" in rep["reason"] and "ENOTTY" in rep["reason"]
    assert server.face.release_records[BDF.parse(bad.bdf)][1]             # still quarantined
    rep = dispatch(server, {**clear, "args": {"bdf": "0000:00:09.0", "force": "yes"}})
    assert rep["errno"] == Errno.BAD_ARGUMENTS                            # a flag is a JSON boolean
    rep = dispatch(server, {**clear, "args": {"bdf": "0000:00:09.0", "force": True}})
    assert rep["status"] == "ok" and not server.face.release_records[BDF.parse(bad.bdf)][1]
    rep = dispatch(server, {**clear, "args": {"bdf": "0000:00:05.0", "force": True}})
    assert rep["errno"] == Errno.NOT_FOUND                                # never quarantined


def test_quarantine_clear_cli_sends_force_only_when_given(monkeypatch):
    sent = []
    monkeypatch.setattr(cli, "call", lambda rt, name, args, *a, **kw: sent.append((name, args)) or
                        {"status": "ok", "result": {"bdf": "0000:00:09.0", "method": "pm", "detail": ""}})
    assert cli.main(["quarantine", "clear", "0000:00:09.0"]) == 0
    assert cli.main(["quarantine", "clear", "--force", "0000:00:09.0"]) == 0
    assert sent == [("quarantine-clear", {"bdf": "0000:00:09.0", "force": False}),
                    ("quarantine-clear", {"bdf": "0000:00:09.0", "force": True})]


def test_status_fills_process_figures(server):
    server.face.guest_list = [guest(5, pid=os.getpid()), guest(7, state="FATAL")]
    g5, g7 = dispatch(server, {"id": 1, "command": "status"})["result"]["guests"]
    assert 0 < g5["uss"] <= g5["rss"] and g5["cpu_seconds"] == 1.5        # CPU: the workers' own reports
    assert "rss" not in g7
    assert g5["latency_us"] is None
    assert dispatch(server, {"id": 1, "command": "status"})["result"]["daemon"]["control"] is None
    server.face.control = server                     # as the supervisor reports its endpoint
    assert dispatch(server, {"id": 1, "command": "status"})["result"]["daemon"]["control"] == \
        {"ipc": str(server.path), "tcp": None}
