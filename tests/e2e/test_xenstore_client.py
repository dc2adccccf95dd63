"""XenStore client against a real (hypervisor-less) oxenstored."""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import struct
import threading
import time

import pytest

from pcibackd.xenstore.client import Transaction, TransactionConflict, XenStore
from simdom0.xenstored import Xenstored, find_oxenstored
from waiting import wait_until

pytestmark = pytest.mark.skipif(find_oxenstored() is None, reason="oxenstored not installed")


@pytest.fixture
def xsd():
    with Xenstored.start() as daemon:
        yield daemon


@pytest.fixture
def xs(xsd):
    with XenStore(xsd.socket_path) as client:
        yield client


@pytest.fixture
def xs2(xsd):
    with XenStore(xsd.socket_path) as client:
        yield client


def wait_events(xs: XenStore, until, deadline_s: float = 5.0) -> list[tuple[str, str]]:
    """Collect events via fileno()/events() until ``until(events)`` holds."""
    got: list[tuple[str, str]] = []
    deadline = time.monotonic() + deadline_s
    while not until(got):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out waiting for events, got {got}"
        readable, _, _ = select.select([xs], [], [], remaining)
        if readable:
            got.extend(xs.events())
    return got


def barrier(xs: XenStore, name: str) -> list[tuple[str, str]]:
    """Events delivered before a fresh watch's initial event (xenstored keeps order)."""
    xs.watch(f"/barrier/{name}", f"barrier-{name}")
    got = wait_events(xs, lambda evs: (f"/barrier/{name}", f"barrier-{name}") in evs)
    xs.unwatch(f"/barrier/{name}", f"barrier-{name}")
    return got[: got.index((f"/barrier/{name}", f"barrier-{name}"))]


# -- CRUD ------------------------------------------------------------------------


def test_read_write_ls_exists_rm(xs):
    xs.write("/backend/pci/5/0/state", "1")
    assert xs.read("/backend/pci/5/0/state") == "1"
    assert xs.read("/backend/pci/5/0") == ""  # parents are created empty
    assert xs.ls("/backend/pci/5") == ["0"]
    assert xs.exists("/backend/pci/5/0/state")
    xs.write("/backend/pci/5/0/state", "4")
    assert xs.read("/backend/pci/5/0/state") == "4"
    xs.rm("/backend/pci/5")
    assert not xs.exists("/backend/pci/5/0/state")
    assert xs.ls("/backend/pci") == []


def test_missing_nodes(xs):
    assert xs.read("/nope") is None
    assert xs.ls("/nope") == []
    assert not xs.exists("/nope")
    xs.rm("/nope")  # ENOENT ignored
    xs.rm("/nope/deeper/still")


def test_mkdir_keeps_existing_value(xs):
    xs.write("/d", "keep")
    xs.mkdir("/d")
    xs.mkdir("/d/e/f")
    assert xs.read("/d") == "keep"
    assert xs.ls("/d/e") == ["f"]
    assert xs.read("/d/e/f") == ""


def test_values_roundtrip_including_empty_and_non_ascii(xs):
    for value in ("", "a b\tc", "0000:03:00.0", "ünïcode", "x" * 2000):
        xs.write("/v", value)
        assert xs.read("/v") == value


def test_non_utf8_guest_bytes_do_not_raise(xs, xsd):
    import pyxs

    with pyxs.Client(unix_socket_path=xsd.socket_path) as raw:
        raw.write(b"/guest", b"\x7f")  # pyxs allows 7-bit only; write a control byte
    assert xs.read("/guest") == "\x7f"


def test_invalid_paths_rejected_before_sending(xs):
    for bad in ("", "/a/", "/a//b", "/a b", "/a\0b", "/ü", "/" + "a" * 3100, "rel" * 700):
        with pytest.raises(ValueError):
            xs.read(bad)
    with pytest.raises(ValueError):
        xs.write("/v", "x" * 5000)  # over the 4096-byte payload limit
    assert xs.read("/") == ""  # connection still fine


def test_relative_paths_are_rooted_at_domain_home(xs):
    # dom0 socket clients' home is /local/domain/0
    xs.write("rel-node", "1")
    assert xs.read("/local/domain/0/rel-node") == "1"


