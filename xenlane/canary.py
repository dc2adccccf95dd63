"""Lane canary (stdlib only): notices dom0 memory being written behind a process's back.

    canary.py OUTFILE [MEGABYTES]     runs until SIGTERM

Fills MEGABYTES of anonymous memory with a known pattern (0xA5 except for an
8-digit page number at each page's start), and every few seconds checks it.
A changed page is reported in OUTFILE with the time, its number and a hex dump
of where it differs, then re-filled, so every later write is seen too.  The
content of a foreign write says who wrote it (a pcifront op, a packet,
zeroes).  A process that dies of such a write shows only a segfault; the
canary shows the write itself.
"""

from __future__ import annotations

import signal
import sys
import time

PAGE = 4096
FILL = 0xA5


def _page(i: int) -> bytes:
    return b"%08d" % i + bytes([FILL]) * (PAGE - 8)


def main(out: str, megabytes: int = 128) -> int:
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))   # first: filling is slow under TCG
    pages = megabytes * 256
    mem = bytearray(pages * PAGE)                              # filled in place: no second copy
    for i in range(pages):
        mem[i * PAGE:(i + 1) * PAGE] = _page(i)
    expected = pages * (PAGE - 8)
    with open(out, "a", buffering=1) as report:
        report.write(f"{time.time():.1f} canary up: {megabytes} MiB, {pages} pages\n")
        passes = 0
        last = False
        while not last:
            last = bool(stop)                                  # one more pass after SIGTERM
            if not last:
                time.sleep(3)
            passes += 1
            if mem.count(FILL) == expected and all(mem[i * PAGE:i * PAGE + 8] == b"%08d" % i for i in range(pages)):
                continue
            for i in range(pages):
                base = i * PAGE
                want = _page(i)
                got = bytes(mem[base:base + PAGE])
                if got == want:
                    continue
                first = next(k for k in range(PAGE) if got[k] != want[k])
                last = max(k for k in range(PAGE) if got[k] != want[k])
                start = first & ~15
                report.write(f"{time.time():.1f} CORRUPT page {i} bytes {first:#x}..{last:#x} "
                             f"({sum(1 for k in range(PAGE) if got[k] != want[k])} changed)\n")
                for off in range(start, min(PAGE, max(last + 1, start + 256)), 16):
                    report.write(f"  {off:03x}: {got[off:off + 16].hex(' ')}\n")
                mem[base:base + PAGE] = want
        report.write(f"{time.time():.1f} canary stopped after {passes} passes\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], *(int(a) for a in sys.argv[2:3])))
