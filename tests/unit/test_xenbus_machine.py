"""The backend xenbus machine, without xenstore: every (state, input) pair and
the connect / resume / hot-plug / teardown / hostile sequences."""

import copy
import errno

import pytest

from pcibackd.worker import xenbus as xb
from pcibackd.worker.xenbus_nodes import parse_backend
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import XenbusState as S

DEV0 = "0000:00:05.0"


def nodes(state="1", online="1", devs=((DEV0, "1"),), **extra):
    d = {"state": state, "online": online, "num_devs": str(len(devs)), "frontend": "/local/domain/1/device/pci/0"}
    for i, (bdf, st) in enumerate(devs):
        d[f"dev-{i}"], d[f"key-{i}"], d[f"state-{i}"] = bdf, bdf, st
    d.update(extra)
    return parse_backend(d)


def front(state="3", gref="8", evtchn="9", magic="7", exists=True):
    return xb.FrontendNodes(exists, state, gref, evtchn, magic)


def kinds(effects):
    return [type(e).__name__ for e in effects]


def sample_inputs():
    return [xb.Probe(nodes(), front("1")), xb.BackendChanged(nodes()), xb.FrontendChanged(front()),
            xb.EffectFailed(xb.MapRing(1, 2), errno.EINVAL, "x"), xb.BackendGone(), xb.BadFrontendPath("x")]


@pytest.mark.parametrize("state", list(S))
@pytest.mark.parametrize("idx", range(len(sample_inputs())))
def test_every_pair_is_in_the_table_or_raises_with_state_unchanged(state, idx):
    ev = sample_inputs()[idx]
    m = xb.BackendMachine(state=state)
    before = copy.deepcopy(m)
    if (state, type(ev)) in xb.TRANSITIONS:
        assert isinstance(m.handle(ev), list)
    else:
        with pytest.raises(xb.ProtocolError):
            m.handle(ev)
        assert m == before


def test_table_is_rendered_in_docstring():
    assert "Connected      FrontendChanged  -> on_frontend" in xb.__doc__


def test_a_bad_frontend_path_is_fatal_and_ends_the_worker():
    m = xb.BackendMachine()
    eff = m.handle(xb.BadFrontendPath("bad frontend path '/local/domain/8/device/pci/0'"))
    assert kinds(eff) == ["Fatal", "Exit"] and eff[0].err == errno.EINVAL and m.state == S.Closing


def test_connect_sequence_like_linux():
    m = xb.BackendMachine()
    eff = m.handle(xb.Probe(nodes(), front("1")))
    assert kinds(eff) == ["SwitchState", "ExportDevices", "Publish", "SwitchState"]
    assert eff[0] == xb.SwitchState(S.InitWait) and eff[-1] == xb.SwitchState(S.Initialised)
    assert eff[2] == xb.Publish(((0, "0000:00:00.00"),), ("0000:00",))
    eff = m.handle(xb.FrontendChanged(front("3")))
    assert eff == [xb.MapRing(8, 9), xb.SwitchState(S.Connected)]
    assert m.handle(xb.FrontendChanged(front("4"))) == []
    assert m.state == S.Connected


def test_attach_immediately_when_frontend_was_first():
    m = xb.BackendMachine()
    eff = m.handle(xb.Probe(nodes(), front("3")))
    assert eff[-2:] == [xb.MapRing(8, 9), xb.SwitchState(S.Connected)]


def test_waits_for_devices_when_num_devs_missing():
    m = xb.BackendMachine()
    assert m.handle(xb.Probe(nodes(devs=()), front("1"))) == [xb.SwitchState(S.InitWait)]
    eff = m.handle(xb.BackendChanged(nodes()))
    assert xb.SwitchState(S.Initialised) in eff


@pytest.mark.parametrize("fe,err", [
    (front(magic="8"), errno.EFAULT), (front(magic=None), errno.EFAULT),
    (front(gref="x"), errno.EINVAL), (front(gref="-1"), errno.EINVAL), (front(gref="99999999999"), errno.EINVAL),
    (front(evtchn=""), errno.EINVAL), (front(evtchn=None), errno.EINVAL), (front(evtchn="4294967296"), errno.EINVAL),
])
def test_bad_frontend_config_is_fatal(fe, err):
    m = xb.BackendMachine()
    m.handle(xb.Probe(nodes(), front("1")))
    eff = m.handle(xb.FrontendChanged(fe))
    assert len(eff) == 1 and isinstance(eff[0], xb.Fatal) and eff[0].err == err
    assert m.state == S.Closing


