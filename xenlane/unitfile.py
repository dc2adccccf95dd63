"""What systemd would run for a service unit (stdlib only): the lane starts
pcibackd through ``etc/pcibackd.service``'s own command lines.

Reads the ``[Service]`` section of a unit file (comments, continuation lines,
repeated keys, an empty assignment resetting a list) and turns it into
:class:`Service`: ExecStartPre/ExecStart/ExecReload command lines (with their
``-`` prefix: failure ignored), Environment=, EnvironmentFile=, the watchdog,
stop timeout, umask, file limit and NoNewPrivileges.  ``mapping`` replaces an
installed path (``/usr/local/sbin/pcibackd``) by the checkout's entry point.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

# The PATH systemd gives a system service.
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LIST_KEYS = ("ExecStartPre", "ExecStart", "ExecStartPost", "ExecReload", "Environment", "EnvironmentFile")
_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 1e-3, "min": 60.0, "m": 60.0, "h": 3600.0, "us": 1e-6}


class UnitError(ValueError):
    pass


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    ignore_failure: bool = False        # the "-" prefix

    def text(self) -> str:
        return ("-" if self.ignore_failure else "") + shlex.join(self.argv)


@dataclass
class Service:
    start_pre: list[Command] = field(default_factory=list)
    start: Command | None = None
    reload: list[Command] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    environment_files: list[tuple[str, bool]] = field(default_factory=list)   # (path, optional)
    settings: dict[str, str] = field(default_factory=dict)                  # the other keys, last wins

    def seconds(self, key: str, default: float) -> float:
        return parse_seconds(self.settings[key]) if key in self.settings else default

    def flag(self, key: str) -> bool:
        return self.settings.get(key, "no").lower() in ("yes", "true", "1", "on")


def parse_seconds(text: str) -> float:
    """``30s``, ``1min 30s``, ``500ms``, ``15`` -> seconds."""
    total, found = 0.0, False
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip()):
        if unit not in _UNITS:
            raise UnitError(f"time span {text!r}: unknown unit {unit!r}")
        total += float(num) * _UNITS[unit]
        found = True
    if not found:
        raise UnitError(f"time span {text!r}")
    return total


def section(text: str, name: str) -> list[tuple[str, str]]:
    """``(key, value)`` pairs of section ``[name]`` in order (continuations joined)."""
    pairs, current, pending = [], None, ""
    for raw in text.splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            continue
        if current == name:
            key, sep, value = line.partition("=")
            if not sep:
                raise UnitError(f"[{name}]: no '=' in {line[:60]!r}")
            pairs.append((key.strip(), value.strip()))
    return pairs


def _command(value: str, mapping: dict[str, str]) -> Command:
    ignore = False
    while value and value[0] in "-@:+!":
        ignore |= value[0] == "-"
        if value[0] == "@":
            raise UnitError(f"'@' prefix not supported: {value[:60]!r}")
        value = value[1:]
    argv = shlex.split(value)
    if not argv:
        raise UnitError("empty command line")
    argv[0] = mapping.get(argv[0], argv[0])
    return Command(tuple(argv), ignore)


def parse_service(text: str, mapping: dict[str, str] | None = None) -> Service:
    """The ``[Service]`` section of a unit file."""
    mapping = mapping or {}
    svc = Service()
    for key, value in section(text, "Service"):
        if key in LIST_KEYS and value == "":
            {"ExecStartPre": svc.start_pre, "ExecReload": svc.reload,
             "EnvironmentFile": svc.environment_files}.get(key, []).clear()
            if key == "Environment":
                svc.environment.clear()
            continue
        if key == "ExecStartPre":
            svc.start_pre.append(_command(value, mapping))
        elif key == "ExecStart":
            if svc.start is not None:
                raise UnitError("more than one ExecStart= (only Type=oneshot may have several)")
            svc.start = _command(value, mapping)
        elif key == "ExecReload":
            svc.reload.append(_command(value, mapping))
        elif key == "Environment":
            for word in shlex.split(value):
                k, sep, v = word.partition("=")
                if not sep or not k:
                    raise UnitError(f"Environment=: {word[:60]!r} is not KEY=VALUE")
                svc.environment[k] = v
        elif key == "EnvironmentFile":
            svc.environment_files.append((value[1:], True) if value.startswith("-") else (value, False))
        else:
            svc.settings[key] = value
    if svc.start is None:
        raise UnitError("no ExecStart=")
    return svc


def read_environment_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines (comments and blank lines skipped, one level of quotes removed)."""
    env = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        if sep:
            words = shlex.split(value) if value.strip() else [""]
            env[key.strip()] = " ".join(words)
    return env


def substitute(argv: tuple[str, ...], variables: dict[str, str]) -> list[str]:
    """``$NAME`` and ``${NAME}`` in each word (as systemd does for $MAINPID)."""
    def one(word: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), ""), word)
    return [one(w) for w in argv]
