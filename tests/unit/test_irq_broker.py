"""The interrupt broker: validation, the control-register sequence, the journal and replay after a crash.

Runs the broker's core against simdom0's model of Xen (``SimPhysdev``) and
simulated functions built from real dumps: e1000e (MSI at 0xd0, MSI-X at 0xa0
with 5 entries in BAR3), nvme (MSI-X, 65 entries), rtl8139 (INTx only).
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from pcibackd.hostpci.port import find_capability
from pcibackd.irq.broker import Broker, Limits
from pcibackd.irq.function import Kind, record_for
from pcibackd.wire.pciregs import CAP_MSIX, COMMAND, COMMAND_INTX_DISABLE, COMMAND_MEM, MSIX_ENABLE, MSIX_MASKALL, MSI_ENABLE
from pcibackd.irq.journal import Journal
from pcibackd.irq.messages import (Answer, Client, Failed, IrqRefused, Leave, MapMsi, MapMsix, Prepare, Query, Unmap,
                                   answer_from_wire, answer_to_wire, cause_of, op_error_name, request_from_wire,
                                   request_to_wire)
from pcibackd.wire.bdf import BDF
from simdom0.hostpci import SimHost
from simdom0.physdev import SimPhysdev, SimXenCrash

NIC, DISK, OLD = BDF(0, 3, 0, 0), BDF(0, 4, 0, 0), BDF(0, 5, 0, 0)
DOM, OTHER = 5, 6
MSI_CTRL, MSIX_CTRL = 0xD2, 0xA2          # e1000e: Message Control of MSI / MSI-X


class Env:
    """A simulated host, Xen, journal and broker; ``restart()`` is a supervisor crash."""

    def __init__(self, tmp: Path, **xen_kw) -> None:
        self.host = SimHost(tmp / "sim")
        self.devs = {NIC: self.host.add("e1000e", NIC), DISK: self.host.add("nvme", DISK),
                     OLD: self.host.add("rtl8139", OLD)}
        self.xen = SimPhysdev(lambda bdf: self.devs[bdf], **xen_kw)
        self.jdir = tmp / "irq"
        self.broker = Broker(self.xen, Journal(self.jdir))

    def attach(self, bdf: BDF, domid: int = DOM) -> Answer:
        """Seize (prepare), assign in Xen, tell the broker: the supervisor's order."""
        dev = self.devs[bdf]
        record = record_for(dev.read, dev.info)
        answer = self.broker.prepare(record) if record.has_msix else Answer()
        self.xen.assign(domid, bdf)
        self.broker.assign(domid, record)
        return answer

    def ask(self, request, sender: int = DOM) -> Answer:
        return self.broker.handle(sender, request)

    def ctrl(self, bdf: BDF, off: int) -> int:
        return self.devs[bdf].read(off, 2)

    def restart(self, limits: Limits = Limits()) -> Broker:
        self.broker = Broker(self.xen, Journal(self.jdir), limits)
        return self.broker

    def journal_doc(self, domid: int) -> dict | None:
        path = self.jdir / f"dom{domid}.json"
        return json.loads(path.read_text()) if path.exists() else None


@pytest.fixture
def env(tmp_path) -> Env:
    return Env(tmp_path)


# -- the seize-time record --------------------------------------------------------

def test_record_reads_the_first_capabilities_and_the_table_bar(env):
    nic = record_for(env.devs[NIC].read, env.devs[NIC].info)
    assert (nic.msi_cap, nic.msix_cap, nic.msix_entries, nic.msix_bir) == (0xD0, 0xA0, 5, 3)
    assert nic.table_base == 0xFE0A0000 and nic.has_msix
    old = record_for(env.devs[OLD].read, env.devs[OLD].info)
    assert old.msi_cap is None and old.msix_cap is None and not old.has_msix


def test_capability_walk_survives_a_looped_list():
    cfg = {0x06: 0x10, 0x34: 0x40, 0x40: 0x4401, 0x44: 0x4001}     # 0x40 -> 0x44 -> 0x40 ...
    assert find_capability(lambda off, size: cfg.get(off, 0), CAP_MSIX) is None