def test_map_failure_is_fatal():
    m = xb.BackendMachine()
    m.handle(xb.Probe(nodes(), front("3")))
    eff = m.handle(xb.EffectFailed(xb.MapRing(8, 9), errno.ENOENT, "no such grant"))
    assert isinstance(eff[0], xb.Fatal) and m.state == S.Closing and not m.ring


def test_resume_after_worker_crash_does_not_change_state():
    m = xb.BackendMachine()
    eff = m.handle(xb.Probe(nodes(state="4", devs=((DEV0, "3"),)), front("4")))
    assert kinds(eff) == ["ExportDevices", "Publish", "MapRing"]
    assert m.state == S.Connected and m.exported == {BDF.parse(DEV0): BDF(0, 0, 0, 0)}


def test_hotplug_and_unplug():
    m = xb.BackendMachine()
    m.handle(xb.Probe(nodes(), front("3")))
    two = ((DEV0, "3"), ("0000:00:06.0", "1"))
    assert m.handle(xb.BackendChanged(nodes(state="7", devs=two))) == []
    assert m.state == S.Reconfiguring
    eff = m.handle(xb.FrontendChanged(front("7")))
    assert kinds(eff) == ["ExportDevices", "Publish", "SwitchState"] and eff[-1] == xb.SwitchState(S.Reconfigured)
    assert m.exported[BDF.parse("0000:00:06.0")] == BDF(0, 0, 1, 0)
    assert m.handle(xb.FrontendChanged(front("4"))) == [xb.SwitchState(S.Connected)]
    # unplug the first: state-0=5, backend 7
    m.handle(xb.BackendChanged(nodes(state="7", devs=((DEV0, "5"), ("0000:00:06.0", "3")))))
    eff = m.handle(xb.FrontendChanged(front("7")))
    assert eff[0] == xb.RemoveDevices((BDF.parse(DEV0),))
    assert BDF.parse(DEV0) not in m.exported
    # toolstack renumbers: the remaining device is now index 0
    m.handle(xb.FrontendChanged(front("4")))
    m.handle(xb.BackendChanged(nodes(state="4", devs=(("0000:00:06.0", "3"),))))
    assert m.exported == {BDF.parse("0000:00:06.0"): BDF(0, 0, 1, 0)}


def test_teardown_online_0():
    m = xb.BackendMachine()
    m.handle(xb.Probe(nodes(), front("3")))
    eff = m.handle(xb.BackendChanged(nodes(state="5", online="0", devs=((DEV0, "3"),))))
    assert eff == [xb.UnmapRing(), xb.SwitchState(S.Closed)]
    assert kinds(m.handle(xb.FrontendChanged(front("6")))) == ["Exit"]


def test_frontend_closing_then_closed_while_online():
    m = xb.BackendMachine()
    m.handle(xb.Probe(nodes(), front("3")))
    assert m.handle(xb.FrontendChanged(front("5"))) == [xb.UnmapRing(), xb.SwitchState(S.Closing)]
    assert m.handle(xb.FrontendChanged(front("6"))) == [xb.SwitchState(S.Closed)]   # online: stay


@pytest.mark.parametrize("fe", [front(exists=False), front("0")])
def test_frontend_gone(fe):
    m = xb.BackendMachine()
    m.handle(xb.Probe(nodes(), front("3")))
    assert kinds(m.handle(xb.FrontendChanged(fe))) == ["UnmapRing", "Exit"]


@pytest.mark.parametrize("fe_state", ["1", "2", "8", "9", "junk", "", "-1"])
def test_frontend_flapping_garbage_is_ignored_when_connected(fe_state):
    m = xb.BackendMachine()
    m.handle(xb.Probe(nodes(), front("3")))
    assert m.handle(xb.FrontendChanged(front(fe_state))) == []
    assert m.state == S.Connected


@pytest.mark.parametrize("untrusted,problem", [
    ({"num_devs": "-1"}, "num_devs"), ({"num_devs": "x"}, "num_devs"), ({"num_devs": "100000"}, "num_devs"),
    ({"num_devs": "1", "dev-0": "zz:yy"}, "dev-0"), ({"num_devs": "1", "dev-0": "0000:00:20.0"}, "dev-0"),
    ({"num_devs": "1", "dev-0": "0000:00:01.0", "opts-0": "evil=1"}, "unknown option"),
])
def test_parse_backend_reports_garbage(untrusted, problem):
    parsed = parse_backend(untrusted)
    assert any(problem in p for p in parsed.problems)


def test_parse_backend_options_kept():
    p = parse_backend({"num_devs": "1", "dev-0": "0000:00:01.0", "state-0": "1",
                          "opts-0": "msitranslate=0,power_mgmt=0,permissive=1,rdm_policy=strict"})
    assert dict(p.devs[0].opts)["permissive"] == "1" and not p.problems


