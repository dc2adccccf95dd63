"""A Python pcifront with Linux xen-pcifront's semantics.

It drives the tests, the demo and the benchmarks as a simulated guest:
grants the shared page, allocates the event channel, publishes
``pci-op-ref``/``event-channel``/``magic``, follows the backend's xenbus
states, enumerates every devfn of each published root, and issues ops like
``do_pci_op``: fill the op, set ``_XEN_PCIF_active``, notify, wait for the bit
to clear; after 2 s it clears the bit itself and reports ``dev_not_found``.

MSI and MSI-X are asked for like ``pcifront_enable_msi(x)`` /
``pcifront_disable_msi(x)`` do, and judged as they judge the answer: MSI
succeeds with ``err == 0`` and ``value > 0`` (the PIRQ), anything else is
``-EINVAL``; MSI-X succeeds with ``err == 0``, ``value == 0`` and every vector
``> 0``, a non-zero ``value`` is the error; disabling only reports.

Like Linux it lets go of a device before the backend removes it (hot-unplug:
``state-N=5`` devices leave the guest before it answers Reconfiguring), and
drops everything when its own directory disappears (xenbus unregisters it).
"""

from __future__ import annotations

import errno
import select
import time
from dataclasses import dataclass

from pcibackd.wire.bdf import BDF
from pcibackd.wire import pciif
from pcibackd.wire.pciif import Err, Op, XenbusState as S

OP_TIMEOUT = 2.0            # Linux: ns_timeout = now + 2 s
ABSENT_VENDOR = {0xFFFFFFFF, 0x00000000, 0x0000FFFF, 0xFFFF0000}
_VENDOR_ID, _CLASS_REV, _HEADER_TYPE = 0x00, 0x08, 0x0E


def _parse_vdev(untrusted: str | None) -> BDF | None:
    """``vdev-N`` as the backend writes it, ``dddd:bb:dd.ff`` (read like Linux's ``%x:%x:%x.%x``)."""
    try:
        dom, bus, rest = (untrusted or "").split(":")
        dev, fn = rest.split(".")
        return BDF(int(dom, 16), int(bus, 16), int(dev, 16), int(fn, 16))
    except ValueError:
        return None


@dataclass(frozen=True)
class GuestDevice:
    """What the guest's PCI core learns when it probes a function."""

    bdf: BDF
    vendor: int
    device: int
    class_code: int

    def lspci_line(self) -> str:
        return f"{self.bdf} [{self.class_code >> 8:04x}] {self.vendor:04x}:{self.device:04x}"


@dataclass(frozen=True)
class IrqResult:
    """What pcifront's MSI calls return to the guest's PCI core, and the raw answer.

    ``result``: 0, or the negative errno (or XEN_PCI_ERR_*) Linux returns;
    ``pirqs``: the PIRQs the guest would bind (MSI: one; MSI-X: one per entry).
    """

    result: int
    pirqs: tuple[int, ...] = ()
    err: int = 0
    value: int = 0

    @property
    def ok(self) -> bool:
        return self.result == 0


