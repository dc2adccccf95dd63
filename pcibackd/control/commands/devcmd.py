"""What the assignable-* and pci-* commands share: errors mapped to errnos, the client-side wait."""

from __future__ import annotations

import time
from typing import Callable

from pcibackd.control.commands.base import CommandError
from pcibackd.control.protocol import Errno
from pcibackd.daemon.lifecycle import LifecycleError
from pcibackd.wire.bdf import BDF

ERRNO = {"bad": Errno.BAD_ARGUMENTS, "not_found": Errno.NOT_FOUND, "failed": Errno.COMMAND_FAILED}
FOLLOW_TIMEOUT = 10.0     # libxl waits this long for a backend (LIBXL_DESTROY_TIMEOUT)


def run(fn: Callable, *args):
    """``fn(*args)`` with a :class:`LifecycleError` turned into the command's error."""
    try:
        return fn(*args)
    except LifecycleError as exc:
        raise CommandError(ERRNO[exc.kind], exc.message) from None


def bdf(untrusted: str) -> BDF:
    try:
        return BDF.parse(untrusted)
    except ValueError as exc:
        raise CommandError(Errno.BAD_ARGUMENTS, str(exc)) from None


def wait_for(call: Callable[[str, dict], dict], domain: str, done: Callable[[dict], bool],
             what: str, timeout: float = 0.0) -> str | None:
    """Client side: poll ``pci-list DOMAIN`` until ``done(result)``; None, or why it stopped.
    Waits :data:`FOLLOW_TIMEOUT`, or pcibackctl's ``--timeout`` when that is longer."""
    timeout = max(FOLLOW_TIMEOUT, timeout)
    deadline = time.monotonic() + timeout
    while True:
        rep = call("pci-list", {"domain": domain})
        if rep.get("status") != "ok":
            return f"{what}: {rep.get('reason')}"
        if done(rep["result"]):
            return None
        if time.monotonic() > deadline:
            return f"{what}: the guest did not answer within {timeout:.0f} s"
        time.sleep(0.1)       # a client polling its daemon, with a deadline