def test_errors_map_to_oserror_with_errno(xs):
    with pytest.raises(FileNotFoundError) as info:
        xs.get_perms("/missing")
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == "/missing"
    with pytest.raises(OSError) as info:
        xs.write("/big", "x" * 3000)  # over oxenstored's quota-maxsize (2048)
    assert info.value.errno == errno.E2BIG
    assert xs.read("/big") is None


# -- permissions -----------------------------------------------------------------


def test_perms_roundtrip(xs):
    xs.write("/backend/pci/7", "")
    assert xs.get_perms("/backend/pci/7") == ["n0"]
    xs.set_perms("/backend/pci/7", ["n0", "r7"])
    assert xs.get_perms("/backend/pci/7") == ["n0", "r7"]
    xs.set_perms("/backend/pci/7", ["b7", "r0"])
    assert xs.get_perms("/backend/pci/7") == ["b7", "r0"]


@pytest.mark.parametrize("perms", [[], ["x0"], ["r"], ["r-1"], ["n0", "r 5"]])
def test_bad_perms_rejected(xs, perms):
    xs.write("/p", "")
    with pytest.raises(ValueError):
        xs.set_perms("/p", perms)
    assert xs.get_perms("/p") == ["n0"]


# -- transactions ----------------------------------------------------------------


def test_transaction_commit_is_atomic(xs, xs2):
    with xs.transaction() as tx:
        assert isinstance(tx, Transaction)
        tx.write("/t/a", "1")
        tx.write("/t/b", "2")
        assert tx.read("/t/a") == "1"
        assert xs2.read("/t/a") is None  # not visible outside before commit
    assert (xs2.read("/t/a"), xs2.read("/t/b")) == ("1", "2")


def test_transaction_aborts_on_exception(xs):
    with pytest.raises(KeyError):
        with xs.transaction() as tx:
            tx.write("/t/x", "1")
            raise KeyError("boom")
    assert xs.read("/t/x") is None


def test_transaction_handle_has_full_api(xs):
    xs.write("/t/old", "o")
    with xs.transaction() as tx:
        tx.mkdir("/t/dir")
        tx.set_perms("/t/dir", ["n0", "r3"])
        tx.rm("/t/old")
        tx.rm("/t/never-existed")
        assert sorted(tx.ls("/t")) == ["dir"]
        assert tx.exists("/t/dir") and not tx.exists("/t/old")
        assert tx.get_perms("/t/dir") == ["n0", "r3"]
    assert xs.ls("/t") == ["dir"]


def test_ended_transaction_refuses_use(xs):
    tx = xs.transaction()
    tx.write("/t/e", "1")
    assert tx.commit()
    with pytest.raises(RuntimeError):
        tx.read("/t/e")
    tx.abort()  # no-op once ended


def test_conflict_detected_on_commit(xs, xs2):
    xs.write("/c", "0")
    tx = xs.transaction()
    value = int(tx.read("/c"))
    xs2.write("/c", "5")  # the racing client wins
    tx.write("/c", str(value + 1))
    assert tx.commit() is False
    assert xs.read("/c") == "5"

    with pytest.raises(TransactionConflict) as info:
        with xs.transaction() as tx:
            tx.read("/c")
            xs2.write("/c", "6")
            tx.write("/c", "7")
    assert info.value.errno == errno.EAGAIN
    assert xs.read("/c") == "6"


def test_run_transaction_retries_after_conflict(xs, xs2):
    xs.write("/c", "10")
    attempts = []

    def increment(tx):
        value = int(tx.read("/c"))
        if not attempts:
            xs2.write("/c", "20")  # sabotage the first attempt only
        attempts.append(value)
        tx.write("/c", str(value + 1))
        return value + 1

    assert xs.run_transaction(increment) == 21
    assert attempts == [10, 20]
    assert xs.read("/c") == "21"


def test_run_transaction_gives_up_after_attempts(xs, xs2):
    xs.write("/c", "0")
    calls = []

    def always_loses(tx):
        calls.append(1)
        tx.read("/c")
        xs2.write("/c", str(len(calls)))
        tx.write("/c", "mine")

    with pytest.raises(TransactionConflict):
        xs.run_transaction(always_loses, attempts=3)
    assert len(calls) == 3
    assert xs.read("/c") == "3"


