"""Waiting for a condition in a test: poll it, with a deadline."""

from __future__ import annotations

import time

import psutil


def wait_until(predicate, timeout=10.0, what="", interval=0.02):
    """Poll predicate() until it returns a truthy value; return that value.
    Fails the test (AssertionError naming `what` and the timeout) when time
    runs out; `what` may be a callable, called then, to describe the state."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")
        time.sleep(interval)
    return value


def process_gone(pid: int) -> bool:
    """Whether ``pid`` has exited (gone, or a zombie nobody reaped yet); race-free
    against the process exiting between the checks."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
