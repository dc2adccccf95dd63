"""Build the small C helpers in this directory on demand.

``native_lib(name)`` compiles ``<name>.c`` next to it into ``<name>.so`` when
the shared object is missing or older than the source. If the package
directory is read-only, the object goes to a per-user cache directory under a
name derived from the source's hash instead. Concurrent callers (parallel test
workers) serialise on an flock of the source file and publish the result with
an atomic rename, so nobody ever loads a half-written object.

A source may ask for extra compiler/linker arguments with a line
``/* build-flags: -lfoo */`` near its top.

``python -m simdom0.native.build`` builds every ``.c`` file here.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
CFLAGS = ("-O2", "-fPIC", "-shared", "-Wall", "-Wextra")
_FLAGS_RE = re.compile(rb"^\s*(?://|/\*)\s*build-flags:\s*(.*?)\s*(?:\*/)?\s*$", re.M)


class NativeBuildError(RuntimeError):
    """The C compiler failed or is missing."""


def _extra_flags(source: bytes) -> list[str]:
    match = _FLAGS_RE.search(source[:4096])
    return shlex.split(match.group(1).decode()) if match else []


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pcibackd" / "native"


def _target_for(src: Path) -> Path:
    """Next to the source if that directory is writable, else the cache."""
    if os.access(src.parent, os.W_OK):
        return src.with_suffix(".so")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    return cache / f"{src.stem}-{digest}.so"


def _fresh(target: Path, src: Path) -> bool:
    try:
        return target.stat().st_mtime_ns >= src.stat().st_mtime_ns
    except FileNotFoundError:
        return False


def _compile(src: Path, target: Path) -> None:
    compiler = os.environ.get("CC", "gcc")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    src_mtime = src.stat().st_mtime_ns
    cmd = [compiler, *CFLAGS, "-o", tmp, str(src), *_extra_flags(src.read_bytes())]
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except FileNotFoundError as exc:
            raise NativeBuildError(f"C compiler {compiler!r} not found") from exc
        if proc.returncode != 0:
            raise NativeBuildError(f"{shlex.join(cmd)} failed:\n{proc.stderr.strip()}")
        os.chmod(tmp, 0o755)
        # Stamp with the source's mtime: an edit made during the compile
        # still counts as newer and triggers the next rebuild.
        os.utime(tmp, ns=(src_mtime, src_mtime))
        os.replace(tmp, target)  # atomic: readers see the old object or the new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def native_lib(name: str) -> Path:
    """Path of the shared object built from ``simdom0/native/<name>.c``."""
    src = SOURCE_DIR / f"{name}.c"
    if not src.is_file():
        raise FileNotFoundError(f"no native source {src}")
    target = _target_for(src)
    if _fresh(target, src):
        return target
    # flock on the (read-only) source: no stray lock files, works for every user.
    with open(src, "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _fresh(target, src):  # another caller may have built it meanwhile
            _compile(src, target)
    return target


def build_all() -> list[Path]:
    """Build every ``.c`` file in the package's ``_native`` directory."""
    return [native_lib(src.stem) for src in sorted(SOURCE_DIR.glob("*.c"))]


def main() -> int:
    try:
        for path in build_all():
            print(path)
    except NativeBuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
