"""The broker's vocabulary: what crosses the worker -> supervisor boundary, and the worker's client.

A worker is confined, not trusted: :func:`request_from_wire` accepts only the
request shapes below, with every value in range, and the broker then checks
each request against what the supervisor told it.  Requests a worker may send
name the worker's own guest (``domid``); the supervisor-only ones
(:class:`Prepare`, :class:`Release`) are never decoded from a worker.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass, field
from typing import Callable, Union

from pcibackd.irq.function import Kind
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import SH_INFO_MAX_VEC, Err, Op

MAX_TABLE = 2048                 # an MSI-X table has at most 2048 entries (11-bit size field)
MAX_MSI_VECTORS = 32             # MSI Multiple Message Capable: at most 32
DOMID_MAX = 0x7FEF               # below DOMID_FIRST_RESERVED
PIRQ_MAX = 0x7FFFFFFF
VECTOR_MAX = 0xFFFF              # msix_entries[i].vector is a u16 on the wire


@dataclass(frozen=True)
class Mapping:
    """PIRQs mapped for one function of one guest.

    ``pirqs[i]`` belongs to ``entries[i]`` (MSI: entry 0).  Fewer PIRQs than
    entries means mapping was interrupted: the missing ones may exist in Xen
    unknown to us.  ``orphan`` marks PIRQs the guest does not hold (a failed
    unmap or an interrupted map): they are never handed out, only unmapped.
    """

    domid: int
    bdf: BDF
    kind: Kind
    entries: tuple[int, ...]
    pirqs: tuple[int, ...] = ()
    orphan: bool = False

    @property
    def complete(self) -> bool:
        return len(self.pirqs) == len(self.entries)

    @property
    def held(self) -> bool:
        """The guest holds these PIRQs (it was answered with them)."""
        return self.complete and not self.orphan


# -- requests -----------------------------------------------------------------

@dataclass(frozen=True)
class MapMsi:
    domid: int
    bdf: BDF
    nvec: int = 1


@dataclass(frozen=True)
class MapMsix:
    domid: int
    bdf: BDF
    entries: tuple[int, ...]


@dataclass(frozen=True)
class Unmap:
    domid: int
    bdf: BDF
    kind: Kind


@dataclass(frozen=True)
class Query:
    """What the broker holds for this function (a restarted worker's question)."""

    domid: int
    bdf: BDF


@dataclass(frozen=True)
class Leave:
    """The function leaves the worker's guest (hot-unplug, guest gone), to be reset next.

    The broker turns its MSI/MSI-X off, unmaps its PIRQs and stops serving it
    for the guest, and only then answers: the worker resets after the answer.
    """

    domid: int
    bdf: BDF


@dataclass(frozen=True)
class Failed:
    """A worker's note, for status: it answered the guest's ``op`` with ``err``.

    ``cause`` is the broker's refusal behind it (``error/ERRNO``), "" when the
    worker refused on its own (the function's state, the guest's input).
    Nothing is done with it but keep it as the function's last interrupt error.
    """

    domid: int
    bdf: BDF
    op: int
    err: int
    cause: str = ""


@dataclass(frozen=True)
class IrqError:
    """A function's last interrupt error, by symbolic names (``pcibackctl status``)."""

    op: str                          # enable_msix, ... or "broker" for a refusal the worker did not note
    error: str                       # what the guest got: XEN_PCI_ERR_op_failed, -EALREADY, ...
    cause: str = ""                  # the broker's refusal behind it: hypervisor/ENOSPC, ...

    def __str__(self) -> str:
        return f"{self.op} {self.error}" + (f" ({self.cause})" if self.cause else "")

    def to_dict(self) -> dict:
        return {"op": self.op, "error": self.error, "cause": self.cause}


@dataclass(frozen=True)
class IrqStatus:
    """What the supervisor's broker knows of one function (``pcibackctl status``)."""

    mapping: "Mapping | None" = None             # None: nothing mapped
    msix_prepared: bool = False                  # PHYSDEVOP_prepare_msix done
    last_error: IrqError | None = None


def errno_name(err: int) -> str:
    """``ENOSPC`` for 28 (the number itself when it has no name)."""
    return errno.errorcode.get(err, str(err))


def cause_of(exc: "IrqRefused") -> str:
    """A broker refusal as :attr:`Failed.cause`: ``error/ERRNO``."""
    error = exc.error if re.match(r"^[A-Za-z0-9_]{1,24}$", exc.error or "") else "refused"
    name = errno_name(exc.errno or errno.EIO)
    return f"{error}/{name}" if _CAUSE_RE.match(f"{error}/{name}") else f"{error}/EIO"


def op_error_name(op: int, err: int) -> str:
    """The symbolic name of an op's ``err``: enable_msix answers -errno (Linux), the others XEN_PCI_ERR_*."""
    if op == Op.enable_msix and err < 0:
        return f"-{errno_name(-err)}"
    try:
        return f"XEN_PCI_ERR_{Err(err).name}"
    except ValueError:
        return str(err)


@dataclass(frozen=True)
class Prepare:
    """Supervisor only, at seize: PHYSDEVOP_prepare_msix."""

    bdf: BDF


@dataclass(frozen=True)
class Release:
    """Supervisor only, before the function returns to dom0: PHYSDEVOP_release_msix."""

    bdf: BDF


WorkerRequest = Union[MapMsi, MapMsix, Unmap, Query, Leave, Failed]
WORKER_REQUESTS: dict[str, type] = {
    "map_msi": MapMsi, "map_msix": MapMsix, "unmap": Unmap, "query": Query, "leave": Leave, "failed": Failed,
}
MSI_OP_NUMBERS = (Op.enable_msi, Op.disable_msi, Op.enable_msix, Op.disable_msix, Op.enable_multi_msi)
_CAUSE_RE = re.compile(r"^[A-Za-z0-9_]{1,24}/[A-Z0-9]{1,16}$")
_NAMES = {cls: name for name, cls in WORKER_REQUESTS.items()}


@dataclass(frozen=True)
class Answer:
    """The broker's answer: ``errno`` 0 and the PIRQs, or an errno and a symbolic reason."""

    errno: int = 0
    error: str = ""                  # symbolic: not_assigned, already_mapped, hypervisor, ...
    detail: str = ""
    pirqs: tuple[int, ...] = ()
    kind: Kind | None = None         # Query: what is mapped
    entries: tuple[int, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.errno == 0


def refused(err: int, error: str, detail: str = "") -> Answer:
    return Answer(errno=err, error=error, detail=detail)


class IrqRefused(OSError):
    """The broker said no (``errno``, symbolic ``error``)."""

    def __init__(self, err: int, error: str, detail: str = "") -> None:
        super().__init__(err, f"{error}: {detail}" if detail else error)
        self.error = error


# -- wire form ------------------------------------------------------------------

def _int(v: object, lo: int, hi: int, what: str) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise ValueError(f"{what} out of range")
    return v


def _bdf(v: object) -> BDF:
    if not isinstance(v, str) or len(v) > 16:
        raise ValueError("bdf")
    return BDF.parse(v)


def _entries(v: object, limit: int) -> tuple[int, ...]:
    if not isinstance(v, list) or not 1 <= len(v) <= limit:
        raise ValueError("entries count")
    return tuple(_int(e, 0, MAX_TABLE - 1, "entry") for e in v)


def request_to_wire(req: WorkerRequest) -> dict:
    doc: dict = {"irq": _NAMES[type(req)], "domid": req.domid, "bdf": str(req.bdf)}
    if isinstance(req, MapMsi):
        doc["nvec"] = req.nvec
    elif isinstance(req, MapMsix):
        doc["entries"] = list(req.entries)
    elif isinstance(req, Unmap):
        doc["kind"] = req.kind.value
    elif isinstance(req, Failed):
        doc.update(op=req.op, err=req.err, cause=req.cause)
    return doc


_EXTRA = {MapMsi: {"nvec"}, MapMsix: {"entries"}, Unmap: {"kind"}, Query: set(), Leave: set(),
          Failed: {"op", "err", "cause"}}


def request_from_wire(untrusted: object) -> WorkerRequest:
    """Decode a worker's request; ValueError on any other shape or value."""
    if not isinstance(untrusted, dict):
        raise ValueError("not an object")
    cls = WORKER_REQUESTS.get(untrusted.get("irq"))     # type: ignore[arg-type]
    if cls is None:
        raise ValueError("unknown request")
    if set(untrusted) != {"irq", "domid", "bdf"} | _EXTRA[cls]:
        raise ValueError("unexpected keys")
    domid = _int(untrusted["domid"], 1, DOMID_MAX, "domid")
    bdf = _bdf(untrusted["bdf"])
    if cls is MapMsi:
        return MapMsi(domid, bdf, _int(untrusted["nvec"], 1, MAX_MSI_VECTORS, "nvec"))
    if cls is MapMsix:
        return MapMsix(domid, bdf, _entries(untrusted["entries"], SH_INFO_MAX_VEC))
    if cls is Unmap:
        kind = untrusted["kind"]
        if kind not in (Kind.msi.value, Kind.msix.value):
            raise ValueError("kind")
        return Unmap(domid, bdf, Kind(kind))
    if cls is Failed:
        op = _int(untrusted["op"], 0, 255, "op")
        if op not in MSI_OP_NUMBERS:
            raise ValueError("op")
        cause = untrusted["cause"]
        if not isinstance(cause, str) or not (cause == "" or _CAUSE_RE.match(cause)):
            raise ValueError("cause")
        return Failed(domid, bdf, op, _int(untrusted["err"], -4095, -1, "err"), cause)
    return cls(domid, bdf)


def answer_to_wire(a: Answer) -> dict:
    return {"errno": a.errno, "error": a.error, "detail": a.detail, "pirqs": list(a.pirqs),
            "kind": a.kind.value if a.kind else None, "entries": list(a.entries)}


def answer_from_wire(doc: object) -> Answer:
    """Decode the supervisor's answer (ValueError on a malformed one)."""
    if not isinstance(doc, dict) or set(doc) != {"errno", "error", "detail", "pirqs", "kind", "entries"}:
        raise ValueError("not an answer")
    kind = doc["kind"]
    if kind is not None and kind not in (Kind.msi.value, Kind.msix.value):
        raise ValueError("kind")
    if not isinstance(doc["pirqs"], list) or not isinstance(doc["entries"], list):
        raise ValueError("lists")
    if not isinstance(doc["error"], str) or not isinstance(doc["detail"], str):
        raise ValueError("strings")
    return Answer(_int(doc["errno"], 0, 4095, "errno"), doc["error"], doc["detail"][:400],
                  tuple(_int(p, 1, PIRQ_MAX, "pirq") for p in doc["pirqs"]),
                  Kind(kind) if kind else None,
                  tuple(_int(e, 0, MAX_TABLE - 1, "entry") for e in doc["entries"]))


# -- the worker's side ------------------------------------------------------------

class Client:
    """The worker's broker: typed requests through ``send`` (its supervisor link).

    Methods return PIRQs or raise :class:`IrqRefused`; an answer that does not
    fit the question is refused too (EIO), never passed on to the guest.
    """

    def __init__(self, domid: int, send: Callable[[WorkerRequest], Answer]) -> None:
        self.domid = domid
        self._send = send

    def _ask(self, req: WorkerRequest) -> Answer:
        answer = self._send(req)
        if not answer.ok:
            raise IrqRefused(answer.errno, answer.error, answer.detail)
        return answer

    def _pirqs(self, answer: Answer, n: int, top: int) -> tuple[int, ...]:
        if len(answer.pirqs) != n or not all(0 < p <= top for p in answer.pirqs):
            raise IrqRefused(errno.EIO, "bad_answer", f"{len(answer.pirqs)} PIRQs for {n} vectors")
        return answer.pirqs

    def map_msi(self, bdf: BDF, nvec: int = 1) -> int:
        return self._pirqs(self._ask(MapMsi(self.domid, bdf, nvec)), nvec, PIRQ_MAX)[0]

    def map_msix(self, bdf: BDF, entries: tuple[int, ...]) -> tuple[int, ...]:
        return self._pirqs(self._ask(MapMsix(self.domid, bdf, tuple(entries))), len(entries), VECTOR_MAX)

    def unmap_msi(self, bdf: BDF) -> None:
        self._ask(Unmap(self.domid, bdf, Kind.msi))

    def unmap_msix(self, bdf: BDF) -> None:
        self._ask(Unmap(self.domid, bdf, Kind.msix))

    def query(self, bdf: BDF) -> Answer:
        return self._ask(Query(self.domid, bdf))

    def leave(self, bdf: BDF) -> None:
        self._ask(Leave(self.domid, bdf))
