"""The supervisor's worker states: one table, one function that changes them."""

from __future__ import annotations

import itertools
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import pcibackd

from pcibackd.daemon import guests
from pcibackd.daemon.guests import TRANSITIONS, Guest, GuestEvent, IllegalTransition, describe_exit, exit_event
from pcibackd.daemon.states import RestartPolicy, WorkerState
from pcibackd.worker.link import WorkerReply, WorkerReport
from pcibackd.worker.main import EXIT_CRASHED, EXIT_DONE, EXIT_ORPHANED, EXIT_STOPPED, EXIT_STUCK

S, E = WorkerState, GuestEvent
DAEMON = Path(guests.__file__).parent


def guest_in(state: WorkerState) -> Guest:
    g = Guest(3, "/local/domain/0/backend/pci/3/0")
    g._state = state             # the test's shortcut; the daemon only ever calls change_state
    return g


@pytest.mark.parametrize("state,event,new", [(s, e, n) for (s, e), n in TRANSITIONS.items()],
                         ids=lambda v: getattr(v, "name", None))
def test_every_legal_transition(state, event, new):
    g = guest_in(state)
    assert g.change_state(event) is new and g.state is new


ILLEGAL = [(s, e) for s, e in itertools.product(WorkerState, GuestEvent) if (s, e) not in TRANSITIONS]


@pytest.mark.parametrize("state,event", ILLEGAL, ids=lambda v: v.name)
def test_every_other_pair_is_illegal(state, event):
    g = guest_in(state)
    with pytest.raises(IllegalTransition, match=f"from {state.value} on '{event.value}'") as exc:
        g.change_state(event)
    assert (exc.value.domid, exc.value.state, exc.value.event) == (3, state, event)
    assert g.state is state                        # unchanged


def test_some_pairs_really_are_illegal():
    assert (S.NEW, E.BEAT) in ILLEGAL and (S.FATAL, E.SPAWNED) in ILLEGAL and (S.EXITED, E.CRASHED) in ILLEGAL
    g = Guest(1, "p")
    assert g.state is S.NEW
    with pytest.raises(IllegalTransition):
        g.change_state(E.CRASHED)          # a record without a worker cannot crash


def test_state_is_read_only():
    g = Guest(1, "p")
    with pytest.raises(AttributeError):
        g.state = S.RUNNING


def test_only_guests_py_touches_the_state():
    for path in DAEMON.glob("*.py"):
        if path.name == "guests.py":
            continue
        text = path.read_text()
        assert not re.search(r"\._state\b|\.state\s*=[^=]", text), path


def test_docstring_lists_the_table():
    lines = [line.split() for line in guests.__doc__.splitlines() if line.startswith("    ") and "->" in line]
    listed = {(S(w[0]), GuestEvent(" ".join(w[1:w.index("->")]))): S(w[-1]) for w in lines}
    assert listed == TRANSITIONS


def test_every_state_is_reachable_from_new():
    seen, frontier = {S.NEW}, [S.NEW]
    while frontier:
        state = frontier.pop()
        for (s, _), n in TRANSITIONS.items():
            if s is state and n not in seen:
                seen.add(n)
                frontier.append(n)
    assert seen == set(WorkerState)


def test_a_lifetime():
    g = Guest(1, "p")
    for event, state in [(E.SPAWNED, S.STARTING), (E.BEAT, S.RUNNING), (E.BEAT, S.RUNNING),
                         (E.CRASHED, S.BACKOFF), (E.SPAWNED, S.STARTING), (E.GAVE_UP, S.FATAL),
                         (E.BEAT, S.FATAL),            # a beat that was on its way changes nothing
                         (E.REVIVED, S.BACKOFF), (E.SPAWNED, S.STARTING), (E.BEAT, S.RUNNING),
                         (E.STOP_REQUESTED, S.STOPPING), (E.STOP_REQUESTED, S.STOPPING),
                         (E.FINISHED, S.EXITED)]:
        assert g.change_state(event) is state


