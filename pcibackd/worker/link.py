"""The messages between a worker and its supervisor (the link itself: :mod:`.reporter`).

Each message is a dataclass serialized here and nowhere else:
:class:`WorkerReport` (the heartbeat, with statistics), :class:`WorkerReply`
and :class:`WorkerIrqRequest` (a question for the interrupt broker) go to the
supervisor; :class:`WorkerCommand` and :class:`IrqReply` (the broker's answer)
come back.  The supervisor reads worker messages with
:func:`parse_worker_message`, the worker the supervisor's with
:func:`parse_supervisor_message`; both treat them as untrusted: anything not
exactly of the declared types is a :class:`BadMessage`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pcibackd.irq.messages import (Answer, WorkerRequest, answer_from_wire, answer_to_wire, request_from_wire,
                                   request_to_wire)
from pcibackd.wire.bdf import BDF

MAX_FRAME = 1 << 16      # both ends refuse larger frames (ZMQ_MAXMSGSIZE)
MAX_NAME = 64            # counter names, tokens, request ids


class BadMessage(ValueError):
    """A worker-socket frame that is not a well-formed worker message."""


# ------------------------------------------------------------ validators --
def _reject_constant(name: str):
    raise BadMessage(f"{name} is not allowed")


def _int(v, name: str) -> int:
    if type(v) is not int or not -2 ** 63 <= v < 2 ** 63:
        raise BadMessage(f"{name} must be an integer")
    return v


def _count(v, name: str) -> int:
    if _int(v, name) < 0:
        raise BadMessage(f"{name} must not be negative")
    return v


def _bool(v, name: str) -> bool:
    if type(v) is not bool:
        raise BadMessage(f"{name} must be true or false")
    return v


def _number(v, name: str) -> float:
    if type(v) not in (int, float):
        raise BadMessage(f"{name} must be a number")
    return v


def _str(v, name: str) -> str:
    if type(v) is not str or len(v) > MAX_NAME:
        raise BadMessage(f"{name} must be a string of at most {MAX_NAME} characters")
    return v


def _bdf(v, name: str) -> BDF:
    try:
        return BDF.parse(_str(v, name))
    except ValueError as exc:
        raise BadMessage(f"{name}: {exc}") from None


def _counts(v, name: str) -> dict[str, int]:
    if type(v) is not dict:
        raise BadMessage(f"{name} must be an object")
    return {_str(k, f"{name} key"): _count(n, f"{name}[{k[:20]!r}]") for k, n in v.items()}


def _by_op(v, name: str) -> dict[str, dict[str, int]]:
    """op name -> code name -> count; absent (an older worker) = none."""
    if v is None:
        return {}
    if type(v) is not dict:
        raise BadMessage(f"{name} must be an object")
    return {_str(op, f"{name} key"): _counts(codes, f"{name}[{op[:20]!r}]") for op, codes in v.items()}


def _seconds(v, name: str) -> float:
    """A non-negative number of seconds; absent (an older worker) = 0."""
    if v is None:
        return 0.0
    if _number(v, name) < 0:
        raise BadMessage(f"{name} must not be negative")
    return v


def _fields(table: dict, untrusted: dict, what: str) -> dict:
    """Each field of ``table`` checked by its validator (absent = None, which most refuse)."""
    if type(untrusted) is not dict:
        raise BadMessage(f"{what} must be an object")
    return {name: check(untrusted.get(name), name) for name, check in table.items()}


# -------------------------------------------------------------- messages --
@dataclass(frozen=True)
class DeviceReport:
    """One assigned function as its worker serves it."""

    bdf: BDF                 # host address
    vbdf: BDF                # address the guest sees
    permissive: bool
    denied_writes: int

    def to_dict(self) -> dict:
        return {"bdf": str(self.bdf), "vbdf": str(self.vbdf), "permissive": self.permissive,
                "denied_writes": self.denied_writes}

    @classmethod
    def from_dict(cls, untrusted: dict) -> "DeviceReport":
        return cls(**_fields(_DEVICE_FIELDS, untrusted, "a device"))


_DEVICE_FIELDS = {"bdf": _bdf, "vbdf": _bdf, "permissive": _bool, "denied_writes": _count}


@dataclass(frozen=True)
class Latency:
    """Op service time over the worker's last ops, in microseconds."""

    p50: float
    p99: float
    n: int

    def to_dict(self) -> dict:
        return {"p50": self.p50, "p99": self.p99, "n": self.n}

    @classmethod
    def from_dict(cls, untrusted: dict) -> "Latency":
        return cls(**_fields(_LATENCY_FIELDS, untrusted, "latency_us"))


