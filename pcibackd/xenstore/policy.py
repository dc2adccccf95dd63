"""What one guest's worker may ask of xenstored: a table of op -> rule.

Pure: a request's header and payload in (untrusted: the worker may be
compromised by its guest), a :class:`Verdict` out.  The xenstore gate
(:mod:`.gate`) forwards what this allows and answers the rest with EACCES.

A worker's whole business in xenstore (worker/driver.py, worker/main.py):

* read, list, watch and test for its backend directory
  ``/local/domain/0/backend/pci/<domid>/0`` and its frontend directory
  ``/local/domain/<domid>/device/pci/0`` (the only frontend path the worker
  accepts in ``<backend>/frontend``), read ``/local/domain/<domid>/name``;
* write the backend nodes it owns: ``state``, ``root_num`` and the numbered
  ``vdev-N``, ``state-N``, ``root-N`` (removing only numbered ones), and its
  error node ``/local/domain/0/error/backend/pci/<domid>/0/error``;
* its own transactions around those.

Nothing the toolstack writes (``dev-N``, ``key-N``, ``opts-N``, ``vdevfn-N``,
``num_devs``, ``frontend``, ``online``) and no permission change: a worker
cannot list a function in its backend, so the device gate never lends it
one that is not assigned.  Every other op (introduce, release, set_perms,
mkdir, get_domain_path of another domain, reset_watches, debug/control,
special ``@`` watches, ops xenstored adds later) is refused.  Paths must be
absolute and well formed; a relative path is refused rather than resolved.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pcibackd.wire.paths import backend_path, error_path, frontend_path
from pcibackd.xenstore.codec import Op, check_path

__all__ = ["Scope", "Verdict", "Session", "decide", "RULES", "REFUSAL", "MAX_TRANSACTIONS"]

MAX_TRANSACTIONS = 16     # open at once per worker (the worker uses one at a time)
MAX_IN_FLIGHT = 1024      # forwarded requests not answered yet, per worker

# Backend nodes the worker writes; only the numbered ones may be removed (stale root-N).
_WRITABLE = re.compile(r"(state|root_num|(vdev|state|root)-[0-9]{1,3})")
_REMOVABLE = re.compile(r"(vdev|state|root)-[0-9]{1,3}")


@dataclass(frozen=True)
class Scope:
    """The nodes of one guest's worker (from its domid, never from xenstore)."""

    domid: int
    backend: str
    frontend: str
    error: str
    name: str

    @classmethod
    def of(cls, domid: int) -> Scope:
        return cls(domid, backend_path(domid), frontend_path(domid), error_path(domid),
                   f"/local/domain/{domid}/name")


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str = ""


ALLOW = Verdict(True)


def _refuse(reason: str) -> Verdict:
    return Verdict(False, reason)


def _under(path: str, base: str) -> bool:
    return path == base or path.startswith(base + "/")


def _path(untrusted_payload: bytes) -> str | None:
    """The path a request names (its first field), if absolute and well formed."""
    head = untrusted_payload.split(b"\0", 1)
    if len(head) < 2:
        return None
    try:
        untrusted_path = head[0].decode("ascii")
        check_path(untrusted_path)
    except (UnicodeDecodeError, ValueError):
        return None
    return untrusted_path if untrusted_path.startswith("/") else None


def _own_dirs(scope: Scope, path: str) -> bool:
    return _under(path, scope.backend) or _under(path, scope.frontend)


def _on_path(rule: Callable[[Scope, str, bytes], Verdict],
             refusal: str = "not an absolute path") -> Callable[[Scope, bytes], Verdict]:
    """A rule on the request's path: refused unless the path is absolute and well formed."""
    def check(scope: Scope, payload: bytes) -> Verdict:
        path = _path(payload)
        return _refuse(refusal) if path is None else rule(scope, path, payload)
    return check


def _read(scope: Scope, path: str, payload: bytes) -> Verdict:
    if _own_dirs(scope, path) or path == scope.name:
        return ALLOW
    return _refuse(f"read of {path[:120]}")


def _list(scope: Scope, path: str, payload: bytes) -> Verdict:
    return ALLOW if _own_dirs(scope, path) else _refuse(f"listing of {path[:120]}")


def _watch(scope: Scope, path: str, payload: bytes) -> Verdict:
    if payload.count(b"\0") < 2 or payload.split(b"\0")[1] == b"":
        return _refuse("no watch token")
    return ALLOW if _own_dirs(scope, path) else _refuse(f"watch of {path[:120]}")


