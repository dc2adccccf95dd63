#!/usr/bin/env python3
"""Regenerate the QEMU device zoo: real config-space dumps of many emulated PCI functions.

Boots plain QEMU (TCG, no Xen) on a few machines that together carry the device
models listed in MACHINES, with a Debian kernel and a busybox initramfs whose
init enables every SR-IOV function's VFs and prints, for each PCI function,
sysfs ``config`` (4096 bytes where readable), ``resource``, ``irq``, the
identity files and the ``physfn`` link, base64 on the serial console.  Each
function becomes ``<name>/`` here in the format of ``simdom0.dumps`` (its
``lspci-vvv.txt`` is decoded from the dump by ``lspci -F``, not taken live).

Usage: .venv/bin/python sim/simdom0/dumps/zoo/collect.py [--kernel VMLINUZ] [--only MACHINE...]
The kernel is --kernel, $ZOO_KERNEL, or the vmlinuz of a Debian linux-image .deb
found in apt's cache (``apt-get download linux-image-cloud-amd64``'s dependency
puts one there; the zoo was made with 6.1.0-53-cloud and QEMU 7.2).  Needs
qemu-system-x86_64, a static busybox, cpio, dpkg-deb and lspci; takes about a
minute.  A function that the machine does not show is reported and skipped.
"""

from __future__ import annotations

import argparse
import base64
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from simdom0.lspci import lspci_vvv

HERE = Path(__file__).resolve().parent

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for d in /sys/bus/pci/devices/*; do
  t=$(cat $d/sriov_totalvfs 2>/dev/null)
  [ -n "$t" ] && [ "$t" -gt 0 ] && echo $t > $d/sriov_numvfs
done
sleep 2
for d in /sys/bus/pci/devices/*; do
  echo "ZOO-BEGIN ${d##*/}"
  for f in vendor device class subsystem_vendor subsystem_device revision irq resource; do
    echo "ZOO-FILE $f"; base64 $d/$f
  done
  echo "ZOO-FILE config"; dd if=$d/config bs=4096 count=1 2>/dev/null | base64
  [ -e $d/physfn ] && { echo "ZOO-FILE physfn"; readlink $d/physfn | base64; }
  echo "ZOO-END"