@pytest.mark.parametrize("code,stopping,event", [
    (EXIT_DONE, False, E.FINISHED),
    (EXIT_DONE, True, E.FINISHED),
    (EXIT_STOPPED, False, E.LEFT),
    (EXIT_ORPHANED, False, E.LEFT),
    (EXIT_STOPPED, True, E.FINISHED),
    (EXIT_CRASHED, False, E.CRASHED),
    (EXIT_CRASHED, True, E.FINISHED),
    (EXIT_STUCK, False, E.CRASHED),        # its own op watchdog
    (-signal.SIGSEGV, False, E.CRASHED),   # a fatal signal of its own
    (-signal.SIGABRT, False, E.CRASHED),
    (-signal.SIGKILL, False, E.KILLED),    # from outside (admin, OOM killer): never FATAL
    (-signal.SIGKILL, True, E.FINISHED),
    (None, False, E.KILLED),             # an adopted worker without a final beat
    (None, True, E.FINISHED),
])
def test_exit_event(code, stopping, event):
    assert exit_event(code, stopping) is event


def test_our_kill_after_silence_counts_as_the_workers_failure():
    assert exit_event(-signal.SIGKILL, False, killed_for_silence=True) is E.CRASHED


def test_outside_kills_back_off_but_never_give_up():
    p = RestartPolicy()
    assert p.kill_delay(1) == 0.0 and p.kill_delay(2) == p.kill_base_delay
    assert p.kill_delay(50) == p.kill_max_delay <= 1.0


def test_describe_exit():
    assert describe_exit(0) == "exit 0" and describe_exit(3) == "exit 3"
    assert describe_exit(-signal.SIGKILL) == "signal SIGKILL"
    assert describe_exit(-200) == "signal 200"
    assert describe_exit(None) == "exited (adopted; status unknown)"


def test_restart_policy_gives_up_at_max_failures():
    p = RestartPolicy(max_failures=3)
    assert [p.gives_up(n) for n in (1, 2, 3, 4)] == [False, False, True, True]


def test_messages_are_believed_only_from_the_guests_worker():
    g = Guest(2, "p")
    g.pid, g.token = 77, "secret"
    beat = WorkerReport(domid=2, pid=77, token="secret")
    assert g.sent(b"dom2", beat)
    assert g.sent(b"dom2", WorkerReply(domid=2, pid=77, token="secret", id="x", ok=True))
    assert g.sent(b"\0random-id", beat)      # routing ids prove nothing: the kernel's pid does (sent_by)
    assert not g.sent(b"dom2", WorkerReport(domid=2, pid=78, token="secret"))
    assert not g.sent(b"dom2", WorkerReport(domid=2, pid=77, token="guess"))
    g.token = ""
    assert not g.sent(b"dom2", WorkerReport(domid=2, pid=77, token=""))     # no token yet: nobody


def test_info_hides_the_pid_of_a_dead_worker():
    g = Guest(4, "p")
    g.pid, g.last_beat = 99, 10.0
    info = g.info(now=12.5)
    assert (info.pid, info.heartbeat_age, info.state, info.devices) == (None, None, S.NEW, ())
    g.sentinel = 5
    g.report = WorkerReport(domid=4, pid=99, token="t")
    info = g.info(now=12.5)
    assert (info.pid, info.heartbeat_age, info.report) == (99, 2.5, g.report)


def test_the_product_imports_and_answers_help_under_python_OO():
    """``python -OO`` strips docstrings: modules that extend theirs must still import."""
    root = Path(pcibackd.__file__).parent
    modules = sorted("pcibackd." + ".".join(p.relative_to(root).with_suffix("").parts)
                     for p in root.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    script = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)\n"
    for argv in (["-c", script, *modules], ["-m", "pcibackd.control.cli", "--help"],
                 ["-m", "pcibackd", "--help"]):
        run = subprocess.run([sys.executable, "-OO", *argv], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