_LATENCY_FIELDS = {"p50": _number, "p99": _number, "n": _count}


MAX_BUCKETS = 32


@dataclass(frozen=True)
class ServiceTimes:
    """Op service time as histogram buckets since the worker started: ``counts[i]`` ops
    took at most ``bounds_us[i]`` and more than the bound before; ``counts[-1]`` took longer
    than the last bound.  ``sum_us``: their total."""

    bounds_us: tuple[float, ...]
    counts: tuple[int, ...]
    sum_us: float

    def to_dict(self) -> dict:
        return {"bounds_us": list(self.bounds_us), "counts": list(self.counts), "sum_us": self.sum_us}

    @classmethod
    def from_dict(cls, untrusted: dict) -> "ServiceTimes":
        f = _fields(_SERVICE_FIELDS, untrusted, "service")
        bounds, counts = f["bounds_us"], f["counts"]
        if not bounds or any(b <= a for a, b in zip(bounds, bounds[1:])) or bounds[0] <= 0:
            raise BadMessage("service bounds_us must be positive and increasing")
        if len(counts) != len(bounds) + 1:
            raise BadMessage("service counts must have one more entry than bounds_us")
        return cls(tuple(bounds), tuple(counts), f["sum_us"])


def _list_of(check):
    def validate(v, name: str) -> list:
        if type(v) is not list or len(v) > MAX_BUCKETS + 1:
            raise BadMessage(f"{name} must be a list of at most {MAX_BUCKETS + 1} entries")
        return [check(x, name) for x in v]
    return validate


_SERVICE_FIELDS = {"bounds_us": _list_of(_number), "counts": _list_of(_count), "sum_us": _seconds}


def _service(v, name: str) -> ServiceTimes | None:
    return None if v is None else ServiceTimes.from_dict(v)


def _latency(v, name: str) -> Latency | None:
    return None if v is None else Latency.from_dict(v)


def _devices(v, name: str) -> tuple[DeviceReport, ...]:
    if type(v) is not list:
        raise BadMessage(f"{name} must be a list")
    return tuple(DeviceReport.from_dict(d) for d in v)


@dataclass(frozen=True)
class WorkerReport:
    """A heartbeat: who sends it (``domid``, ``pid``, ``token``) and what it serves."""

    domid: int
    pid: int
    token: str
    final: bool = False                  # the last beat before a deliberate exit
    xenbus_state: int = 0
    connected: bool = False              # the guest's ring is mapped
    served: dict[str, int] = field(default_factory=dict)     # ops by name
    # Answers by op name, then code name (worker/ops.py classify): errors, and probe misses.
    # All counters count from this worker's start; the supervisor adds up its workers'.
    op_errors: dict[str, dict[str, int]] = field(default_factory=dict)
    op_misses: dict[str, dict[str, int]] = field(default_factory=dict)
    spurious: int = 0                    # event-channel wake-ups with nothing to serve
    ignored_inputs: int = 0              # xenbus inputs the driver refused
    latency_us: Latency | None = None
    service: ServiceTimes | None = None  # op service time histogram
    cpu_seconds: float = 0.0             # user + system CPU time of the worker process
    devices: tuple[DeviceReport, ...] = ()
    started: float = 0.0                 # wall-clock start of the worker

    TYPE = "beat"

    def to_dict(self) -> dict:
        return {"type": self.TYPE, "domid": self.domid, "pid": self.pid, "token": self.token,
                "final": self.final, "xenbus_state": self.xenbus_state, "connected": self.connected,
                "served": dict(self.served), "op_errors": {op: dict(c) for op, c in self.op_errors.items()},
                "op_misses": {op: dict(c) for op, c in self.op_misses.items()}, "spurious": self.spurious,
                "ignored_inputs": self.ignored_inputs,
                "latency_us": self.latency_us.to_dict() if self.latency_us else None,
                "service": self.service.to_dict() if self.service else None, "cpu_seconds": self.cpu_seconds,
                "devices": [d.to_dict() for d in self.devices], "started": self.started}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict()).encode()

    @classmethod
    def from_dict(cls, untrusted: dict) -> "WorkerReport":
        return cls(**_fields(_REPORT_FIELDS, untrusted, "a report"))


_REPORT_FIELDS = {"domid": _int, "pid": _int, "token": _str, "final": _bool, "xenbus_state": _int,
                  "connected": _bool, "served": _counts, "op_errors": _by_op, "op_misses": _by_op,
                  "spurious": _count, "ignored_inputs": _count, "latency_us": _latency, "service": _service,
                  "cpu_seconds": _seconds, "devices": _devices, "started": _number}


