"""Fixtures for the confspace tests: simulated devices built from the real dumps."""

from __future__ import annotations

import pytest

from confspace_support import Rig, make_rig


@pytest.fixture
def rig(tmp_path):
    """rig(dump, policy=None) -> Rig: a ConfSpace over a fresh SimDevice, write log cleared."""
    count = iter(range(1000))

    def make(dump: str, policy=None, **kw) -> Rig:
        return make_rig(tmp_path / f"sim{next(count)}", dump, policy, **kw)
    return make


@pytest.fixture
def rig_e1000e(tmp_path):
    """One e1000e rig for tests whose examples do not change device state."""
    return make_rig(tmp_path / "e1000e", "e1000e")
