"""The xenstore gate's policy: what one guest's worker may ask of xenstored (pure)."""

from __future__ import annotations

import pytest

from pcibackd.xenstore.codec import Op
from pcibackd.xenstore.policy import MAX_TRANSACTIONS, RULES, Scope, Session, decide

ME = Scope.of(5)
BE = "/local/domain/0/backend/pci/5/0"
FE = "/local/domain/5/device/pci/0"
OTHER_BE = "/local/domain/0/backend/pci/6/0"
OTHER_FE = "/local/domain/6/device/pci/0"


def ok(op, payload, tx=0, txs=()):
    return decide(ME, op, tx, payload, set(txs)).allowed


def p(*fields: str) -> bytes:
    return b"".join(f.encode() + b"\0" for f in fields)


# everything a worker does today (worker/driver.py, worker/main.py)
ALLOWED = [
    (Op.READ, p(f"{BE}/frontend")), (Op.READ, p(f"{BE}/dev-0")), (Op.READ, p(f"{FE}/state")),
    (Op.READ, p("/local/domain/5/name")), (Op.DIRECTORY, p(BE)), (Op.DIRECTORY, p(FE)),
    (Op.GET_PERMS, p(BE)), (Op.WATCH, p(BE, "be-5")), (Op.WATCH, p(FE, "be-5")), (Op.UNWATCH, p(BE, "be-5")),
    (Op.WRITE, f"{BE}/state\0" "4".encode()), (Op.WRITE, f"{BE}/vdev-3\0" "0000:00:03.00".encode()),
    (Op.WRITE, f"{BE}/state-12\0" "3".encode()), (Op.WRITE, f"{BE}/root-0\0" "0000:00".encode()),
    (Op.WRITE, f"{BE}/root_num\0" "1".encode()), (Op.RM, p(f"{BE}/root-1")),
    (Op.WRITE, b"/local/domain/0/error/backend/pci/5/0/error\0" b"19 no such device"),
    (Op.TRANSACTION_START, b"\0"), (Op.GET_DOMAIN_PATH, p("5")),
]

REFUSED = [
    # another guest's directories, any way
    (Op.READ, p(f"{OTHER_BE}/dev-0")), (Op.READ, p(f"{OTHER_FE}/state")), (Op.DIRECTORY, p(OTHER_BE)),
    (Op.WATCH, p(OTHER_BE, "t")), (Op.WATCH, p(OTHER_FE, "t")), (Op.GET_PERMS, p(OTHER_FE)),
    (Op.WRITE, f"{OTHER_BE}/state\0" "6".encode()), (Op.RM, p(f"{OTHER_BE}/root-0")),
    (Op.READ, p("/local/domain/0/backend/pci/55/0/dev-0")),       # a prefix is not a parent
    (Op.READ, p("/local/domain/0/backend/pci/5/00/dev-0")),
    # its own toolstack-written nodes
    (Op.WRITE, f"{BE}/dev-1\0" "0000:00:06.0".encode()), (Op.WRITE, f"{BE}/opts-0\0" "permissive=1".encode()),
    (Op.WRITE, f"{BE}/key-0\0" "x".encode()), (Op.WRITE, f"{BE}/num_devs\0" "2".encode()),
    (Op.WRITE, f"{BE}/frontend\0{OTHER_FE}".encode()), (Op.WRITE, f"{BE}/vdevfn-0\0" "8".encode()),
    (Op.WRITE, f"{BE}/online\0" "1".encode()), (Op.WRITE, f"{BE}\0" "x".encode()),
    (Op.WRITE, f"{BE}/state/deeper\0" "x".encode()), (Op.RM, p(f"{BE}/dev-0")), (Op.RM, p(BE)),
    (Op.RM, p(f"{BE}/state")), (Op.WRITE, f"{FE}/state\0" "4".encode()),
    (Op.SET_PERMS, p(BE, "n0", "b5")), (Op.MKDIR, p(f"{BE}/x")),
    # other domains, the store itself
    (Op.GET_DOMAIN_PATH, p("6")), (Op.INTRODUCE, p("7", "123", "4")), (Op.RELEASE, p("6")),
    (Op.IS_DOMAIN_INTRODUCED, p("6")), (Op.SET_TARGET, p("6", "5")), (Op.RESUME, p("6")),
    (Op.DEBUG, p("print", "x")), (Op.RESTRICT, p("5")), (21, b""), (20, p(BE, "0")), (999, b""),
    (Op.WATCH, p("@introduceDomain", "t")), (Op.WATCH, p("@releaseDomain", "t")), (Op.WATCH, p("/", "t")),
    # paths that are not absolute or not well formed; watches without a token
    (Op.READ, p("backend/pci/5/0/state")), (Op.READ, p(f"{BE}//state")), (Op.READ, p(f"{BE}/")),
    (Op.READ, f"{BE}/st\u00e4te\0".encode()), (Op.READ, BE.encode()), (Op.WATCH, p(BE)),
    (Op.WATCH, p(BE, "")), (Op.READ, b"\xff\0"),
    # transactions: end outside one
    (Op.TRANSACTION_END, b"T\0"),
]


