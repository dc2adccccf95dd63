"""The worker's messages to the supervisor: one typed report, serialized in one
place, parsed as untrusted input (anything off-type is a BadMessage, nothing else)."""

from __future__ import annotations

import json
import random

import pytest

from pcibackd.wire.bdf import BDF
from pcibackd.worker.link import (BadMessage, DeviceReport, Latency, ServiceTimes, WorkerCommand, WorkerReply,
                                  WorkerReport, parse_worker_message)

REPORT = WorkerReport(domid=3, pid=4242, token="ab" * 16, final=False, xenbus_state=4, connected=True,
                      served={"conf_read": 12, "conf_write": 2},
                      op_errors={"conf_write": {"XEN_PCI_ERR_invalid_offset": 1}},
                      op_misses={"conf_read": {"XEN_PCI_ERR_dev_not_found": 9, "XEN_PCI_ERR_invalid_offset": 1}},
                      spurious=5, ignored_inputs=0, latency_us=Latency(11.5, 80.25, 14),
                      service=ServiceTimes((10.0, 100.0), (3, 10, 1), 950.5), cpu_seconds=0.25,
                      devices=(DeviceReport(BDF(0, 0, 5, 0), BDF(0, 0, 0, 0), False, 0),
                               DeviceReport(BDF(0, 2, 0, 0), BDF(0, 0, 1, 0), True, 7)),
                      started=1700000000.25)


def beat_dict() -> dict:
    return json.loads(REPORT.to_json())


def test_report_round_trip_and_wire_shape():
    assert parse_worker_message(REPORT.to_json()) == REPORT
    d = beat_dict()
    assert d["type"] == "beat" and d["devices"][1] == {"bdf": "0000:02:00.0", "vbdf": "0000:00:01.0",
                                                       "permissive": True, "denied_writes": 7}
    assert d["latency_us"] == {"p50": 11.5, "p99": 80.25, "n": 14}
    assert d["service"] == {"bounds_us": [10.0, 100.0], "counts": [3, 10, 1], "sum_us": 950.5}
    assert d["op_misses"]["conf_read"] == {"XEN_PCI_ERR_dev_not_found": 9, "XEN_PCI_ERR_invalid_offset": 1}
    bare = WorkerReport(domid=1, pid=2, token="t")
    assert parse_worker_message(bare.to_json()) == bare and bare.to_dict()["latency_us"] is None


def test_a_report_without_the_counters_an_older_worker_lacks():
    d = beat_dict()
    for key in ("op_errors", "op_misses", "service", "cpu_seconds"):
        del d[key]
    d["errors"] = {"invalid_offset": 1}                      # what an older worker sent: ignored
    msg = parse_worker_message(json.dumps(d).encode())
    assert (msg.op_errors, msg.op_misses, msg.service, msg.cpu_seconds) == ({}, {}, None, 0.0)
    assert msg.served == REPORT.served


def test_reply_round_trip():
    r = WorkerReply(domid=3, pid=4242, token="t", id="0f" * 16, ok=False, result={"why": ["nested", 1]})
    assert parse_worker_message(r.to_json()) == r


def test_command_round_trip():
    c = WorkerCommand("permissive", {"bdf": "0000:00:05.0", "on": True}, "id1")
    assert WorkerCommand.from_json(c.to_json()) == c
    assert WorkerCommand.from_json(WorkerCommand("ack").to_json()) == WorkerCommand("ack", {}, None)
    for bad in (b"[]", b'{"cmd": 1}', b'{"cmd": "x", "args": []}'):
        with pytest.raises(BadMessage):
            WorkerCommand.from_json(bad)


def _with(**changes) -> bytes:
    d = beat_dict()
    for k, v in changes.items():
        if v is _DROP:
            del d[k]
        else:
            d[k] = v
    return json.dumps(d).encode()


_DROP = object()


