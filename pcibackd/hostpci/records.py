"""Where release and seize records live, and which functions they quarantine.

Driver: files under the runtime state directory.  Records are written by the
supervisor (at seize) and by each worker in its own ``dom<N>`` directory (at
release), so every reader treats them as written by a guest's process: never
through a link, never blocking on a FIFO, bounded in size.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from pcibackd.common.files import write_atomic
from pcibackd.hostpci.release import ReleaseRecord
from pcibackd.wire.bdf import BDF


MAX_RECORD = 64 * 1024       # a record is a few hundred bytes


def worker_state_dir(state_dir: Path, domid: int) -> Path:
    """``<state>/dom<N>``: what domain N's worker writes (its own uid's): config-space
    snapshots, its functions' seize-time state, their release records and quarantines."""
    return Path(state_dir) / f"dom{domid}"


def _record_dirs(state_dir: Path) -> list[Path]:
    """``state_dir`` and every worker's own directory beneath it (those this process may list)."""
    root = Path(state_dir)
    try:
        return [root, *sorted(p for p in root.glob("dom*") if p.is_dir())]
    except OSError:
        return [root]


def _read_untrusted(path: Path) -> bytes:
    """A file a worker may have written: never through a link, never blocking on a FIFO, bounded."""
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        return f.read(MAX_RECORD)


def _record_path(state_dir: Path, bdf: BDF | str) -> Path:
    return Path(state_dir) / f"{bdf}.release"


def _quarantine_path(state_dir: Path, bdf: BDF | str) -> Path:
    return Path(state_dir) / f"{bdf}.quarantine"


def write_record(state_dir: Path, record: ReleaseRecord) -> None:
    """Keep ``record`` as the function's last release; quarantine it when its reset failed."""
    write_atomic(_record_path(state_dir, record.bdf), json.dumps(record.to_dict()).encode())
    if not record.reset_ok:
        quarantine(state_dir, record)


def quarantine(state_dir: Path, record: ReleaseRecord) -> None:
    """Keep ``record.bdf`` from every guest until :func:`clear_quarantine` (``record`` says why)."""
    write_atomic(_quarantine_path(state_dir, record.bdf), json.dumps(record.to_dict()).encode())


def read_records(state_dir: Path) -> dict[BDF, tuple[ReleaseRecord, bool]]:
    """Every function's last release (the newest of any worker's) and whether it is
    quarantined (by any worker's record); unreadable records are skipped."""
    out: dict[BDF, tuple[ReleaseRecord, bool]] = {}
    dirs = _record_dirs(state_dir)
    for d in dirs:
        for path in sorted(d.glob("*.release")):
            try:
                bdf = BDF.parse(path.name[:-len(".release")])
                record = ReleaseRecord.from_dict(json.loads(_read_untrusted(path)))
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if bdf not in out or record.when >= out[bdf][0].when:
                out[bdf] = (record, False)
    return {bdf: (record, any(_quarantine_path(d, bdf).exists() for d in dirs))
            for bdf, (record, _) in out.items()}


def quarantined(state_dir: Path, bdf: BDF) -> ReleaseRecord | None:
    """The failed release that quarantines ``bdf`` (in ``state_dir`` or a worker's directory
    beneath it), or None when it is free to hand out."""
    for d in _record_dirs(state_dir):
        path = _quarantine_path(d, bdf)
        try:
            return ReleaseRecord.from_dict(json.loads(_read_untrusted(path)))
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError):
            # unreadable, yet it exists: still quarantined
            return ReleaseRecord(str(bdf), "?", False, "unreadable quarantine record")
    return None


def clear_quarantine(state_dir: Path, bdf: BDF) -> bool:
    """Let ``bdf`` be handed out again; False when it was not quarantined."""
    cleared = False
    for d in _record_dirs(state_dir):
        try:
            _quarantine_path(d, bdf).unlink()
            cleared = True
        except FileNotFoundError:
            pass
    return cleared