def _leaf(scope: Scope, path: str) -> str | None:
    """The key of a direct child of the backend directory, else None."""
    prefix = scope.backend + "/"
    if not path.startswith(prefix):
        return None
    key = path[len(prefix):]
    return None if "/" in key else key


def _write(scope: Scope, path: str, payload: bytes) -> Verdict:
    key = _leaf(scope, path)
    if path == scope.error or (key is not None and _WRITABLE.fullmatch(key)):
        return ALLOW
    return _refuse(f"write of {path[:120]}")


def _rm(scope: Scope, path: str, payload: bytes) -> Verdict:
    key = _leaf(scope, path)
    return ALLOW if key is not None and _REMOVABLE.fullmatch(key) else _refuse(f"removal of {path[:120]}")


def _domain_path(scope: Scope, payload: bytes) -> Verdict:
    untrusted = payload.rstrip(b"\0")
    return ALLOW if untrusted == str(scope.domid).encode() else _refuse("domain path of another domain")


def _any(scope: Scope, payload: bytes) -> Verdict:
    return ALLOW


# op -> rule on the payload; an op not here is refused.  Transaction ids are checked
# by Session before the rule (START only outside one, END only of an open one).
RULES: dict[int, Callable[[Scope, bytes], Verdict]] = {
    Op.READ: _on_path(_read),
    Op.DIRECTORY: _on_path(_list),
    Op.GET_PERMS: _on_path(_list),
    Op.WATCH: _on_path(_watch, "not an absolute path (or a special watch)"),
    Op.UNWATCH: _on_path(_watch, "not an absolute path (or a special watch)"),
    Op.WRITE: _on_path(_write),
    Op.RM: _on_path(_rm),
    Op.TRANSACTION_START: _any,
    Op.TRANSACTION_END: _any,
    Op.GET_DOMAIN_PATH: _domain_path,
}
_NO_TRANSACTION = frozenset({Op.WATCH, Op.UNWATCH, Op.TRANSACTION_START, Op.GET_DOMAIN_PATH})


def decide(scope: Scope, op: int, tx_id: int, untrusted_payload: bytes, open_txs: frozenset[int] | set[int]) -> Verdict:
    """May the worker of ``scope`` send this request (its header's op and tx_id, its payload)?"""
    rule = RULES.get(op)
    if rule is None:
        return _refuse(f"op {op} is not a worker's")
    if tx_id != 0:
        if op in _NO_TRANSACTION:
            return _refuse(f"op {op} inside a transaction")
        if tx_id not in open_txs:
            return _refuse(f"transaction {tx_id} is not this connection's")
    elif op == Op.TRANSACTION_END:
        return _refuse("transaction end outside a transaction")
    return rule(scope, untrusted_payload)


@dataclass
class Session:
    """One worker connection: its scope and the transactions xenstored opened for it.

    :meth:`request` judges what the worker sends; :meth:`reply` follows what
    xenstored answers, in the order the forwarded requests went (xenstored
    answers one connection's requests in order), to learn a started
    transaction's id."""

    scope: Scope
    open_txs: set[int] = field(default_factory=set)
    forwarded: deque = field(default_factory=deque)     # ops sent on, not answered yet
    refused: int = 0

    def request(self, op: int, tx_id: int, untrusted_payload: bytes) -> Verdict:
        verdict = decide(self.scope, op, tx_id, untrusted_payload, self.open_txs)
        if verdict.allowed and len(self.forwarded) >= MAX_IN_FLIGHT:
            verdict = _refuse(f"more than {MAX_IN_FLIGHT} requests in flight")
        if verdict.allowed and op == Op.TRANSACTION_START:
            if len(self.open_txs) + self.forwarded.count(Op.TRANSACTION_START) >= MAX_TRANSACTIONS:
                verdict = _refuse(f"more than {MAX_TRANSACTIONS} open transactions")
        if not verdict.allowed:
            self.refused += 1
            return verdict
        if op == Op.TRANSACTION_END:
            self.open_txs.discard(tx_id)       # ended whatever xenstored answers: never usable again
        self.forwarded.append(op)
        return verdict

    def reply(self, op: int, untrusted_payload: bytes) -> None:
        """A reply from xenstored (not a watch event) to the oldest forwarded request."""
        asked = self.forwarded.popleft() if self.forwarded else None
        if asked == Op.TRANSACTION_START and op == Op.TRANSACTION_START:
            text = untrusted_payload.rstrip(b"\0")
            if text.isdigit() and len(text) <= 10:
                self.open_txs.add(int(text))


REFUSAL = b"EACCES\0"      # the ERROR payload xenstored itself sends for a denied access