def _readable(fd: int, timeout: float) -> bool:
    """Wait until ``fd`` polls readable (poll, not select: any fd number, so one
    process can play hundreds of guests)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(max(0, int(timeout * 1000) + 1)))


def _s32(v: int) -> int:
    return v - (1 << 32) if v & 0x80000000 else v


class FrontendError(RuntimeError):
    """The backend refused or did not answer the xenbus handshake."""


class PCIFront:
    """The frontend of one simulated guest (devid 0)."""

    def __init__(self, xs, platform, domid: int, *, spin: bool = False, op_timeout: float = OP_TIMEOUT):
        self.xs, self.platform, self.domid = xs, platform, domid
        self.spin = spin
        self.op_timeout = op_timeout
        self.fe = f"/local/domain/{domid}/device/pci/0"
        self.be: str | None = None
        self.page = None
        self.gref: int | None = None
        self.evtchn = None
        self.port: int | None = None
        self.devices: list[GuestDevice] = []
        self.timeouts = 0
        self._token = f"pcifront-{domid}"

    # ------------------------------------------------------------ xenbus --
    def state(self) -> int | None:
        v = self.xs.read(f"{self.fe}/state")
        return int(v) if v is not None and v.isdigit() else None

    def backend_state(self) -> int | None:
        v = self.xs.read(f"{self.be}/state") if self.be else None
        return int(v) if v is not None and v.isdigit() else None

    def _switch(self, state: int) -> None:
        self.xs.write(f"{self.fe}/state", str(int(state)))

    def connect(self, timeout: float = 10.0) -> list[GuestDevice]:
        """Probe (publish info, Initialised), wait for Connected, enumerate."""
        self.begin_connect()
        return self.finish_connect(timeout)

    def begin_connect(self) -> None:
        """The first half of :meth:`connect`: publish the page and channel, Initialised.
        A harness playing many guests begins them all, then finishes them (one
        guest's handshake does not wait behind another's)."""
        self.be = self.xs.read(f"{self.fe}/backend")
        if not self.be:
            raise FrontendError(f"{self.fe}/backend is missing")
        self.gref, self.page = self.platform.grant_page(0)
        self.page.set_bit(pciif.SH_FLAGS, pciif._XEN_PCIB_AERHANDLER)
        self.evtchn = self.platform.open_evtchn()
        self.port = self.evtchn.alloc_unbound(0)

        def publish(t):
            t.write(f"{self.fe}/pci-op-ref", str(self.gref))
            t.write(f"{self.fe}/event-channel", str(self.port))
            t.write(f"{self.fe}/magic", pciif.XEN_PCI_MAGIC)
        self.xs.run_transaction(publish)
        self._switch(S.Initialised)
        self.xs.watch(f"{self.be}/state", self._token)

    def finish_connect(self, timeout: float = 10.0) -> list[GuestDevice]:
        """The second half of :meth:`connect`: wait for Connected, enumerate."""
        be = self.backend_answer(timeout)
        self.devices = self.scan()
        return self.connected(be)

    def backend_answer(self, timeout: float = 10.0) -> int:
        """Wait for the backend's answer to the handshake: Connected (or Reconfiguring), else FrontendError."""
        self.wait_backend(timeout)
        be = self.backend_state()
        if be not in (S.Connected, S.Reconfiguring):
            err = self.xs.read(f"/local/domain/0/error/backend/pci/{self.domid}/0/error")
            raise FrontendError(f"backend state {be}: {err}")
        return be

    def connected(self, be: int) -> list[GuestDevice]:
        """After the enumeration: say Connected."""
        # A hot-plug that began before we saw Connected (Linux: "Handle skipped
        # connect"): answer Reconfiguring; Reconfigured brings the rescan.
        self._switch(S.Connected if be == S.Connected else S.Reconfiguring)
        return self.devices

    def wait_backend(self, timeout: float = 10.0) -> None:
        """Wait until the backend answered the handshake (Connected, or gave up)."""
        self._wait(lambda: self.backend_state() in (S.Connected, S.Reconfiguring, S.Closing, S.Closed), timeout)

    def _wait(self, cond, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            left = deadline - time.monotonic()
            if left <= 0:
                raise FrontendError(f"timed out after {timeout} s (backend state {self.backend_state()})")
            _readable(self.xs.fileno(), left)
            self.xs.events()

    def roots(self) -> list[tuple[int, int]]:
        """``root_num``/``root-K`` (missing root_num: scan 0000:00, like Linux)."""
        num = self.xs.read(f"{self.be}/root_num")
        if num is None:
            return [(0, 0)]
        out = []
        for k in range(int(num)):
            dom, _, bus = (self.xs.read(f"{self.be}/root-{k}") or "").partition(":")
            out.append((int(dom, 16), int(bus, 16)))
        return out

    def follow(self, timeout: float = 0.0) -> list[str]:
        """Handle pending backend state changes (hot-plug, teardown); returns what changed."""
        if timeout:
            _readable(self.xs.fileno(), timeout)
        self.xs.events()
        changes: list[str] = []
        be, fe = self.backend_state(), self.state()
        if be == S.Reconfiguring and fe == S.Connected:
            changes = self._detach_leaving()
            self._switch(S.Reconfiguring)
        elif be == S.Reconfigured and fe == S.Reconfiguring:
            changes = self._rescan()
            self._switch(S.Connected)
        elif be in (S.Closing, S.Closed, S.Unknown, None) and fe not in (S.Closed, None):
            # A vanished backend directory reads as Unknown: close like Closed.
            self.disconnect()
            changes, self.devices = [f"- {d.lspci_line()}" for d in self.devices], []
        elif fe is None and self.page is not None:
            # Our directory is gone (the toolstack removed the device): like
            # xenbus unregistering pcifront, let go without writing any state.
            self._release()
            changes, self.devices = [f"- {d.lspci_line()}" for d in self.devices], []
        return changes

    def _published(self) -> dict[BDF, int | None]:
        """Guest address -> ``state-N`` of every device the backend published (``vdev-N``)."""
        untrusted_num = self.xs.read(f"{self.be}/num_devs") if self.be else None
        num = min(int(untrusted_num), 256) if untrusted_num and untrusted_num.isdigit() else 0
        out: dict[BDF, int | None] = {}
        for i in range(num):
            vdev = _parse_vdev(self.xs.read(f"{self.be}/vdev-{i}"))
            untrusted_state = self.xs.read(f"{self.be}/state-{i}")
            if vdev is not None:
                out[vdev] = int(untrusted_state) if untrusted_state and untrusted_state.isdigit() else None
        return out

    def _detach_leaving(self) -> list[str]:
        """Remove the devices the toolstack marked ``state-N=5`` (pcifront_detach_devices):
        the guest stops using them before the backend takes them away."""
        leaving = {b for b, st in self._published().items() if st == S.Closing}
        gone = [d for d in self.devices if d.bdf in leaving]
        self.devices = [d for d in self.devices if d.bdf not in leaving]
        return [f"- {d.lspci_line()}" for d in gone]

    def leaving(self, bdf: BDF) -> bool:
        """Whether ``bdf`` is on its way out (backend closing or gone, or the
        device no longer published as live): then ``dev_not_found`` is the
        answer Linux pciback gives, not a failure."""
        if self.backend_state() not in (S.Connected, S.Reconfiguring, S.Reconfigured):
            return True
        return self._published().get(bdf) != S.Initialised

    def _rescan(self) -> list[str]:
        old = {d.bdf: d for d in self.devices}
        self.devices = self.scan()
        new = {d.bdf: d for d in self.devices}
        return ([f"- {old[b].lspci_line()}" for b in sorted(old.keys() - new.keys())]
                + [f"+ {new[b].lspci_line()}" for b in sorted(new.keys() - old.keys())])

    def disconnect(self) -> None:
        """Closing then Closed, and give the page and channel back."""
        self._switch(S.Closing)
        self._release()
        self._switch(S.Closed)

    def _release(self) -> None:
        if self.evtchn is not None:
            self.evtchn.close()
            self.evtchn = None
        if self.page is not None:
            self.platform.end_grant(self.gref)
            self.page.close()
            self.page = None

    def close(self) -> None:
        self._release()
        try:
            self.xs.unwatch(f"{self.be}/state", self._token)
        except OSError:
            pass

    # ---------------------------------------------------------------- ops --
    def op(self, cmd: int, domain: int = 0, bus: int = 0, devfn: int = 0, offset: int = 0,
           size: int = 4, value: int = 0, info: int = 0) -> tuple[int, int]:
        """One request/response round trip; returns (err, value)."""
        buf = self.page.buf
        pciif.OP_HEADER.pack_into(buf, pciif.SH_OP, cmd, 0, domain, bus, devfn, offset, size,
                                  value & 0xFFFFFFFF, info)
        self.page.set_bit(pciif.SH_FLAGS, pciif._XEN_PCIF_active)
        self.evtchn.notify(self.port)
        if not self._wait_answer():
            self.timeouts += 1
            self.page.clear_bit(pciif.SH_FLAGS, pciif._XEN_PCIF_active)
            return Err.dev_not_found, 0
        return pciif.I32.unpack_from(buf, pciif.SH_OP_ERR)[0], pciif.U32.unpack_from(buf, pciif.SH_OP_VALUE)[0]

    def msix_op(self, cmd: int, bdf: BDF, nvec: int, entries: tuple[int, ...] = ()) -> tuple[int, int, tuple[int, ...]]:
        """One MSI-X-shaped op with no frontend checks: ``value = nvec`` (any u32), the
        ``entries`` written (at most 128); returns (err, value, vectors[0:min(nvec, 128)])."""
        buf = self.page.buf
        for i, entry in enumerate(entries[:pciif.SH_INFO_MAX_VEC]):
            pciif.MSIX_ENTRY.pack_into(buf, pciif.SH_MSIX_ENTRIES + 4 * i, 0, entry)
        err, value = self.op(cmd, bdf.domain, bdf.bus, bdf.devfn, value=nvec)
        n = min(nvec, pciif.SH_INFO_MAX_VEC) if err == 0 else 0
        return err, value, tuple(pciif.U16.unpack_from(buf, pciif.msix_vector_offset(i))[0] for i in range(n))

    def enable_msi(self, bdf: BDF) -> IrqResult:
        """``pcifront_enable_msi``: the PIRQ, or -EINVAL for any failure."""
        err, value = self.op(Op.enable_msi, bdf.domain, bdf.bus, bdf.devfn)
        if err != 0:
            return IrqResult(-errno.EINVAL, err=err, value=value)
        if _s32(value) <= 0:
            return IrqResult(-errno.EINVAL, err=err, value=value)
        return IrqResult(0, (value,), err, value)

    def disable_msi(self, bdf: BDF) -> IrqResult:
        """``pcifront_disable_msi``: Linux only logs a failure."""
        err, value = self.op(Op.disable_msi, bdf.domain, bdf.bus, bdf.devfn)
        return IrqResult(err, (), err, value)

    def enable_msix(self, bdf: BDF, entries: tuple[int, ...] | list[int]) -> IrqResult:
        """``pcifront_enable_msix`` for these table entries."""
        entries = tuple(entries)
        if len(entries) > pciif.SH_INFO_MAX_VEC:
            return IrqResult(-errno.EINVAL)          # refused before asking the backend
        err, value, vectors = self.msix_op(Op.enable_msix, bdf, len(entries), entries)
        if err != 0:
            return IrqResult(err, (), err, value)
        if value != 0:
            return IrqResult(_s32(value), (), err, value)
        if any(v <= 0 for v in vectors):
            return IrqResult(-errno.EINVAL, (), err, value)
        return IrqResult(0, vectors, err, value)

    def disable_msix(self, bdf: BDF) -> IrqResult:
        """``pcifront_disable_msix``: Linux only logs a failure."""
        err, value = self.op(Op.disable_msix, bdf.domain, bdf.bus, bdf.devfn)
        return IrqResult(err, (), err, value)

    def _wait_answer(self) -> bool:
        page, flags, bit = self.page, pciif.SH_FLAGS, pciif._XEN_PCIF_active
        buf = page.buf
        if self.spin:
            deadline = time.monotonic() + self.op_timeout
            while buf[0] & 1:
                if time.monotonic() > deadline:
                    return False
            return True
        evtchn, fd = self.evtchn, self.evtchn.fileno()
        deadline = time.monotonic() + self.op_timeout
        while page.test_bit(flags, bit):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if _readable(fd, left):
                port = evtchn.pending()
                if port is not None:
                    evtchn.unmask(port)
        return True

    def conf_read(self, bdf: BDF, offset: int, size: int) -> tuple[int, int]:
        return self.op(Op.conf_read, bdf.domain, bdf.bus, bdf.devfn, offset, size)

    def conf_write(self, bdf: BDF, offset: int, size: int, value: int) -> int:
        return self.op(Op.conf_write, bdf.domain, bdf.bus, bdf.devfn, offset, size, value)[0]

    def config_dump(self, bdf: BDF) -> bytes:
        """The guest's whole view of a function's config space (256 or 4096 bytes)."""
        out = bytearray()
        for off in range(0, 4096, 4):
            err, value = self.conf_read(bdf, off, 4)
            if err:
                if off == 0x100:
                    break                    # conventional (256-byte) config space
                raise FrontendError(f"{bdf}: conf_read at {off:#x} failed with {err}")
            out += value.to_bytes(4, "little")
        return bytes(out)

    def scan(self) -> list[GuestDevice]:
        """Probe every devfn 0..255 of each root, like pcifront_scan_bus."""
        steps, answer = self.scan_steps(), None
        try:
            while True:
                bdf, offset = steps.send(answer)
                answer = self.conf_read(bdf, offset, 4)
        except StopIteration as done:
            return done.value

    def scan_steps(self):
        """:meth:`scan` as a generator: yields ``(bdf, offset)`` of each 4-byte config read,
        takes its ``(err, value)``, returns the devices (a harness interleaves many guests')."""
        found = []
        for domain, bus in self.roots():
            for devfn in range(256):
                bdf = BDF.from_devfn(domain, bus, devfn)
                err, ids = yield bdf, _VENDOR_ID
                if err or ids in ABSENT_VENDOR:
                    continue
                err, cls = yield bdf, _CLASS_REV
                found.append(GuestDevice(bdf, ids & 0xFFFF, ids >> 16, (cls >> 8) if not err else 0))
        return found

    def post(self, cmd: int, domain: int = 0, bus: int = 0, devfn: int = 0, offset: int = 0, size: int = 4,
             value: int = 0) -> None:
        """The first half of :meth:`op`: fill the op, set the active bit, notify."""
        pciif.OP_HEADER.pack_into(self.page.buf, pciif.SH_OP, cmd, 0, domain, bus, devfn, offset, size,
                                  value & 0xFFFFFFFF, 0)
        self.page.set_bit(pciif.SH_FLAGS, pciif._XEN_PCIF_active)
        self.evtchn.notify(self.port)

    def answered(self) -> tuple[int, int] | None:
        """The second half of :meth:`op` without waiting: (err, value) once answered, else None
        (drains this guest's channel: poll its :attr:`evtchn` fd to wait)."""
        port = self.evtchn.pending()
        if port is not None:
            self.evtchn.unmask(port)
        if self.page.test_bit(pciif.SH_FLAGS, pciif._XEN_PCIF_active):
            return None
        buf = self.page.buf
        return pciif.I32.unpack_from(buf, pciif.SH_OP_ERR)[0], pciif.U32.unpack_from(buf, pciif.SH_OP_VALUE)[0]
