"""Worker uids from a configured range, and the records the supervisor reads from
directories workers own (a worker may plant anything there)."""

from __future__ import annotations

import grp
import os
import threading

import pytest

from pcibackd.daemon.config import ConfigError, DaemonConfig
from pcibackd.hostpci.release import ReleaseRecord
from pcibackd.hostpci.records import clear_quarantine, quarantined, read_records, worker_state_dir, write_record
from pcibackd.wire.bdf import BDF
from pcibackd.worker import privileges

DEV = BDF(0, 0x42, 3, 0)


def _load(tmp_path, text: str) -> DaemonConfig:
    conf = tmp_path / "pcibackd.toml"
    conf.write_text(text)
    return DaemonConfig.load(conf)


def test_the_uid_base_is_a_checked_setting(tmp_path):
    assert DaemonConfig.load(None).worker_uid_base == privileges.DEFAULT_UID_BASE
    assert _load(tmp_path, "worker_uid_base = 0x7c000000\n").worker_uid_base == 0x7C000000
    for bad, why in (("1000", "from 0x10000"), ("true", "integer"), ('"0x7c000000"', "integer"),
                     ("0xFFFFF000", "to 0xffff800f"), (str(privileges.LOCKED_UID - 5), "locked uid")):
        with pytest.raises(ConfigError, match=f"worker_uid_base: .*{why}"):
            _load(tmp_path, f"worker_uid_base = {bad}\n")


def test_a_status_group_among_worker_ids_is_refused(monkeypatch, tmp_path):
    uid3 = privileges.worker_uid(privileges.DEFAULT_UID_BASE, 3)
    monkeypatch.setattr(grp, "getgrnam", lambda name: grp.struct_group((name, "x", uid3, [])))
    with pytest.raises(ConfigError, match="status_group 'monitors' .* in the workers' range"):
        _load(tmp_path, 'status_group = "monitors"\n')


def test_records_of_every_worker_directory_count_the_newest_wins(tmp_path):
    state = tmp_path / "state"
    old = ReleaseRecord(str(DEV), "flr", False, when=1.0)
    new = ReleaseRecord(str(DEV), "pm", True, when=2.0)
    for domid, record in ((1, new), (2, old)):
        own = worker_state_dir(state, domid)
        own.mkdir(parents=True)
        write_record(own, record)
    assert read_records(state) == {DEV: (new, True)}       # dom2's failed reset still quarantines it
    assert quarantined(state, DEV) == old
    assert clear_quarantine(state, DEV) and quarantined(state, DEV) is None
    assert read_records(state) == {DEV: (new, False)}


def test_planted_links_and_fifos_are_never_followed_nor_waited_on(tmp_path):
    state = tmp_path / "state"
    own = worker_state_dir(state, 5)
    own.mkdir(parents=True)
    secret = tmp_path / "secret.json"
    secret.write_text('{"bdf": "0000:00:07.0", "method": "flr", "reset_ok": true}')
    (own / "0000:00:07.0.release").symlink_to(secret)
    os.mkfifo(own / f"{DEV}.release")
    os.mkfifo(own / f"{DEV}.quarantine")
    box = {}
    reader = threading.Thread(target=lambda: box.update(records=read_records(state), why=quarantined(state, DEV)),
                              daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "a planted FIFO blocked the reader"
    assert box["records"] == {}                                # neither the link's target nor the FIFO
    assert box["why"].detail == "unreadable quarantine record"  # a planted quarantine still quarantines


@pytest.mark.skipif(os.geteuid() != 0 or privileges.missing() != [], reason="needs root with every capability")
def test_missing_names_what_a_switch_to_worker_uids_lacks():
    pid = os.fork()
    if pid == 0:
        try:
            privileges.drop(keep=(0, 6, 7))      # CAP_CHOWN, CAP_SETGID, CAP_SETUID: not CAP_KILL
            os._exit(10 if privileges.missing() == ["CAP_KILL"] else 11)
        except BaseException:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 10
