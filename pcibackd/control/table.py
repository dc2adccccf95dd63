"""Plain-text formatting for pcibackctl: aligned tables and human units."""

from __future__ import annotations

from pcibackd.wire.pciif import XenbusState


def table(headers: list[str], rows: list[list]) -> str:
    """Left-aligned columns two spaces apart; cells may hold several lines."""
    out_rows = []
    for r in [headers] + rows:
        cells = [str(c).split("\n") for c in r]
        for i in range(max(len(c) for c in cells)):
            out_rows.append([c[i] if i < len(c) else "" for c in cells])
    widths = [max(len(r[i]) for r in out_rows) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in out_rows)


def dash(v, fmt=str) -> str:
    return "-" if v is None else fmt(v)


def xenbus_name(n) -> str:
    try:
        return XenbusState(n).name
    except (ValueError, TypeError):
        return "-"


def size(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"


def duration(seconds: float) -> str:
    s = int(seconds)
    d, h, m = s // 86400, s // 3600 % 24, s // 60 % 60
    return (f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s" if m
            else f"{seconds:.1f}s")


def micros(us: float) -> str:
    return f"{us / 1000:.1f}ms" if us >= 1000 else f"{us:.0f}us"


def counts(d: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(d.items())) or "-"