def test_run_transaction_aborts_and_propagates_other_errors(xs):
    def fails(tx):
        tx.write("/t/partial", "1")
        raise ValueError("nope")

    with pytest.raises(ValueError):
        xs.run_transaction(fails)
    assert xs.read("/t/partial") is None


def test_racing_clients_lose_no_increment(xsd):
    with XenStore(xsd.socket_path) as xs:
        xs.write("/counter", "0")
    n_threads, per_thread = 4, 25
    errors = []

    def worker():
        try:
            with XenStore(xsd.socket_path) as mine:
                for _ in range(per_thread):
                    mine.run_transaction(
                        lambda tx: tx.write("/counter", str(int(tx.read("/counter")) + 1)), attempts=100
                    )
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    with XenStore(xsd.socket_path) as xs:
        assert xs.read("/counter") == str(n_threads * per_thread)


# -- watches ---------------------------------------------------------------------


def test_no_events_means_not_readable(xs):
    assert select.select([xs], [], [], 0)[0] == []
    assert xs.events() == []


def test_watch_fires_initial_event_then_changes(xs, xs2):
    xs.watch("/backend/pci/3", "be-3")
    assert wait_events(xs, lambda e: e) == [("/backend/pci/3", "be-3")]
    assert select.select([xs], [], [], 0)[0] == []  # drained → not readable
    xs2.write("/backend/pci/3", "x")
    assert wait_events(xs, lambda e: e) == [("/backend/pci/3", "be-3")]


def test_subtree_events(xs, xs2):
    xs.watch("/backend/pci/3", "be")
    wait_events(xs, lambda e: e)
    xs2.write("/backend/pci/3/0/state", "3")
    xs2.set_perms("/backend/pci/3/0/state", ["n0", "r3"])
    xs2.rm("/backend/pci/3/0")
    xs2.write("/backend/pci/30", "sibling, not below")
    got = barrier(xs, "sub")
    assert got == [
        ("/backend/pci/3/0/state", "be"),
        ("/backend/pci/3/0/state", "be"),
        ("/backend/pci/3/0", "be"),
    ]


def test_events_from_transactions_arrive_on_commit(xs, xs2):
    xs.watch("/fe", "fe")
    wait_events(xs, lambda e: e)
    with xs2.transaction() as tx:
        tx.write("/fe/state", "1")
        assert barrier(xs, "pre-commit") == []
    assert wait_events(xs, lambda e: e) == [("/fe/state", "fe")]


def test_multiple_tokens_on_one_path(xs, xs2):
    xs.watch("/m", "a")
    xs.watch("/m", "b")
    wait_events(xs, lambda e: len(e) >= 2)
    xs2.write("/m", "1")
    got = wait_events(xs, lambda e: len(e) >= 2)
    assert sorted(got) == [("/m", "a"), ("/m", "b")]


def test_unwatch_stops_and_drops_queued_events(xs, xs2):
    xs.watch("/u", "u")
    wait_events(xs, lambda e: e)
    xs2.write("/u/1", "x")  # queued, but not yet drained
    assert wait_gate(xs)
    xs.unwatch("/u", "u")
    xs2.write("/u/2", "y")
    assert barrier(xs, "after-unwatch") == []


def wait_gate(xs: XenStore, deadline_s: float = 5.0) -> bool:
    """Wait until fileno() is readable without draining."""
    return bool(select.select([xs], [], [], deadline_s)[0])


def test_special_watch_paths(xs):
    xs.watch("@introduceDomain", "intro")
    xs.watch("@releaseDomain", "rel")
    got = wait_events(xs, lambda e: len(e) >= 2)
    assert sorted(got) == [("@introduceDomain", "intro"), ("@releaseDomain", "rel")]
    with pytest.raises(ValueError):
        xs.watch("@bogus", "x")
    for token in ("", "a\0b", "tök"):
        with pytest.raises(ValueError):
            xs.watch("/w", token)
    assert xs.events() == []  # failed watches left nothing registered