@pytest.mark.parametrize("raw", [
    b"", b"\xff\xfe", b"[" * 70000, b"null", b"[1]", b'"beat"', b"{}",
    b'{"type": "beat"}', b'{"type": ["beat"]}', b'{"type": "reboot"}', b'{"domid": 2}',
    b'{"type": "beat", "domid": NaN}', b'{"type": "beat", "started": Infinity}',
    _with(domid="3"), _with(domid=True), _with(domid=3.0), _with(domid=2 ** 70), _with(pid=None),
    _with(pid=_DROP), _with(token=5), _with(token="x" * 100), _with(final="yes"), _with(xenbus_state="4"),
    _with(connected=1), _with(served=[1]), _with(served={"conf_read": "12"}), _with(served={"x": -1}),
    _with(op_errors={"a": True}), _with(op_errors={"a": {"b": -1}}), _with(op_errors=[]),
    _with(op_misses={"a": {"b": 1.5}}), _with(op_misses={"x" * 80: {}}), _with(cpu_seconds=-1),
    _with(cpu_seconds="1"), _with(service=[]), _with(service={"bounds_us": [1], "counts": [1]}),
    _with(service={"bounds_us": [1, 1], "counts": [1, 2, 3], "sum_us": 0}),
    _with(service={"bounds_us": [0, 1], "counts": [1, 2, 3], "sum_us": 0}),
    _with(service={"bounds_us": [1, 2], "counts": [1, 2], "sum_us": 0}),
    _with(service={"bounds_us": [1, 2], "counts": [1, 2, -3], "sum_us": 0}),
    _with(service={"bounds_us": list(range(1, 40)), "counts": [0] * 40, "sum_us": 0}),
    _with(spurious=-1), _with(ignored_inputs=1.5), _with(latency_us=[1, 2]),
    _with(latency_us={"p50": 1}), _with(latency_us={"p50": "1", "p99": 2, "n": 1}), _with(devices={}),
    _with(devices=[1]), _with(devices=[{"bdf": "0000:00:05.0"}]),
    _with(devices=[{"bdf": "zz", "vbdf": "0000:00:00.0", "permissive": False, "denied_writes": 0}]),
    _with(devices=[{"bdf": "0000:00:05.0", "vbdf": "0000:00:00.0", "permissive": 0, "denied_writes": 0}]),
    _with(started="now"), _with(started=_DROP),
    b'{"type": "reply", "domid": 3, "pid": 1, "token": "t", "id": 7, "ok": true}',
    b'{"type": "reply", "domid": 3, "pid": 1, "token": "t", "id": "a", "ok": "yes"}',
], ids=lambda raw: raw[:50].decode(errors="replace"))
def test_malformed_messages_are_bad_messages(raw):
    with pytest.raises(BadMessage):
        parse_worker_message(raw)


def test_extra_keys_are_ignored():
    d = beat_dict()
    d["from_the_future"] = {"x": 1}
    assert parse_worker_message(json.dumps(d).encode()) == REPORT


def _mutate(value, rnd: random.Random):
    """A random change somewhere inside a JSON value."""
    junk = [None, True, -1, 2 ** 80, 1.5, "", "x" * 80, [], {}, [1], {"a": "b"}]
    if isinstance(value, dict) and value and rnd.random() < 0.8:
        key = rnd.choice(list(value))
        return {**value, key: _mutate(value[key], rnd)}
    if isinstance(value, list) and value and rnd.random() < 0.8:
        i = rnd.randrange(len(value))
        return value[:i] + [_mutate(value[i], rnd)] + value[i + 1:]
    return rnd.choice(junk)


def test_random_mutations_parse_or_raise_bad_message_only():
    rnd = random.Random(1234)
    base = beat_dict()
    outcomes = set()
    for _ in range(3000):
        raw = json.dumps(_mutate(base, rnd)).encode()
        try:
            msg = parse_worker_message(raw)
        except BadMessage:
            outcomes.add("bad")
        else:
            assert isinstance(msg, WorkerReport)
            outcomes.add("ok")
    assert outcomes == {"bad", "ok"}