done
echo "ZOO-DONE"
poweroff -f
"""

# machine -> (QEMU machine options, [(dump name, bus:slot.fn it lands on, -device value or None)])
# Built-in functions of the machine carry None.  Names are unique across machines.
Q35, PC = ["-M", "q35"], ["-M", "pc"]
MACHINES: dict[str, tuple[list[str], list[tuple[str, str, str | None]]]] = {
    "nics-storage": (Q35, [
        ("ich9-lpc", "00:1f.0", None), ("ich9-smbus", "00:1f.3", None),
        ("VGA", "00:02.0", "VGA,addr=02.0"),
        ("e1000", "00:03.0", "e1000,addr=03.0"),
        ("e1000-82544gc", "00:04.0", "e1000-82544gc,addr=04.0"),
        ("e1000-82545em", "00:05.0", "e1000-82545em,addr=05.0"),
        ("ne2k_pci", "00:06.0", "ne2k_pci,addr=06.0"),
        ("pcnet", "00:07.0", "pcnet,addr=07.0"),
        ("vmxnet3", "00:08.0", "vmxnet3,addr=08.0"),
        ("i82559er", "00:09.0", "i82559er,addr=09.0"),
        ("i82557b", "00:0a.0", "i82557b,addr=0a.0"),
        ("i82801", "00:0b.0", "i82801,addr=0b.0"),
        ("tulip", "00:0c.0", "tulip,addr=0c.0"),
        ("rocker", "00:0d.0", "rocker,addr=0d.0"),
        ("virtio-net-legacy", "00:0e.0", "virtio-net-pci,disable-modern=on,addr=0e.0"),
        ("virtio-net-nt", "00:0f.0", "virtio-net-pci-non-transitional,addr=0f.0"),
        ("megasas", "00:10.0", "megasas,addr=10.0"),
        ("lsi53c895a", "00:11.0", "lsi53c895a,addr=11.0"),
        ("lsi53c810", "00:12.0", "lsi53c810,addr=12.0"),
        ("mptsas1068", "00:13.0", "mptsas1068,addr=13.0"),
        ("am53c974", "00:14.0", "am53c974,addr=14.0"),
        ("dc390", "00:15.0", "dc390,addr=15.0"),
        ("sdhci-pci", "00:16.0", "sdhci-pci,addr=16.0"),
        ("pvscsi", "00:17.0", "pvscsi,addr=17.0"),
        ("virtio-blk", "00:18.0", "virtio-blk-pci,drive=d0,addr=18.0"),
        ("virtio-scsi", "00:19.0", "virtio-scsi-pci,addr=19.0"),
        ("nec-usb-xhci", "00:1a.0", "nec-usb-xhci,addr=1a.0"),
        ("ich9-usb-ehci1", "00:1b.0", "ich9-usb-ehci1,addr=1b.0"),
        ("ich9-usb-uhci1", "00:1c.0", "ich9-usb-uhci1,addr=1c.0"),
        ("i82801b11-bridge", "00:1d.0", "i82801b11-bridge,addr=1d.0"),
        ("piix4-ide", "00:1e.0", "piix4-ide,addr=1e.0"),
    ]),
    "audio-usb-misc": (Q35, [
        ("cirrus-vga", "00:02.0", "cirrus-vga,addr=02.0"),
        ("bochs-display", "00:03.0", "bochs-display,addr=03.0"),
        ("secondary-vga", "00:04.0", "secondary-vga,addr=04.0"),
        ("AC97", "00:05.0", "AC97,audiodev=snd0,addr=05.0"),
        ("ES1370", "00:06.0", "ES1370,audiodev=snd0,addr=06.0"),
        ("ich9-intel-hda", "00:07.0", "ich9-intel-hda,addr=07.0"),
        ("pci-ohci", "00:08.0", "pci-ohci,addr=08.0"),
        ("piix3-usb-uhci", "00:09.0", "piix3-usb-uhci,addr=09.0"),
        ("piix4-usb-uhci", "00:0a.0", "piix4-usb-uhci,addr=0a.0"),
        ("usb-ehci", "00:0b.0", "usb-ehci,addr=0b.0"),
        ("ivshmem-plain", "00:0c.0", "ivshmem-plain,memdev=shm0,addr=0c.0"),
        ("i6300esb", "00:0d.0", "i6300esb,addr=0d.0"),
        ("pvpanic-pci", "00:0e.0", "pvpanic-pci,addr=0e.0"),
        ("tpci200", "00:0f.0", "tpci200,addr=0f.0"),
        ("pci-serial", "00:10.0", "pci-serial,addr=10.0"),
        ("pci-serial-2x", "00:11.0", "pci-serial-2x,addr=11.0"),
        ("pci-serial-4x", "00:12.0", "pci-serial-4x,addr=12.0"),
        ("pci-ipmi-kcs", "00:13.0", "pci-ipmi-kcs,bmc=bmc0,addr=13.0"),
        ("kvaser_pci", "00:14.0", "kvaser_pci,canbus=cb0,addr=14.0"),
        ("ctucan_pci", "00:15.0", "ctucan_pci,canbus0=cb1,canbus1=cb2,addr=15.0"),
        ("pcm3680_pci", "00:16.0", "pcm3680_pci,canbus0=cb3,canbus1=cb4,addr=16.0"),
        ("virtio-rng", "00:17.0", "virtio-rng-pci,addr=17.0"),
        ("virtio-balloon", "00:18.0", "virtio-balloon-pci,addr=18.0"),
        ("virtio-serial", "00:19.0", "virtio-serial-pci,addr=19.0"),
        ("virtio-keyboard", "00:1a.0", "virtio-keyboard-pci,addr=1a.0"),
        ("ich9-usb-uhci3", "00:1b.0", "ich9-usb-uhci3,addr=1b.0"),
        ("ich9-usb-ehci2", "00:1c.0", "ich9-usb-ehci2,addr=1c.0"),
    ]),
    "bridges-sriov": (Q35, [
        ("ati-vga", "00:02.0", "ati-vga,addr=02.0"),
        ("ioh3420", "00:03.0", "ioh3420,id=rp1,chassis=1,slot=1,addr=03.0"),
        ("x3130-upstream", "01:00.0", "x3130-upstream,id=up1,bus=rp1"),
        ("xio3130-downstream", "02:00.0", "xio3130-downstream,id=dn1,bus=up1,chassis=2,slot=0"),
        ("nvme-sriov-sw", "03:00.0",
         "nvme,serial=zoo1,subsys=nsub0,bus=dn1,sriov_max_vfs=2,sriov_vq_flexible=4,sriov_vi_flexible=2,"
         "max_ioqpairs=6,msix_qsize=8"),
        ("nvme-sriov-sw-vf1", "03:00.1", None), ("nvme-sriov-sw-vf2", "03:00.2", None),
        ("pcie-root-port-2", "00:04.0", "pcie-root-port,id=rp2,chassis=3,slot=2,addr=04.0"),
        ("pcie-pci-bridge", "04:00.0", "pcie-pci-bridge,id=pb1,bus=rp2"),
        ("i82559c-behind-bridge", "05:01.0", "i82559c,bus=pb1,addr=01.0"),
        ("virtio-gpu", "00:05.0", "virtio-gpu-pci,addr=05.0"),
        ("virtio-blk-nt", "00:06.0", "virtio-blk-pci-non-transitional,drive=d0,addr=06.0"),
        ("virtio-tablet", "00:07.0", "virtio-tablet-pci,addr=07.0"),
        ("virtio-crypto", "00:08.0", "virtio-crypto-pci,cryptodev=cr0,addr=08.0"),
        ("pci-ipmi-bt", "00:09.0", "pci-ipmi-bt,bmc=bmc0,addr=09.0"),
        ("mioe3680_pci", "00:0a.0", "mioe3680_pci,canbus0=cb1,canbus1=cb2,addr=0a.0"),
        ("i82550", "00:0b.0", "i82550,addr=0b.0"),
        ("i82562", "00:0c.0", "i82562,addr=0c.0"),
    ]),
    "pc-legacy": (PC, [
        ("i440fx-host", "00:00.0", None), ("piix3-isa", "00:01.0", None),
        ("piix3-ide", "00:01.1", None), ("piix4-pm", "00:01.3", None),
        ("qxl-vga", "00:02.0", "qxl-vga,addr=02.0"),
        ("qxl", "00:03.0", "qxl,addr=03.0"),
        ("virtio-net-pci-conventional", "00:04.0", "virtio-net-pci,addr=04.0"),
        ("i82558b", "00:05.0", "i82558b,addr=05.0"),
        ("pci-bridge-seat", "00:06.0", "pci-bridge-seat,chassis_nr=1,addr=06.0"),
        ("intel-hda-pc", "00:07.0", "intel-hda,addr=07.0"),
        ("pxb", "00:08.0", "pxb,bus_nr=16,addr=08.0"),
    ]),
    "vga-virtio": (PC, [
        ("virtio-vga", "00:02.0", "virtio-vga,addr=02.0"),
        ("vmware-svga", "00:03.0", "vmware-svga,addr=03.0"),
        ("virtio-scsi-transitional", "00:04.0", "virtio-scsi-pci-transitional,addr=04.0"),
        ("virtio-rng-nt", "00:05.0", "virtio-rng-pci-non-transitional,addr=05.0"),
    ]),
}
COMMON = ["-m", "512", "-nodefaults", "-display", "none", "-vga", "none", "-no-reboot",
          "-audiodev", "none,id=snd0", "-object", "memory-backend-ram,id=shm0,size=1M",
          "-object", "cryptodev-backend-builtin,id=cr0", *[a for i in range(5) for a in ("-object", f"can-bus,id=cb{i}")], "-device", "ipmi-bmc-sim,id=bmc0", "-device", "nvme-subsys,id=nsub0",
          "-drive", "if=none,id=d0,driver=null-co"]
ID_FILES = ("vendor", "device", "class", "subsystem_vendor", "subsystem_device", "revision")


def find_kernel(explicit: str | None, work: Path) -> Path:
    """A vmlinuz: given, or unpacked from a Debian linux-image .deb in apt's cache."""
    if explicit:
        return Path(explicit)
    debs = sorted(glob.glob("/var/cache/apt/archives/linux-image-[0-9]*-amd64_*.deb"))
    if not debs:
        sys.exit("no kernel: pass --kernel or `apt-get download` a linux-image-*-amd64 package")
    subprocess.run(["dpkg-deb", "-x", debs[-1], str(work / "k")], check=True)
    return Path(sorted(glob.glob(str(work / "k/boot/vmlinuz-*")))[-1])