def test_watch_many_events_in_a_burst(xs, xs2):
    xs.watch("/burst", "b")
    wait_events(xs, lambda e: e)
    with xs2.transaction() as tx:
        for i in range(200):
            tx.write(f"/burst/{i}", "v")
    got = wait_events(xs, lambda e: len(e) >= 200)
    assert {p for p, _ in got} == {f"/burst/{i}" for i in range(200)}


# -- connection handling ---------------------------------------------------------


def test_default_path_from_environment(xsd, monkeypatch):
    monkeypatch.setenv("XENSTORED_PATH", xsd.socket_path)
    with XenStore() as xs:
        assert xs.path == xsd.socket_path
        xs.write("/env", "1")
        assert xs.read("/env") == "1"


def test_connect_failure_is_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        XenStore(str(tmp_path / "no-such-socket"))


def test_daemon_death_raises_instead_of_hanging(xsd):
    xs = XenStore(xsd.socket_path, timeout=30)
    try:
        xs.write("/a", "1")
        os.kill(xsd.pid, signal.SIGKILL)
        # ConnectionError (EOF seen), not the TimeoutError of the 30 s timeout
        with pytest.raises(ConnectionError):
            for _ in range(1000):  # the first calls may race the router noticing EOF
                xs.read("/a")
        assert not xs.connected
    finally:
        xs.close()


def test_unresponsive_daemon_times_out_then_recovers(xsd):
    with XenStore(xsd.socket_path, timeout=0.3) as xs:
        xs.write("/a", "1")
        os.kill(xsd.pid, signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError):
                xs.read("/a")
        finally:
            os.kill(xsd.pid, signal.SIGCONT)
        # The late reply to the abandoned request must not kill the router (that
        # would raise ConnectionError); a resumed daemon on a loaded machine may
        # still miss this client's 0.3 s, so poll until it answers.
        wait_until(lambda: _read_unless_timeout(xs, "/a") == "1", what="the resumed daemon's answer")
        assert xs.connected


def _read_unless_timeout(xs, path):
    try:
        return xs.read(path)
    except TimeoutError:
        return None


def test_reply_to_unknown_request_fails_calls_instead_of_hanging(tmp_path):
    """pyxs issue #11: a reply with a foreign rq_id killed its router and hung callers."""
    path = str(tmp_path / "fake.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    done = threading.Event()

    def serve():
        conn, _ = server.accept()
        with conn:
            op, rq_id, tx_id, size = struct.unpack("=IIII", conn.recv(16, socket.MSG_WAITALL))
            conn.recv(size, socket.MSG_WAITALL)
            conn.sendall(struct.pack("=IIII", op, rq_id + 1000, tx_id, 1) + b"x")
            done.wait(10)  # keep the connection open: only the bad reply may end the call

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with XenStore(path, timeout=30) as xs:
            # ConnectionError for the bad reply, not the TimeoutError of the 30 s timeout
            with pytest.raises(ConnectionError, match="unknown request"):
                xs.read("/a")
            assert not xs.connected
    finally:
        done.set()
        thread.join(5)
        server.close()


def test_close_is_idempotent_and_final(xsd):
    xs = XenStore(xsd.socket_path)
    before = {t.ident for t in threading.enumerate() if t.name == "xenstore-router"}
    assert before
    xs.close()
    xs.close()
    assert not xs.connected
    with pytest.raises(ConnectionError):
        xs.read("/")
    after = {t.ident for t in threading.enumerate() if t.name == "xenstore-router"}
    assert len(after) == len(before) - 1


def test_use_after_fork_is_refused(xs):
    pid = os.fork()
    if pid == 0:  # child: must refuse instead of sharing the parent's connection
        try:
            xs.read("/")
        except RuntimeError:
            os._exit(0)
        except BaseException:
            os._exit(2)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert xs.read("/") == ""  # the parent's connection is untouched


def test_concurrent_callers_share_one_connection(xs):
    errors = []

    def worker(n):
        try:
            for i in range(50):
                xs.write(f"/cc/{n}", str(i))
                assert xs.read(f"/cc/{n}") == str(i)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert sorted(xs.ls("/cc"), key=int) == [str(n) for n in range(8)]