def _any(v, name: str):
    return v


@dataclass(frozen=True)
class WorkerReply:
    """A worker's answer to a :class:`WorkerCommand` that carried an id."""

    domid: int
    pid: int
    token: str
    id: str
    ok: bool
    result: object = None                # any JSON value (the command's result, or why it failed)

    TYPE = "reply"

    def to_json(self) -> bytes:
        return json.dumps({"type": self.TYPE, "domid": self.domid, "pid": self.pid, "token": self.token,
                           "id": self.id, "ok": self.ok, "result": self.result}).encode()

    @classmethod
    def from_dict(cls, untrusted: dict) -> "WorkerReply":
        return cls(**_fields(_REPLY_FIELDS, untrusted, "a reply"))


_REPLY_FIELDS = {"domid": _int, "pid": _int, "token": _str, "id": _str, "ok": _bool, "result": _any}


def _irq_request(v, name: str) -> WorkerRequest:
    try:
        return request_from_wire(v)
    except (ValueError, TypeError) as exc:
        raise BadMessage(f"{name}: {str(exc)[:60]}") from None


@dataclass(frozen=True)
class WorkerIrqRequest:
    """A question for the interrupt broker (``request``: irq/messages.py); ``id`` pairs the answer."""

    domid: int
    pid: int
    token: str
    id: str
    request: WorkerRequest

    TYPE = "irq"

    def to_json(self) -> bytes:
        return json.dumps({"type": self.TYPE, "domid": self.domid, "pid": self.pid, "token": self.token,
                           "id": self.id, "request": request_to_wire(self.request)}).encode()

    @classmethod
    def from_dict(cls, untrusted: dict) -> "WorkerIrqRequest":
        return cls(**_fields(_IRQ_FIELDS, untrusted, "an irq request"))


_IRQ_FIELDS = {"domid": _int, "pid": _int, "token": _str, "id": _str, "request": _irq_request}
_MESSAGE_TYPES = {WorkerReport.TYPE: WorkerReport, WorkerReply.TYPE: WorkerReply,
                  WorkerIrqRequest.TYPE: WorkerIrqRequest}


def parse_worker_message(untrusted_raw: bytes) -> WorkerReport | WorkerReply | WorkerIrqRequest:
    """One frame from the worker socket, typed; BadMessage on anything else.
    (Authenticating the sender is the supervisor's part.)"""
    try:
        untrusted = json.loads(untrusted_raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise BadMessage(f"not JSON: {str(exc)[:60]}") from None
    untrusted_type = untrusted.get("type") if type(untrusted) is dict else None
    kind = _MESSAGE_TYPES.get(untrusted_type) if type(untrusted_type) is str else None
    if kind is None:
        raise BadMessage("not a worker message")
    return kind.from_dict(untrusted)


@dataclass(frozen=True)
class WorkerCommand:
    """The supervisor's request to a worker; ``id`` None asks for no reply."""

    cmd: str
    args: dict = field(default_factory=dict)
    id: str | None = None

    def to_json(self) -> bytes:
        return json.dumps({"cmd": self.cmd, "args": self.args, "id": self.id}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "WorkerCommand":
        msg = json.loads(raw)
        if type(msg) is not dict or type(msg.get("cmd")) is not str or type(msg.get("args", {})) is not dict:
            raise BadMessage("not a worker command")
        req_id = msg.get("id")
        return cls(msg["cmd"], msg.get("args") or {}, req_id if type(req_id) is str else None)


@dataclass(frozen=True)
class IrqReply:
    """The broker's answer to the :class:`WorkerIrqRequest` with the same ``id``."""

    id: str
    answer: Answer

    TYPE = "irq-answer"

    def to_json(self) -> bytes:
        return json.dumps({"type": self.TYPE, "id": self.id, "answer": answer_to_wire(self.answer)}).encode()


def parse_supervisor_message(raw: bytes) -> WorkerCommand | IrqReply:
    """One frame from the supervisor: a command or a broker answer (BadMessage otherwise)."""
    try:
        msg = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise BadMessage(f"not JSON: {str(exc)[:60]}") from None
    if type(msg) is dict and msg.get("type") == IrqReply.TYPE:
        if set(msg) != {"type", "id", "answer"}:
            raise BadMessage("not a broker answer")
        try:
            return IrqReply(_str(msg["id"], "id"), answer_from_wire(msg["answer"]))
        except ValueError as exc:
            raise BadMessage(f"broker answer: {exc}") from None
    return WorkerCommand.from_json(raw)
