"""Render a config dump the way ``lspci -vvv`` shows it, using pciutils' dump reader.

``lspci -F FILE`` reads the text format that ``lspci -xxx``/``-xxxx`` prints:
a line with the function's address, then ``OFF: b0 b1 ... b15`` rows.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile

from pcibackd.wire.bdf import BDF


def hexdump(dump: bytes, bdf: BDF | str = "00:00.0") -> str:
    """``dump`` (256 or 4096 bytes) in ``lspci -xxx``/``-xxxx`` text form."""
    if len(dump) not in (64, 256, 4096):
        raise ValueError(f"config dump of {len(dump)} bytes")
    if isinstance(bdf, BDF):
        bdf = f"{bdf.bus:02x}:{bdf.dev:02x}.{bdf.fn:x}" if bdf.domain == 0 else str(bdf)
    width = 2 if len(dump) <= 256 else 3
    rows = [f"{off:0{width}x}: " + " ".join(f"{b:02x}" for b in dump[off:off + 16])
            for off in range(0, len(dump), 16)]
    return f"{bdf} (pcibackd guest view)\n" + "\n".join(rows) + "\n\n"


def lspci_vvv(dump: bytes, bdf: BDF | str = "00:00.0", numeric: bool = True,
              lspci: str = "lspci") -> str:
    """What ``lspci -vvv`` (with ``-nn`` if ``numeric``) prints for this config dump.

    Raises FileNotFoundError if pciutils is missing, RuntimeError if lspci fails.
    """
    exe = shutil.which(lspci)
    if exe is None:
        raise FileNotFoundError(f"{lspci} (pciutils) not found")
    with tempfile.NamedTemporaryFile("w", prefix="pcibackd-cfg-", suffix=".txt") as f:
        f.write(hexdump(dump, bdf))
        f.flush()
        args = [exe, "-F", f.name, "-vvv"] + (["-nn"] if numeric else [])
        proc = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"lspci failed ({proc.returncode}): {proc.stderr.strip()[:200]}")
    return proc.stdout