def test_vpci_bus_full_is_fatal():
    m = xb.BackendMachine()
    devs = tuple((f"0000:01:{s:02x}.0", "1") for s in range(32)) + (("0000:02:00.0", "1"),)
    eff = m.handle(xb.Probe(nodes(devs=devs), front("1")))
    assert isinstance(eff[-1], xb.Fatal) and eff[-1].err == errno.ENOSPC


@pytest.mark.parametrize("extra", [{"num_devs": "-1"}, {"num_devs": "lots"}, {"num_devs": "100000"},
                                   {"dev-0": "not-a-bdf"}])
def test_broken_device_list_is_fatal(extra):
    m = xb.BackendMachine()
    d = {"state": "1", "online": "1", "num_devs": "1", "dev-0": DEV0, "state-0": "1"}
    d.update(extra)
    eff = m.handle(xb.Probe(parse_backend(d), front("1")))
    assert isinstance(eff[-1], xb.Fatal) and eff[-1].err == errno.EINVAL and m.state == S.Closing


def test_resume_keeps_published_guest_addresses_after_renumbering():
    """Review #1: after unplug + renumber + hot-plug, dev-N order no longer matches
    the slots; a restarted worker must keep each device where the guest saw it."""
    m = xb.BackendMachine()
    d = {"state": "4", "online": "1", "num_devs": "2",
         "dev-0": "0000:00:06.0", "state-0": "3", "vdev-0": "0000:00:01.00",
         "dev-1": "0000:02:00.0", "state-1": "3", "vdev-1": "0000:00:00.00"}
    eff = m.handle(xb.Probe(parse_backend(d), front("4")))
    assert m.exported == {BDF.parse("0000:00:06.0"): BDF(0, 0, 1, 0), BDF.parse("0000:02:00.0"): BDF(0, 0, 0, 0)}
    assert eff[1] == xb.Publish(((0, "0000:00:01.00"), (1, "0000:00:00.00")), ("0000:00",))


@pytest.mark.parametrize("vdev0", [None, "garbage", "0000:00:01.09", "0001:00:01.00"])
def test_resume_with_missing_or_bad_vdev_places_the_rest(vdev0):
    m = xb.BackendMachine()
    d = {"state": "4", "online": "1", "num_devs": "2",
         "dev-0": "0000:00:06.0", "state-0": "3", "dev-1": "0000:02:00.0", "state-1": "3", "vdev-1": "0000:00:00.00"}
    if vdev0 is not None:
        d["vdev-0"] = vdev0
    m.handle(xb.Probe(parse_backend(d), front("4")))
    assert m.exported[BDF.parse("0000:02:00.0")] == BDF(0, 0, 0, 0)       # kept
    assert m.exported[BDF.parse("0000:00:06.0")] == BDF(0, 0, 1, 0)       # placed in a free slot


def test_resume_placement_failure_is_fatal_not_a_crash():
    m = xb.BackendMachine()
    d = {"state": "4", "online": "1", "num_devs": "33"}
    for i in range(33):
        d[f"dev-{i}"], d[f"state-{i}"] = f"0000:{1 + i // 32:02x}:{i % 32:02x}.0", "3"
    eff = m.handle(xb.Probe(parse_backend(d), front("4")))
    assert isinstance(eff[-1], xb.Fatal) and m.state == S.Closing


def test_restart_during_setup_exports_already_published_devices():
    """Review #6: predecessor died after Publish (state-N=3) but before Initialised."""
    m = xb.BackendMachine()
    eff = m.handle(xb.Probe(nodes(state="2", devs=((DEV0, "3"),)), front("3")))
    assert kinds(eff) == ["SwitchState", "ExportDevices", "Publish", "SwitchState", "MapRing", "SwitchState"]


@pytest.mark.parametrize("first", ["1", None])
def test_toolstack_teardown_before_the_guest_connected(first):
    m = xb.BackendMachine()
    m.handle(xb.Probe(nodes(), front("1")))
    assert m.state == S.Initialised
    eff = m.handle(xb.BackendChanged(nodes(state="5", online="0", devs=((DEV0, "3"),))))
    assert eff == [xb.SwitchState(S.Closed)] and m.state == S.Closed


def test_resume_with_duplicate_vdevs_never_collides():
    m = xb.BackendMachine()
    d = {"state": "4", "online": "1", "num_devs": "2",
         "dev-0": "0000:00:06.0", "state-0": "3", "vdev-0": "0000:00:00.00",
         "dev-1": "0000:02:00.0", "state-1": "3", "vdev-1": "0000:00:00.00"}
    m.handle(xb.Probe(parse_backend(d), front("4")))
    assert len(set(m.exported.values())) == 2
