"""`xl rename` is followed: status and metrics show a guest's new name (one xenstore
watch per guest, no polling)."""

from __future__ import annotations

from test_control_commands import EDU, ok
from waiting import wait_until


def test_a_renamed_guest_shows_its_new_name(dom0):
    dom0.add_device("edu", EDU)
    dom0.create_guest(3, [EDU], name="before")
    wait_until(lambda: [g["name"] for g in dom0.status()["guests"]] == ["before"], what="the guest in status")
    dom0.xs.write("/local/domain/3/name", "after")          # what xl rename writes
    wait_until(lambda: [g["name"] for g in dom0.status()["guests"]] == ["after"], what="the new name in status")
    assert 'name="after"' in ok(dom0, "metrics")
    dom0.xs.write("/local/domain/3/name", "web 1\x07")      # shown printable, as at start
    wait_until(lambda: [g["name"] for g in dom0.status()["guests"]] == ["web?1?"], what="the cleaned name")