# -- prepare / release ------------------------------------------------------------

def test_prepare_is_never_issued_for_a_function_without_msix(env):
    record = record_for(env.devs[OLD].read, env.devs[OLD].info)
    answer = env.broker.prepare(record)
    assert (answer.errno, answer.error) == (errno.EINVAL, "no_capability")
    assert env.xen.calls["prepare_msix"] == 0
    with pytest.raises(SimXenCrash):                 # what Xen itself would do with it
        env.xen.prepare_msix(OLD)


def test_prepare_turns_memory_decoding_on_for_the_call_only(env):
    dev = env.devs[NIC]
    dev.write(COMMAND, 2, dev.read(COMMAND, 2) & ~COMMAND_MEM)
    assert env.broker.prepare(record_for(dev.read, dev.info)).ok
    assert NIC in env.xen.prepared and not dev.read(COMMAND, 2) & COMMAND_MEM
    assert env.broker.prepare(record_for(dev.read, dev.info)).ok          # idempotent
    assert env.xen.calls["prepare_msix"] == 1
    assert json.loads((env.jdir / "prepared.json").read_text())["prepared"] == [str(NIC)]


def test_release_waits_for_unassign_and_then_gives_msix_back(env):
    env.attach(NIC)
    assert env.ask(MapMsix(DOM, NIC, (0, 1))).ok
    assert env.broker.release(NIC).error == "still_mapped" and NIC in env.xen.prepared
    assert env.broker.unassign(NIC).ok and env.xen.pirq_count() == 0
    assert env.broker.release(NIC).ok and NIC not in env.xen.prepared
    assert json.loads((env.jdir / "prepared.json").read_text())["prepared"] == []


# -- mapping and its control bits -----------------------------------------------------

def test_msix_map_sets_controls_with_exact_width_writes_and_journals(env):
    env.attach(NIC)
    answer = env.ask(MapMsix(DOM, NIC, (4, 0, 2)))
    assert answer.ok and len(set(answer.pirqs)) == 3
    bound = {(b.entry, b.pirq, b.table_base, b.kind) for b in env.xen.bindings(DOM)}
    assert bound == {(e, p, 0xFE0A0000, Kind.msix) for e, p in zip((4, 0, 2), answer.pirqs)}
    assert env.ctrl(NIC, MSIX_CTRL) & (MSIX_ENABLE | MSIX_MASKALL) == MSIX_ENABLE
    assert env.ctrl(NIC, COMMAND) & COMMAND_INTX_DISABLE
    assert env.xen.dropped == []                     # nothing the intercept would swallow
    assert env.journal_doc(DOM)["mappings"] == [
        {"bdf": str(NIC), "kind": "msix", "entries": [4, 0, 2], "pirqs": list(answer.pirqs), "orphan": False}]
    assert env.ask(Query(DOM, NIC)) == Answer(pirqs=answer.pirqs, kind=Kind.msix, entries=(4, 0, 2))


def test_msi_map_and_unmap_leave_the_function_as_found(env):
    env.attach(NIC)
    before = env.devs[NIC].config_bytes()
    answer = env.ask(MapMsi(DOM, NIC))
    assert answer.ok and env.ctrl(NIC, MSI_CTRL) & MSI_ENABLE
    assert [b.kind for b in env.xen.bindings(DOM)] == [Kind.msi]
    assert env.ask(Unmap(DOM, NIC, Kind.msi)).ok
    assert env.xen.pirq_count() == 0 and env.devs[NIC].config_bytes() == before
    assert env.journal_doc(DOM) is None
    assert env.ask(Unmap(DOM, NIC, Kind.msi)) == Answer()          # disabling twice is fine


def test_the_sim_intercept_drops_wrong_width_control_writes(env):
    env.attach(NIC)
    before = env.ctrl(NIC, MSIX_CTRL)
    env.xen.write_config(NIC, 0xA0, 4, 0xC0000000 | env.devs[NIC].read(0xA0, 4))
    env.xen.write_config(NIC, 0xA4, 4, 0)            # the table offset: Xen's
    assert env.ctrl(NIC, MSIX_CTRL) == before and len(env.xen.dropped) == 2
    env.xen.write_config(NIC, MSIX_CTRL, 2, before | MSIX_ENABLE)
    assert env.ctrl(NIC, MSIX_CTRL) & MSIX_ENABLE