@pytest.mark.parametrize("op,payload", ALLOWED)
def test_what_a_worker_does_is_allowed(op, payload):
    assert ok(op, payload)


@pytest.mark.parametrize("op,payload", REFUSED)
def test_everything_else_is_refused(op, payload):
    assert not ok(op, payload)


def test_only_ops_in_the_table_pass():
    assert set(RULES) == {Op.READ, Op.DIRECTORY, Op.GET_PERMS, Op.WATCH, Op.UNWATCH, Op.WRITE, Op.RM,
                          Op.TRANSACTION_START, Op.TRANSACTION_END, Op.GET_DOMAIN_PATH}


def test_a_transaction_id_counts_only_once_xenstored_gave_it_to_this_session():
    s = Session(ME)
    read = p(f"{BE}/state")
    assert not s.request(Op.READ, 7, read).allowed            # guessed, or another connection's
    assert s.request(Op.TRANSACTION_START, 0, b"\0").allowed
    assert not s.request(Op.READ, 7, read).allowed            # not answered yet
    s.reply(Op.TRANSACTION_START, b"7\0")
    assert s.request(Op.READ, 7, read).allowed
    assert s.request(Op.WRITE, 7, f"{BE}/state\0" "4".encode()).allowed
    assert not s.request(Op.WRITE, 7, f"{BE}/dev-0\0" "0000:00:06.0".encode()).allowed   # same rules inside
    assert not s.request(Op.TRANSACTION_START, 7, b"\0").allowed                         # no nesting
    assert not s.request(Op.WATCH, 7, p(BE, "t")).allowed
    assert s.request(Op.TRANSACTION_END, 7, b"T\0").allowed
    assert not s.request(Op.READ, 7, read).allowed            # ended: never again
    assert not s.request(Op.TRANSACTION_END, 7, b"T\0").allowed
    assert Session(Scope.of(6)).request(Op.READ, 7, p(f"{OTHER_BE}/state")).allowed is False


def test_replies_are_matched_in_order_so_an_error_does_not_open_a_transaction():
    s = Session(ME)
    assert s.request(Op.READ, 0, p(f"{BE}/state")).allowed
    assert s.request(Op.TRANSACTION_START, 0, b"\0").allowed
    s.reply(Op.ERROR, b"ENOENT\0")          # the read's answer
    s.reply(Op.ERROR, b"EQUOTA\0")          # the start's: no transaction
    assert not s.forwarded and not s.open_txs
    assert s.request(Op.TRANSACTION_START, 0, b"\0").allowed
    s.reply(Op.TRANSACTION_START, b"notanumber\0")
    assert not s.open_txs


def test_open_transactions_are_bounded():
    s = Session(ME)
    for i in range(MAX_TRANSACTIONS):
        assert s.request(Op.TRANSACTION_START, 0, b"\0").allowed
        s.reply(Op.TRANSACTION_START, f"{i + 1}\0".encode())
    assert not s.request(Op.TRANSACTION_START, 0, b"\0").allowed
    assert s.request(Op.TRANSACTION_END, 1, b"F\0").allowed
    s.reply(Op.TRANSACTION_END, b"OK\0")
    assert s.request(Op.TRANSACTION_START, 0, b"\0").allowed
    assert s.refused == 1