def build_initramfs(work: Path) -> Path:
    root = work / "root"
    for sub in ("bin", "proc", "sys", "dev"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(shutil.which("busybox"), root / "bin/busybox")
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    out = work / "initramfs.cpio"
    files = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True,
                           check=True).stdout
    with out.open("wb") as fh:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files.encode(),
                       stdout=fh, check=True)
    return out


def run_machine(name: str, kernel: Path, initrd: Path, work: Path) -> str:
    opts, devices = MACHINES[name]
    log = work / f"{name}.serial"
    cmd = ["qemu-system-x86_64", *opts, *COMMON, "-kernel", str(kernel), "-initrd", str(initrd),
           "-append", "console=ttyS0 loglevel=0 quiet panic=-1", "-serial", f"file:{log}"]
    for _, _, dev in devices:
        if dev:
            cmd += ["-device", dev]
    subprocess.run(cmd, check=True, timeout=900, stdin=subprocess.DEVNULL)
    text = log.read_text(errors="replace")
    if "ZOO-DONE" not in text:
        raise RuntimeError(f"{name}: the initramfs did not finish (see {log})")
    return text


def parse(text: str) -> dict[str, dict[str, bytes]]:
    """Serial log -> {"0000:bb:dd.f": {file: bytes}}."""
    out: dict[str, dict[str, bytes]] = {}
    cur = field = None
    chunks: dict[str, list[str]] = {}
    for line in text.replace("\r", "").splitlines():
        if m := re.match(r"ZOO-BEGIN (\S+)", line):
            cur, field, chunks = m.group(1), None, {}
        elif m := re.match(r"ZOO-FILE (\S+)", line):
            field = m.group(1)
            chunks[field] = []
        elif line.startswith("ZOO-END") and cur:
            out[cur] = {k: base64.b64decode("".join(v)) for k, v in chunks.items()}
            cur = field = None
        elif cur and field and re.fullmatch(r"[A-Za-z0-9+/=]+", line.strip()):
            chunks[field].append(line.strip())
    return out