# -- validation ---------------------------------------------------------------------------

REFUSALS = [
    ("another guest's request", lambda: MapMsix(DOM, NIC, (0,)), OTHER, errno.EPERM, "wrong_domain"),
    ("a function it does not hold", lambda: MapMsix(DOM, DISK, (0,)), DOM, errno.ENODEV, "not_assigned"),
    ("entry beyond the table", lambda: MapMsix(DOM, NIC, (0, 5)), DOM, errno.EINVAL, "bad_entry"),
    ("duplicate entries", lambda: MapMsix(DOM, NIC, (1, 1)), DOM, errno.EINVAL, "duplicate_entry"),
    ("no entries", lambda: MapMsix(DOM, NIC, ()), DOM, errno.EINVAL, "count"),
    ("more vectors than the table", lambda: MapMsix(DOM, NIC, tuple(range(6))), DOM, errno.ENOSPC, "count"),
    ("multi-message MSI", lambda: MapMsi(DOM, NIC, 2), DOM, errno.EOPNOTSUPP, "multi_msi"),
    ("a supervisor-only request", lambda: Prepare(NIC), DOM, errno.EPERM, "not_allowed"),
]


@pytest.mark.parametrize("what, make, sender, err, error", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_requests_are_checked_before_anything_is_mapped(env, what, make, sender, err, error):
    env.attach(NIC)
    answer = env.ask(make(), sender)
    assert (answer.errno, answer.error) == (err, error)
    assert env.xen.pirq_count() == 0 and env.broker.live == {} and env.journal_doc(DOM) is None


def test_msi_on_a_function_without_it_and_msix_without_prepare_are_refused(env):
    env.attach(OLD)
    assert env.ask(MapMsi(DOM, OLD)).error == "no_capability"
    dev = env.devs[DISK]
    env.xen.assign(DOM, DISK)
    env.broker.assign(DOM, record_for(dev.read, dev.info))          # never prepared
    assert (env.ask(MapMsix(DOM, DISK, (0,))).errno) == errno.ENODATA
    assert env.xen.calls["map_pirq"] == 0


def test_nothing_is_ever_mapped_twice(env):
    env.attach(NIC)
    first = env.ask(MapMsix(DOM, NIC, (0, 1)))
    assert env.ask(MapMsix(DOM, NIC, (2,))).errno == errno.EALREADY
    assert env.ask(MapMsi(DOM, NIC)).error == "other_kind_mapped"
    assert env.xen.pirq_count() == 2 and env.xen.double_maps == []
    assert env.ask(Query(DOM, NIC)).pirqs == first.pirqs


def test_per_domain_limit(tmp_path):
    env = Env(tmp_path)
    env.broker = Broker(env.xen, Journal(env.jdir), Limits(max_pirqs_per_domain=4))
    env.attach(NIC)
    assert (env.ask(MapMsix(DOM, NIC, tuple(range(5)))).error) == "limit"
    assert env.xen.calls["map_pirq"] == 0


# -- failures are undone before the answer --------------------------------------------------

def test_a_failing_hypercall_mid_way_is_rolled_back(env):
    env.attach(NIC)
    env.xen.fail_next("map_pirq", errno.ENOSPC, after=2)
    answer = env.ask(MapMsix(DOM, NIC, (0, 1, 2, 3)))
    assert (answer.errno, answer.error) == (errno.ENOSPC, "hypervisor")
    assert env.xen.pirq_count() == 0 and env.broker.live == {} and env.journal_doc(DOM) is None
    assert not env.ctrl(NIC, MSIX_CTRL) & (MSIX_ENABLE | MSIX_MASKALL)
    assert not env.ctrl(NIC, COMMAND) & COMMAND_INTX_DISABLE
    assert env.ask(MapMsix(DOM, NIC, (0, 1))).ok                   # and the function is usable again


def test_xen_running_out_of_pirqs(tmp_path):
    env = Env(tmp_path, extra_guest_irqs=3)
    env.attach(NIC)
    assert env.ask(MapMsix(DOM, NIC, tuple(range(5)))).errno == errno.ENOSPC
    assert env.xen.pirq_count() == 0


def test_a_control_write_that_does_not_take_fails_the_map(env):
    env.attach(NIC)
    env.xen.host_maskall.add(NIC)                     # Xen keeps MASKALL forced on
    answer = env.ask(MapMsix(DOM, NIC, (0,)))
    assert (answer.errno, answer.error) == (errno.EIO, "readback")
    assert env.xen.pirq_count() == 0 and env.broker.live == {}


def test_a_failed_unmap_is_kept_as_an_orphan_and_retried(env):
    env.attach(NIC)
    assert env.ask(MapMsix(DOM, NIC, (0, 1))).ok
    env.xen.fail_next("unmap_pirq", errno.EIO)
    answer = env.ask(Unmap(DOM, NIC, Kind.msix))
    assert answer.ok and "kept for retry" in answer.detail
    assert env.xen.pirq_count() == 1 and env.journal_doc(DOM)["mappings"][0]["orphan"]
    assert env.ask(MapMsix(DOM, NIC, (0,))).error == "uncertain"
    assert env.ask(Query(DOM, NIC)) == Answer()        # never handed out again
    assert env.ask(Unmap(DOM, NIC, Kind.msix)).ok and env.xen.pirq_count() == 0
    assert env.journal_doc(DOM) is None


# -- the wire form and the client --------------------------------------------------------------

def test_requests_and_answers_survive_the_wire(env):
    for req in (MapMsi(DOM, NIC), MapMsix(DOM, NIC, (3, 1)), Unmap(DOM, NIC, Kind.msix),
                Query(DOM, NIC), Leave(DOM, NIC), Failed(DOM, NIC, 4, -errno.ENOSPC, "hypervisor/ENOSPC"),
                Failed(DOM, NIC, 2, -5)):
        assert request_from_wire(json.loads(json.dumps(request_to_wire(req)))) == req
    a = Answer(pirqs=(55, 54), kind=Kind.msix, entries=(3, 1))
    assert answer_from_wire(json.loads(json.dumps(answer_to_wire(a)))) == a


JUNK = [
    [], "map_msix", {"irq": "prepare", "domid": 5, "bdf": "0000:03:00.0"},
    {"irq": "restore", "domid": 5, "bdf": "0000:03:00.0"},          # nothing a worker needs yet
    {"irq": "map_msi", "domid": True, "bdf": "0000:03:00.0", "nvec": 1},
    {"irq": "map_msi", "domid": 0, "bdf": "0000:03:00.0", "nvec": 1},
    {"irq": "map_msi", "domid": 5, "bdf": "0000:03:00.0", "nvec": 1, "pirq": 9},
    {"irq": "map_msi", "domid": 5, "bdf": "0000:03:00.0"},
    {"irq": "map_msix", "domid": 5, "bdf": "0000:03:00.0", "entries": list(range(129))},
    {"irq": "map_msix", "domid": 5, "bdf": "0000:03:00.0", "entries": [2048]},
    {"irq": "map_msix", "domid": 5, "bdf": "0000:03:00.0", "entries": [-1]},
    {"irq": "map_msix", "domid": 5, "bdf": "0000:3:00.9", "entries": [0]},
    {"irq": "unmap", "domid": 5, "bdf": "0000:03:00.0", "kind": "intx"},
    {"irq": "failed", "domid": 5, "bdf": "0000:03:00.0", "op": 0, "err": -5, "cause": ""},
    {"irq": "failed", "domid": 5, "bdf": "0000:03:00.0", "op": 4, "err": 0, "cause": ""},
    {"irq": "failed", "domid": 5, "bdf": "0000:03:00.0", "op": 4, "err": -5, "cause": "a b/EIO"},
    {"irq": "failed", "domid": 5, "bdf": "0000:03:00.0", "op": 4, "err": -5, "cause": "x" * 30 + "/EIO"},
    {"irq": "failed", "domid": 5, "bdf": "0000:03:00.0", "op": 4, "err": -5},
    {"irq": "leave", "domid": 5, "bdf": "0000:03:00.0", "kind": "msix"},
]


@pytest.mark.parametrize("untrusted", JUNK, ids=range(len(JUNK)))
def test_a_worker_cannot_send_anything_else(untrusted):
    with pytest.raises(ValueError):
        request_from_wire(untrusted)


def test_the_client_raises_the_brokers_refusal(env):
    env.attach(NIC)
    client = Client(DOM, lambda req: env.broker.handle(DOM, req))
    pirqs = client.map_msix(NIC, (0, 1))
    with pytest.raises(IrqRefused) as exc:
        client.map_msix(NIC, (2,))
    assert exc.value.errno == errno.EALREADY and exc.value.error == "already_mapped"
    assert client.query(NIC).pirqs == pirqs
    liar = Client(DOM, lambda req: Answer(pirqs=(70000,)))
    with pytest.raises(IrqRefused):
        liar.map_msix(NIC, (0,))                    # a vector must fit the u16 on the wire


# -- status: the names of an interrupt error -----------------------------------------------------------

def test_op_error_names():
    assert cause_of(IrqRefused(errno.ENOSPC, "hypervisor")) == "hypervisor/ENOSPC"
    assert cause_of(IrqRefused(errno.EIO, "not a name!")) == "refused/EIO"
    assert op_error_name(4, -errno.EALREADY) == "-EALREADY"
    assert op_error_name(2, -5) == "XEN_PCI_ERR_op_failed" and op_error_name(5, -4) == "XEN_PCI_ERR_not_implemented"
    assert op_error_name(3, -77) == "-77"


# -- crashes and the journal ----------------------------------------------------------------------

def test_replay_adopts_a_live_guest_and_tears_down_a_gone_one(env):
    env.attach(NIC, DOM)
    env.attach(DISK, OTHER)
    kept = env.ask(MapMsix(DOM, NIC, (0, 1, 2)))
    assert env.ask(MapMsix(OTHER, DISK, (7,)), OTHER).ok
    env.xen.destroy_domain(OTHER)                  # the other guest dies while the supervisor is down
    broker = env.restart()
    report = broker.replay(alive=lambda d: d == DOM)
    assert [m.bdf for m in report.adopted] == [NIC] and [m.bdf for m in report.torn_down] == [DISK]
    assert not env.ctrl(DISK, 0x42) & MSIX_ENABLE and env.journal_doc(OTHER) is None
    assert broker.prepared == {NIC, DISK}
    env.broker.assign(DOM, record_for(env.devs[NIC].read, env.devs[NIC].info))
    assert env.ask(Query(DOM, NIC)).pirqs == kept.pirqs                   # a new worker learns them
    assert env.ask(MapMsix(DOM, NIC, (3,))).errno == errno.EALREADY     # and cannot double them
    assert env.xen.double_maps == [] and env.xen.pirq_count(DOM) == 3


class Crash(BaseException):
    """The supervisor process dies here."""


class CrashingJournal(Journal):
    """Dies at save number ``saves_left + 1``: before writing it, or just after (``after``)."""

    def __init__(self, directory: Path, saves_left: int, after: bool = False) -> None:
        super().__init__(directory)
        self.saves_left, self.after = saves_left, after

    def save(self, domid, mappings) -> None:
        if self.saves_left == 0:
            if self.after:
                super().save(domid, mappings)
            raise Crash()
        self.saves_left -= 1
        super().save(domid, mappings)


def _crash_mapping(env: Env, saves_left: int, after: bool = False) -> Broker:
    """Map entries 0-2 of the NIC, die at the given save, restart the supervisor."""
    env.attach(NIC)
    env.broker.journal = CrashingJournal(env.jdir, saves_left, after)
    with pytest.raises(Crash):
        env.ask(MapMsix(DOM, NIC, (0, 1, 2)))
    return env.restart()


def test_a_crash_between_intent_and_commit_leaves_the_function_uncertain_never_doubled(env):
    broker = _crash_mapping(env, saves_left=1)        # the intent written, death before the commit
    assert env.xen.pirq_count(DOM) == 3                # Xen has three; the journal knows none
    assert env.journal_doc(DOM)["mappings"][0]["pirqs"] == []
    report = broker.replay(alive=lambda d: True)
    assert report.uncertain == [NIC] and report.adopted == []
    assert not env.ctrl(NIC, MSIX_CTRL) & (MSIX_ENABLE | MSIX_MASKALL)     # the device fires nothing
    env.broker.assign(DOM, record_for(env.devs[NIC].read, env.devs[NIC].info))
    assert env.ask(MapMsix(DOM, NIC, (0,))).error == "uncertain"
    assert env.ask(Query(DOM, NIC)) == Answer()
    assert env.restart().replay(alive=lambda d: True).uncertain == [NIC]   # it stays known
    env.xen.destroy_domain(DOM)                        # Xen frees the unknown ones with the guest
    env.broker.domain_gone(DOM)
    assert env.journal_doc(DOM) is None and env.xen.double_maps == [] and env.xen.pirq_count() == 0


def test_a_crash_before_the_intent_leaves_nothing_to_do(env):
    broker = _crash_mapping(env, saves_left=0)
    assert env.xen.pirq_count() == 0 and env.journal_doc(DOM) is None
    report = broker.replay(alive=lambda d: True)
    assert (report.adopted, report.uncertain, report.torn_down) == ([], [], [])
    env.broker.assign(DOM, record_for(env.devs[NIC].read, env.devs[NIC].info))
    assert env.ask(MapMsix(DOM, NIC, (0,))).ok


def test_a_crash_after_the_commit_is_adopted(env):
    broker = _crash_mapping(env, saves_left=1, after=True)   # the commit written, then death
    report = broker.replay(alive=lambda d: True)
    assert [sorted(m.pirqs) for m in report.adopted] == [sorted(b.pirq for b in env.xen.bindings(DOM))]
    assert env.ctrl(NIC, MSIX_CTRL) & (MSIX_ENABLE | MSIX_MASKALL) == MSIX_ENABLE


class CrashingXen(SimPhysdev):
    """Xen whose caller (the supervisor) dies just before its call number ``calls_left + 1``."""

    calls_left = -1

    def _enter(self, call: str) -> None:
        self._tick()
        super()._enter(call)

    def _tick(self) -> None:
        if self.calls_left == 0:
            raise Crash()
        self.calls_left -= 1

    def read_config(self, bdf, offset, size):
        self._tick()
        return super().read_config(bdf, offset, size)

    def write_config(self, bdf, offset, size, value):
        self._tick()
        super().write_config(bdf, offset, size, value)


def _steps_of_a_map(tmp: Path) -> int:
    env = Env(tmp)
    env.xen.__class__ = CrashingXen
    env.attach(NIC)
    env.xen.calls_left = 10_000
    assert env.ask(MapMsix(DOM, NIC, (0, 1, 2))).ok
    return 10_000 - env.xen.calls_left


def test_a_supervisor_killed_at_any_step_of_a_map_leaks_nothing_and_never_doubles(tmp_path):
    """Kill before every Xen call and config access of a 3-vector map; replay; the guest then goes."""
    steps = _steps_of_a_map(tmp_path / "count")
    assert steps > 3
    seen = set()
    for k in range(steps + 1):
        env = Env(tmp_path / str(k))
        env.xen.__class__ = CrashingXen
        env.attach(NIC)
        env.xen.calls_left = k
        try:
            answer = env.ask(MapMsix(DOM, NIC, (0, 1, 2)))
            assert answer.ok and k == steps
        except Crash:
            pass
        env.xen.calls_left = -1
        broker = env.restart()
        report = broker.replay(alive=lambda d: True)
        broker.assign(DOM, record_for(env.devs[NIC].read, env.devs[NIC].info))
        in_xen = sorted(b.pirq for b in env.xen.bindings(DOM))
        if report.adopted:
            seen.add("adopted")
            assert sorted(report.adopted[0].pirqs) == in_xen and len(in_xen) == 3
            assert env.ctrl(NIC, MSIX_CTRL) & MSIX_ENABLE
        else:                              # the intent was written before Xen's first call
            seen.add("uncertain")
            assert report.uncertain == [NIC] and not env.ctrl(NIC, MSIX_CTRL) & MSIX_ENABLE
            assert env.ask(MapMsix(DOM, NIC, (0,))).error == "uncertain"
        assert env.xen.double_maps == []
        env.xen.destroy_domain(DOM)
        broker.domain_gone(DOM)
        assert env.xen.pirq_count() == 0 and env.journal_doc(DOM) is None and broker.live == {}
    assert seen == {"adopted", "uncertain"}


class CountingJournal(Journal):
    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.saves = 0

    def save(self, domid, mappings) -> None:
        self.saves += 1
        super().save(domid, mappings)


@pytest.mark.parametrize("vectors", [1, 8, 64])
def test_a_request_costs_the_same_journal_writes_whatever_its_vector_count(tmp_path, vectors):
    env = Env(tmp_path, extra_guest_irqs=128)
    env.attach(DISK)
    env.broker.journal = journal = CountingJournal(env.jdir)
    assert env.ask(MapMsix(DOM, DISK, tuple(range(vectors)))).ok
    assert journal.saves == 2                          # intent, commit
    assert env.ask(Unmap(DOM, DISK, Kind.msix)).ok
    assert journal.saves == 3 and env.xen.pirq_count() == 0


GARBAGE = {
    "not json": b"\x00{garbage",
    "wrong format": json.dumps({"format": "x", "domid": DOM, "mappings": []}).encode(),
    "domid of another file": json.dumps({"format": "pcibackd-irq/1", "domid": 9, "mappings": []}).encode(),
    "pirq 0": json.dumps({"format": "pcibackd-irq/1", "domid": DOM, "mappings": [
        {"bdf": "0000:03:00.0", "kind": "msix", "entries": [0], "pirqs": [0], "orphan": False}]}).encode(),
    "duplicate entries": json.dumps({"format": "pcibackd-irq/1", "domid": DOM, "mappings": [
        {"bdf": "0000:03:00.0", "kind": "msix", "entries": [1, 1], "pirqs": [50, 51], "orphan": False}]}).encode(),
    "msi entry 3": json.dumps({"format": "pcibackd-irq/1", "domid": DOM, "mappings": [
        {"bdf": "0000:03:00.0", "kind": "msi", "entries": [3], "pirqs": [50], "orphan": False}]}).encode(),
    "bool for a pirq": json.dumps({"format": "pcibackd-irq/1", "domid": DOM, "mappings": [
        {"bdf": "0000:03:00.0", "kind": "msix", "entries": [0], "pirqs": [True], "orphan": False}]}).encode(),
    "huge": b" " * (2 << 20),
}


@pytest.mark.parametrize("what", GARBAGE)
def test_a_garbage_journal_is_set_aside_and_the_guest_refused(env, what):
    env.jdir.mkdir(exist_ok=True)
    (env.jdir / f"dom{DOM}.json").write_bytes(GARBAGE[what])
    report = env.broker.replay(alive=lambda d: True)
    assert report.damaged_domains == [DOM] and report.problems
    assert (env.jdir / f"dom{DOM}.json.damaged").exists() and not (env.jdir / f"dom{DOM}.json").exists()
    env.attach(NIC)
    assert env.ask(MapMsix(DOM, NIC, (0,))).error == "journal_damaged"
    assert env.restart().replay(alive=lambda d: True).damaged_domains == [DOM]   # stays until the guest goes
    env.broker.domain_gone(DOM)
    assert not (env.jdir / f"dom{DOM}.json.damaged").exists()
    env.attach(NIC)
    assert env.ask(MapMsix(DOM, NIC, (0,))).ok


def test_a_garbage_journal_of_a_gone_guest_is_dropped(env):
    env.jdir.mkdir(exist_ok=True)
    (env.jdir / "dom9.json").write_bytes(b"[]")
    (env.jdir / ".dom9.json.tmp123").write_bytes(b"half")
    (env.jdir / "notes.txt").write_text("hi")
    report = env.broker.replay(alive=lambda d: False)
    assert report.damaged_domains == [] and any("notes.txt" in p for p in report.problems)
    assert sorted(p.name for p in env.jdir.iterdir()) == ["notes.txt"]


def test_a_damaged_prepared_record_lets_prepare_adopt_ebusy(env):
    env.attach(NIC)                                    # prepared in Xen and in the journal
    (env.jdir / "prepared.json").write_bytes(b"{")
    broker = env.restart()
    broker.replay(alive=lambda d: True)
    assert broker.prepared == set() and broker.prepared_unknown
    assert broker.prepare(record_for(env.devs[NIC].read, env.devs[NIC].info)).ok
    assert broker.prepared == {NIC}


# -- ownership and a journal that cannot be written ------------------------------------------------

def test_assign_never_takes_a_function_its_owner_still_holds(env):
    env.attach(NIC, DOM)
    pirqs = env.ask(MapMsix(DOM, NIC, (0, 1))).pirqs
    answer = env.broker.assign(OTHER, record_for(env.devs[NIC].read, env.devs[NIC].info))
    assert answer.errno == errno.EBUSY and answer.error == "owned"
    assert env.ask(Query(DOM, NIC)).pirqs == pirqs and env.xen.pirq_count(DOM) == 2
    assert env.ask(MapMsi(OTHER, NIC), OTHER).error == "not_assigned"
    assert env.broker.unassign(NIC).ok and env.xen.pirq_count(DOM) == 0     # the owner's unassign may
    assert env.broker.assign(OTHER, record_for(env.devs[NIC].read, env.devs[NIC].info)).ok


class FailingJournal(Journal):
    """A disk that takes ``saves_left`` domain writes, then refuses every write."""

    def __init__(self, directory: Path, saves_left: int = 0) -> None:
        super().__init__(directory)
        self.saves_left = saves_left

    def _spend(self) -> None:
        if self.saves_left == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.saves_left -= 1

    def save(self, domid, mappings) -> None:
        self._spend()
        super().save(domid, mappings)

    def save_prepared(self, prepared) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    def forget(self, domid) -> None:
        raise OSError(errno.EROFS, "Read-only file system")


@pytest.mark.parametrize("saves_left", [0, 1])
def test_a_journal_that_cannot_be_written_fails_the_map_not_the_broker(env, saves_left):
    """Intent, commit: whichever write fails, EIO and nothing left mapped."""
    env.attach(NIC)
    env.broker.journal = FailingJournal(env.jdir, saves_left)
    answer = env.ask(MapMsix(DOM, NIC, (0, 1)))
    assert (answer.errno, answer.error) == (errno.EIO, "journal")
    assert env.xen.pirq_count(DOM) == 0 and NIC not in env.broker.live
    assert not env.ctrl(NIC, MSIX_CTRL) & MSIX_ENABLE
    env.broker.journal = Journal(env.jdir)
    assert env.ask(MapMsix(DOM, NIC, (0, 1))).ok                # and the next one works


def test_supervisor_side_journal_failures_are_answers(env):
    env.attach(NIC)
    assert env.ask(MapMsix(DOM, NIC, (0,))).ok
    env.broker.journal = FailingJournal(env.jdir)
    assert env.broker.unassign(NIC).ok and env.xen.pirq_count(DOM) == 0   # tear-down: best effort
    assert env.broker.release(NIC).errno == errno.EIO and NIC not in env.broker.prepared
    assert env.broker.prepare(record_for(env.devs[NIC].read, env.devs[NIC].info)).errno == errno.EIO
    assert NIC in env.broker.prepared                            # Xen's state, whatever the disk says
    assert env.broker.domain_gone(DOM).errno == errno.EIO
