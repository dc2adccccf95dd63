"""An xl domain config (xl.cfg(5)) parsed without I/O: enough to take ``pci=`` out and read it.

The syntax libxlu accepts: ``KEY = VALUE`` or ``KEY += VALUE`` statements ended
by a newline or ``;``; a VALUE is a string (``"..."`` or ``'...'`` with C escapes),
a number, or a list ``[V, V, ...]`` that may span lines and nest; ``#`` starts a
comment.  Errors name the line (:class:`CfgError`).  :meth:`XlConfig.without`
gives the text back unchanged except for the removed statements, so xl reports
its own errors at the same line numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pcibackd.xl.pcispec import PciSpec, SpecError, parse_spec

MAX_CONFIG = 1 << 20
_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"[0-9][0-9A-Za-z_.+-]*")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "a": "\a", "b": "\b",
            "f": "\f", "v": "\v", "0": "\0"}
# xl's config keys that set defaults for every pci= entry -> the spec key they set
PCI_DEFAULTS = {"pci_permissive": "permissive", "pci_seize": "seize", "pci_msitranslate": "msitranslate",
                "pci_power_mgmt": "power_mgmt", "pci_rdm_policy": "rdm_policy"}


class CfgError(ValueError):
    def __init__(self, line: int, message: str, source: str = "config"):
        super().__init__(f"{source}:{line}: {message}")
        self.line, self.message = line, message


@dataclass(frozen=True)
class Statement:
    key: str
    append: bool            # ``+=``
    value: object           # str, or list of values
    line: int               # where the key stands
    start: int              # character span of the whole statement (terminator included)
    end: int


@dataclass
class XlConfig:
    text: str
    source: str = "config"
    statements: list[Statement] = field(default_factory=list)

    def get(self, key: str, default=None):
        """The value after every ``=`` and ``+=`` of ``key``."""
        value, seen = default, False
        for s in self.statements:
            if s.key != key:
                continue
            if s.append and seen and isinstance(value, list) and isinstance(s.value, list):
                value = value + s.value
            elif s.append and seen and isinstance(value, str) and isinstance(s.value, str):
                value = value + s.value
            else:
                value = s.value
            seen = True
        return value

    def line_of(self, key: str) -> int | None:
        return next((s.line for s in self.statements if s.key == key), None)

    def without(self, *keys: str) -> str:
        """The text with every statement of ``keys`` replaced by as many empty lines."""
        out, pos = [], 0
        for s in sorted((s for s in self.statements if s.key in keys), key=lambda s: s.start):
            out.append(self.text[pos:s.start])
            out.append("\n" * self.text.count("\n", s.start, s.end))
            pos = s.end
        out.append(self.text[pos:])
        return "".join(out)

    def pci_specs(self) -> list[PciSpec]:
        """``pci=[...]`` parsed with the ``pci_*`` defaults; errors name the ``pci`` line."""
        untrusted = self.get("pci", [])
        line = self.line_of("pci") or 0
        if not isinstance(untrusted, list) or not all(isinstance(v, str) for v in untrusted):
            raise CfgError(line, "pci must be a list of strings", self.source)
        defaults = {}
        for key, spec_key in PCI_DEFAULTS.items():
            v = self.get(key)
            if v is not None:
                if not isinstance(v, str):
                    raise CfgError(self.line_of(key) or 0, f"{key} must be a single value", self.source)
                defaults[spec_key] = v
        specs = []
        for i, text in enumerate(untrusted):
            try:
                specs.append(parse_spec(text, defaults))
            except SpecError as exc:
                raise CfgError(line, f"pci entry {i + 1} {text[:40]!r}: {exc}", self.source) from None
            except KeyError as exc:
                raise CfgError(line, f"bad pci default {exc}", self.source) from None
        return specs


class _Reader:
    def __init__(self, text: str, source: str):
        self.text, self.source, self.pos, self.line = text, source, 0, 1

    def error(self, message: str, line: int | None = None) -> CfgError:
        return CfgError(line or self.line, message, self.source)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def advance(self, n: int = 1) -> str:
        chunk = self.text[self.pos:self.pos + n]
        self.line += chunk.count("\n")
        self.pos += n
        return chunk

    def skip(self, newlines: bool) -> None:
        """Blanks and comments (and newlines when ``newlines``)."""
        while True:
            c = self.peek()
            if c in (" ", "\t", "\r") or (newlines and c == "\n"):
                self.advance()
            elif c == "#":
                while self.peek() not in ("", "\n"):
                    self.advance()
            else:
                return

    def string(self) -> str:
        quote, start_line = self.advance(), self.line
        out = []
        while True:
            c = self.advance()
            if c == "":
                raise self.error(f"unterminated string (opened with {quote})", start_line)
            if c == "\n":
                raise self.error("newline inside a string", start_line)
            if c == quote:
                return "".join(out)
            if c == "\\":
                e = self.advance()
                if e == "x":
                    digits = self.advance(2)
                    try:
                        out.append(chr(int(digits, 16)))
                    except ValueError:
                        raise self.error(f"bad escape \\x{digits!r}") from None
                elif e in _ESCAPES:
                    out.append(_ESCAPES[e])
                else:
                    raise self.error(f"unknown escape \\{e}")
            else:
                out.append(c)

    def value(self, depth: int = 0):
        self.skip(newlines=depth > 0)
        c = self.peek()
        if c in ('"', "'"):
            return self.string()
        if c == "[":
            if depth > 8:
                raise self.error("lists nested too deep")
            return self.list(depth)
        m = _NUMBER.match(self.text, self.pos)
        if m:
            return self.advance(m.end() - self.pos)
        if c == "":
            raise self.error("value missing at the end of the file")
        raise self.error(f"expected a value (string, number or [list]), found {self._near()}")

    def list(self, depth: int) -> list:
        open_line = self.line
        self.advance()
        items = []
        while True:
            self.skip(newlines=True)
            if self.peek() == "]":
                self.advance()
                return items
            if self.peek() == "":
                raise self.error("list not closed: ']' missing", open_line)
            items.append(self.value(depth + 1))
            self.skip(newlines=True)
            c = self.peek()
            if c == ",":
                self.advance()
            elif c == "":
                raise self.error("list not closed: ']' missing", open_line)
            elif c != "]":
                raise self.error(f"expected ',' or ']' in the list, found {self._near()}")

    def _near(self) -> str:
        word = self.text[self.pos:self.pos + 12].split("\n")[0]
        return repr(word) if word else "end of line"


def parse_config(text: str, source: str = "config") -> XlConfig:
    """Parse an xl config; :class:`CfgError` names the first bad line."""
    if len(text) > MAX_CONFIG:
        raise CfgError(1, f"larger than {MAX_CONFIG} bytes", source)
    r = _Reader(text, source)
    cfg = XlConfig(text, source)
    while True:
        r.skip(newlines=True)
        if r.peek() == "":
            return cfg
        if r.peek() == ";":
            r.advance()
            continue
        start, line = r.pos, r.line
        m = _ID.match(text, r.pos)
        if not m:
            raise r.error(f"expected a setting name, found {r._near()}")
        key = r.advance(m.end() - r.pos)
        r.skip(newlines=False)
        if text.startswith("+=", r.pos):
            append = True
            r.advance(2)
        elif r.peek() == "=":
            append = False
            r.advance()
        else:
            raise r.error(f"expected '=' after {key}, found {r._near()}")
        value = r.value()
        r.skip(newlines=False)
        end_c = r.peek()
        if end_c in ("\n", ";"):
            r.advance()
        elif end_c != "":
            raise r.error(f"unexpected {r._near()} after the value of {key}")
        cfg.statements.append(Statement(key, append, value, line, start, r.pos))