def write_dump(name: str, bdf: str, files: dict[str, bytes]) -> None:


    dst = HERE / name
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir()
    config = files["config"]
    (dst / "config.bin").write_bytes(config)
    (dst / "resource").write_bytes(files["resource"])
    (dst / "irq").write_bytes(files["irq"])
    ids = " ".join(f"{k}={files[k].decode().strip()}" for k in ID_FILES)
    (dst / "ids").write_text(ids + "\n")
    if "physfn" in files:
        (dst / "physfn").write_text(os.path.basename(files["physfn"].decode().strip()) + "\n")
    short = bdf.split(":", 1)[1]
    (dst / "lspci-vvv.txt").write_text(lspci_vvv(config, short))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default=os.environ.get("ZOO_KERNEL"))
    ap.add_argument("--only", nargs="*", default=list(MACHINES), choices=list(MACHINES))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="zoo-") as tmp:
        work = Path(tmp)
        kernel = find_kernel(args.kernel, work)
        initrd = build_initramfs(work)
        for machine in args.only:
            found = parse(run_machine(machine, kernel, initrd, work))
            for name, addr, _ in MACHINES[machine][1]:
                bdf = f"0000:{addr}"
                if bdf not in found:
                    print(f"{machine}: {name} not found at {bdf}; seen {sorted(found)}")
                    continue
                write_dump(name, bdf, found[bdf])
                print(f"{machine}: {name} <- {bdf} ({len(found[bdf]['config'])} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
