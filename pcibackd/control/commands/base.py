"""What every command module shares: argument specs, errors, worker round trips.

A command module holds (see ``status.py``):

    docstring   first line = one-line help; the whole text = ``pcibackctl <cmd> --help``
    NAME        wire name ("policy-reload");  WORDS  CLI spelling (("policy", "reload"))
    ARGS        tuple of :class:`Arg` (positional on the command line, keys of ``args``)
    execute(face, args) -> JSON-able result | Pending     (runs in the daemon; face: a DaemonFace)
    render(result) -> str                                 (runs in pcibackctl)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, NamedTuple

from pcibackd.control.face import DaemonFace
from pcibackd.control.protocol import Errno
from pcibackd.daemon.states import WorkerState
from pcibackd.daemon.views import GuestInfo

WORKER_TIMEOUT = 2.0     # seconds a fan-out waits for workers (the client waits 5)
MAX_STR_ARG = 64


class CommandError(Exception):
    def __init__(self, errno: Errno, reason: str):
        super().__init__(reason)
        self.errno, self.reason = errno, reason


@dataclass(frozen=True)
class Arg:
    name: str
    type: type                       # int, str, or bool (a --NAME flag on the command line)
    help: str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    flags: tuple[str, ...] = ()      # an option ("-f", "--force"; a bool is a switch), not a positional

    def check(self, untrusted):
        """The validated value, or CommandError(BAD_ARGUMENTS)."""
        if self.type is bool:
            if not isinstance(untrusted, bool):
                raise CommandError(Errno.BAD_ARGUMENTS, f"{self.name} must be true or false")
            return untrusted
        if self.type is int:
            if not isinstance(untrusted, int) or isinstance(untrusted, bool):
                raise CommandError(Errno.BAD_ARGUMENTS, f"{self.name} must be an integer")
            return untrusted
        if not isinstance(untrusted, str) or len(untrusted) > MAX_STR_ARG:
            raise CommandError(Errno.BAD_ARGUMENTS, f"{self.name} must be a string of at most {MAX_STR_ARG} chars")
        if self.choices is not None and untrusted not in self.choices:
            raise CommandError(Errno.BAD_ARGUMENTS, f"{self.name} must be one of {', '.join(self.choices)}")
        return untrusted


@dataclass(frozen=True)
class Command:
    name: str
    words: tuple[str, ...]
    args: tuple[Arg, ...]
    execute: Callable
    render: Callable
    doc: str
    follow: Callable | None = None   # pcibackctl waits after success: follow(result, call, timeout) -> None | why

    @classmethod
    def from_module(cls, mod: ModuleType) -> "Command":
        return cls(mod.NAME, getattr(mod, "WORDS", (mod.NAME,)), mod.ARGS, mod.execute, mod.render,
                   (mod.__doc__ or "").strip(), getattr(mod, "follow", None))

    @property
    def short(self) -> str:
        return (self.doc.splitlines() or [""])[0]

    def check(self, untrusted_args: dict) -> dict:
        """Exactly the declared arguments, each of its type (an absent option takes its default)."""
        names = {a.name for a in self.args}
        unknown = [str(k)[:20] for k in untrusted_args if k not in names]
        if unknown:
            raise CommandError(Errno.BAD_ARGUMENTS, f"{self.name}: unknown argument(s) {', '.join(unknown)}")
        missing = [a.name for a in self.args if a.name not in untrusted_args and not a.flags]
        if missing:
            raise CommandError(Errno.BAD_ARGUMENTS, f"{self.name}: missing argument(s) {', '.join(sorted(missing))}")
        return {a.name: a.check(untrusted_args[a.name]) if a.name in untrusted_args else a.type()
                for a in self.args}


class Answer(NamedTuple):
    """One worker's answer to a fan-out."""

    ok: bool
    result: object          # the worker's result, or why it failed


@dataclass
class Pending:
    """A result that needs answers from workers: ``sends`` go out now; ``finish``
    turns the replies (by domid; absent = no answer in time) into the result."""

    sends: list[tuple[int, str, dict]]
    finish: Callable[[dict[int, Answer]], object]
    timeout: float = WORKER_TIMEOUT
    replies: dict[int, Answer] = field(default_factory=dict)
    deadline: float = 0.0
    client: tuple = ()

    def start(self, now: float | None = None) -> None:
        self.deadline = (time.monotonic() if now is None else now) + self.timeout

    def done(self, now: float) -> bool:
        return now >= self.deadline or all(d in self.replies for d, _, _ in self.sends)


def running_guests(face: DaemonFace) -> list[GuestInfo]:
    return [g for g in face.guests() if g.state is WorkerState.RUNNING and g.pid]


def fan_out(domids: list[int], cmd: str, args: dict, what: str,
            shape: Callable[[list[dict]], object]) -> Pending:
    """Send ``cmd`` to each worker; the result is ``shape([{domid, result}, ...])``.
    A worker that refuses or does not answer in time makes the whole command fail."""
    def finish(replies: dict[int, Answer]):
        missing = [d for d in domids if d not in replies]
        failed = {d: r.result for d, r in replies.items() if not r.ok}
        if failed:
            raise CommandError(Errno.COMMAND_FAILED, f"{what} failed: " +
                               "; ".join(f"domain {d}: {str(r)[:200]}" for d, r in sorted(failed.items())))
        if missing:
            raise CommandError(Errno.TIMEOUT, f"{what}: no answer within {WORKER_TIMEOUT} s from the worker(s) "
                               f"of domain(s) {', '.join(map(str, missing))}")
        return shape([{"domid": d, "result": replies[d].result} for d in sorted(replies)])
    return Pending([(d, cmd, dict(args)) for d in domids], finish)
