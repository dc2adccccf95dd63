#!/bin/bash
# xenlane/run.sh [--quick] [--devices "edu pci-testdev e1000e rtl8139 nvme"] [--modes "kernel pcibackd"]
#
# The Xen lane: boots Debian's Xen 4.17 inside QEMU (TCG) with a PV dom0 and PV
# domUs on Debian's 6.1 kernel, passes QEMU-emulated PCI devices to a domU once
# through the kernel's xen-pciback and once through pcibackd, and prints per
# device the domU's view through pcibackd and the differences with a reason each.
#
#   outer QEMU (q35, intel-iommu, edu + pci-testdev + e1000e + nvme + rtl8139, 9p: host / read-only, out dir)
#     Xen 4.17 -> dom0 (busybox initramfs, then chroot into the host's / over 9p:
#                       xl, xenstored, python + the project's venv, xenlane/dom0-main.sh)
#              -> domU per device and mode (busybox initramfs, xenlane/domu-init.sh)
#
# Needs root.  Installs its Debian packages with apt-get, keeps downloaded .debs
# and built images in $XENLANE_CACHE (default xenlane/.cache).  Exits 0 only when
# every check passed and every difference has a reason.
# Env: XENLANE_CACHE, XENLANE_PYTHON (python for dom0, default .venv/bin/python),
#      XENLANE_TIMEOUT (seconds for QEMU), XENLANE_DAEMON_CMD, XENLANE_ATTACH_CMD
#      (attach template with {domid} {bdf}), XENLANE_SKIP_APT=1, XENLANE_CPU (QEMU -cpu),
#      XENLANE_LIFECYCLE (two devices, default "pci-testdev edu"), XENLANE_SYSTEMD
#      (devices served by the unit under a real systemd, default "nvme"; "" skips it).
set -euo pipefail
LANE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$LANE")
CACHE=${XENLANE_CACHE:-$LANE/.cache}
DEVICES="edu pci-testdev e1000e rtl8139 nvme"
MODES="kernel pcibackd"
while [ $# -gt 0 ]; do
  case $1 in
    --quick) DEVICES="edu" ;;
    --devices) DEVICES=$2; shift ;;
    --modes) MODES=$2; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
T_START=$(date +%s)
log() { echo "[xenlane $(date +%T) +$(( $(date +%s) - T_START ))s] $*"; }
die() { log "ERROR: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (QEMU 9p export of /, apt-get, dpkg -x)"
case "$REPO$CACHE" in *[[:space:],]*) die "paths with spaces or commas are not supported: $REPO $CACHE" ;; esac
for d in $DEVICES; do case $d in edu|pci-testdev|e1000e|rtl8139|nvme) ;; *) die "unknown device $d" ;; esac; done

# ------------------------------------------------------------ 1. host packages
# dom0 runs the host's own xl/xenstored/python (chroot over 9p), so they live on the host
HOSTPKGS="qemu-system-x86 busybox-static xen-utils-4.17 xenstore-utils pciutils cpio kmod libatomic1 gzip"
if [ -z "${XENLANE_SKIP_APT:-}" ]; then
  missing=""; for p in $HOSTPKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    log "apt-get install$missing"
    apt-get update -qq
    # keep the Xen init scripts from starting daemons on this (non-Xen) host
    ours=""; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; ours=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    [ -n "$ours" ] && rm -f /usr/sbin/policy-rc.d
  fi
fi

# ------------------------------------------------------------ 2. hypervisor + kernel .debs (cached)
mkdir -p "$CACHE/debs"
have_deb() { compgen -G "$CACHE/debs/$1_*.deb" >/dev/null; }
if ! have_deb xen-hypervisor-4.17-amd64 || ! have_deb 'linux-image-[0-9]*-amd64'; then
  [ -n "$(ls /var/lib/apt/lists/*Packages 2>/dev/null)" ] || apt-get update -qq
  KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  [ -n "$KPKG" ] || { apt-get update -qq; KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}'); }
  case $KPKG in linux-image-6.1.*) ;; *) die "linux-image-amd64 does not depend on a 6.1 kernel: '$KPKG'" ;; esac
  log "apt-get download xen-hypervisor-4.17-amd64 $KPKG"
  (cd "$CACHE/debs" && apt-get download xen-hypervisor-4.17-amd64 "$KPKG" 2>&1 | grep -v 'unsandboxed' || true)
  have_deb xen-hypervisor-4.17-amd64 && have_deb 'linux-image-[0-9]*-amd64' || die "download failed"
fi

# ------------------------------------------------------------ 3. unpack (once per set of .debs)
X=$CACHE/x
STAMP=$(cd "$CACHE/debs" && ls ./*.deb | sort | tr '\n' ' ')
if [ "$(cat "$X/.stamp" 2>/dev/null)" != "$STAMP" ]; then
  log "unpacking $STAMP"
  rm -rf "$X"; mkdir -p "$X"
  for d in "$CACHE"/debs/*.deb; do dpkg -x "$d" "$X"; done
  KV=$(ls "$X/lib/modules" | head -1)
  depmod -b "$X" "$KV"
  zcat "$X"/boot/xen-4.17-amd64.gz > "$X/xen.elf"   # QEMU's multiboot loader takes the plain ELF only
  echo "$STAMP" > "$X/.stamp"
fi
KV=$(ls "$X/lib/modules" | head -1)
RUN=$CACHE/run
rm -rf "$RUN"; mkdir -p "$RUN/out" "$RUN/guest"
cp "$X/xen.elf" "$RUN/xen.elf"; cp "$X/boot/vmlinuz-$KV" "$RUN/vmlinuz"; cp "$X/boot/vmlinuz-$KV" "$RUN/guest/vmlinuz"

# ------------------------------------------------------------ 4. initramfs images
copy_bin() { # binaries and the libraries ldd lists, at the same paths
  local b l
  for b in "$@"; do
    mkdir -p "$R$(dirname "$b")"; cp -L "$b" "$R$b"
    for l in $(ldd "$b" 2>/dev/null | grep -o '/[^ ]*'); do mkdir -p "$R$(dirname "$l")"; cp -L "$l" "$R$l"; done
  done
}
copy_mods() { # modules and their dependencies from the unpacked kernel
  local m f
  for m in "$@"; do
    for f in $(modprobe -d "$X" -S "$KV" --show-depends "$m" | awk '/^insmod/{print $2}'); do
      mkdir -p "$R$(dirname "${f#"$X"}")"; cp "$f" "$R${f#"$X"}"
    done
  done
  cp "$X"/lib/modules/"$KV"/modules.builtin* "$X"/lib/modules/"$KV"/modules.order "$R/lib/modules/$KV/"
  depmod -b "$R" "$KV"
}
base_root() {
  rm -rf "$R"; mkdir -p "$R"/{bin,sbin,etc,proc,sys,dev,run,tmp,root,usr/bin,usr/sbin}
  cp /bin/busybox "$R/bin/busybox"
  for a in $(/bin/busybox --list); do [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"; done
}
pack() { (cd "$1" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$2"; }

R=$RUN/domUroot; base_root; copy_mods xen-pcifront nvme e1000e 8139cp
copy_bin /usr/bin/lspci; mkdir -p "$R/usr/share/misc"; cp -L /usr/share/misc/pci.ids "$R/usr/share/misc/" 2>/dev/null || true
# the guest's timing helper (own C, static: the domU has no libc)
if command -v gcc >/dev/null && gcc -static -O2 -Wall -o "$R/usr/bin/cfgloop" "$LANE/cfgloop.c" 2> "$RUN/cfgloop-build.log"; then
  PERF_READS=${XENLANE_PERF_READS:-10000}
else log "WARNING: cannot build cfgloop.c (gcc, static libc): no guest timing figures"; PERF_READS=0; fi
cp "$LANE/domu-init.sh" "$R/init"; chmod +x "$R/init"; pack "$R" "$RUN/guest/domU.cpio.gz"
R=$RUN/dom0root; base_root
copy_mods xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs virtio_pci 9pnet_virtio 9p
cp "$LANE/dom0-init.sh" "$R/init"; chmod +x "$R/init"; pack "$R" "$RUN/dom0.cpio.gz"
rm -rf "$RUN/domUroot" "$RUN/dom0root"

# the NVMe disk: known bytes, their checksum taken here (the domU reads them back)
(yes "xenlane nvme pattern $KV" || true) | head -c 8M > "$RUN/nvme.img"
NVME_SHA=$(head -c 1M "$RUN/nvme.img" | sha256sum | cut -d' ' -f1)

# ------------------------------------------------------------ 5. settings for dom0
PY=${XENLANE_PYTHON:-}
[ -n "$PY" ] || { [ -x "$REPO/.venv/bin/python" ] && PY=$REPO/.venv/bin/python; } || PY=$(command -v python3)
"$PY" -c 'import pyxs, psutil, zmq' 2>/dev/null || log "WARNING: $PY lacks the project's dependencies (pyxs, psutil, pyzmq)"
# dom0 sees the checkout read-only: build the C helpers here, first
if [ -f "$REPO/sim/simdom0/native/build.py" ]; then
  (cd "$REPO" && "$PY" -m simdom0.native.build) > "$RUN/native-build.log" 2>&1 || die "building simdom0/native failed: $(tail -3 "$RUN/native-build.log")"
fi
{
  echo "LANE_REPO=$REPO"; echo "LANE_PY=$PY"; echo "LANE_KX=$X"; echo "LANE_GUEST=$RUN/guest"
  echo "LANE_DEVICES='$DEVICES'"; echo "LANE_MODES='$MODES'"
  [ -n "${XENLANE_DAEMON_CMD:-}" ] && printf 'LANE_DAEMON_CMD=%q\n' "$XENLANE_DAEMON_CMD"
  [ -n "${XENLANE_ATTACH_CMD:-}" ] && printf 'LANE_ATTACH_CMD=%q\n' "$XENLANE_ATTACH_CMD"
  [ -n "${XENLANE_DOM0_PYTEST:-}" ] && echo "LANE_DOM0_PYTEST=$XENLANE_DOM0_PYTEST"
  [ -n "${XENLANE_LIFECYCLE+set}" ] && printf 'LANE_LIFECYCLE=%q\n' "$XENLANE_LIFECYCLE"
  [ -n "${XENLANE_SYSTEMD+set}" ] && printf 'LANE_SYSTEMD=%q\n' "$XENLANE_SYSTEMD"
  echo "LANE_NVME_SHA=$NVME_SHA"; echo "LANE_INTMODES='${XENLANE_INTMODES:-1 0 2}'"; echo "LANE_PERF_READS=$PERF_READS"
  true
} > "$RUN/out/lane.conf"

# ------------------------------------------------------------ 6. outer QEMU (one at a time: 2 cores)
NDEV=$(echo $DEVICES | wc -w); NMODE=$(echo $MODES | wc -w)
NSCEN=$(( NDEV * NMODE )); [[ " $DEVICES " == *" nvme "* ]] && NSCEN=$(( NSCEN + NMODE ))   # nvme's second guest
# the administrator's lifecycle (pcibackd mode, two of its devices) counts as one more
LCDEVS=0; for d in ${XENLANE_LIFECYCLE-pci-testdev edu}; do [[ " $DEVICES " == *" $d "* ]] && LCDEVS=$(( LCDEVS + 1 )); done
[[ " $MODES " == *" pcibackd "* ]] && [ "$LCDEVS" -ge 2 ] && NSCEN=$(( NSCEN + 1 ))
# the unit under a real systemd (pcibackd mode, XENLANE_SYSTEMD's devices) counts as one more per device
for d in ${XENLANE_SYSTEMD-nvme}; do [[ " $MODES " == *" pcibackd "* && " $DEVICES " == *" $d "* ]] && NSCEN=$(( NSCEN + 1 )); done
# A bound for a wedged emulator, not a sleep: a stuck step inside dom0 is cut by
# its own bound (xl 90 s, domU 100 s, cleanup 20 s) and reported as a failed check.
# Measured full lane (6 scenarios), this machine, 2026-11-28: QEMU 257 s and
# 254 s = ~60 s fixed (Xen + dom0 boot, platform tests, daemon start, finish)
# + 18-78 s per scenario (~33 s on average); earlier sessions: 770-930 s on a
# slower day, ~3.6x.  Bound = 3x the slowest day: 3 x (220 s + 120 s per
# scenario), 5340 s for the full lane (13 scenarios: nvme's second guest and
# the lifecycle count), 1380 s for --quick.  2026-11-28 with ~7 sessions' tests on the same
# 2 cores a scenario took up to 630 s: such a day needs XENLANE_TIMEOUT.
TMO=${XENLANE_TIMEOUT:-$(( 3 * (220 + 120 * NSCEN) ))}
XENARGS="console=com1 com1=115200 dom0_mem=1024M,max:1024M smap=0 loglvl=warning guest_loglvl=warning"
DOM0ARGS="console=hvc0 earlyprintk=xen loglevel=6 lane.repo=$REPO"
BOOT_TMO=${XENLANE_BOOT_TIMEOUT:-150}
# Not "max": with it, TCG (QEMU 7.2) corrupted dom0 user-space state in every
# full run (heap metadata of xl, date, python overwritten, a `sleep` spinning in
# R state), in kernel-backend runs too, so not pcibackd's doing.  A CPU without
# XSAVE/AVX (Nehalem) ran the whole lane clean; see README "TCG and -cpu".
CPU=${XENLANE_CPU:-Nehalem}
echo "LANE_DEADLINE=$(( TMO - 40 ))" >> "$RUN/out/lane.conf"
cd "$RUN"
# nvme has a bootindex: SeaBIOS sets the controller up as a boot disk and leaves
# Bus Master on, as firmware leaves a controller it booted from (-kernel's
# option ROM still boots first).  The three NICs share a hub with no host side.
run_qemu() { # one boot; rc 124 = overall bound, 125 = dom0 never came up (TCG boot hang)
  rm -f serial.log qemu.out; : > serial.log
  timeout --kill-after=10 "$TMO" qemu-system-x86_64 -accel "tcg${XENLANE_TCG_OPTS:-}" -machine q35 -cpu "$CPU" -smp 2 -m 3072 \
    -display none -vga none -no-reboot -nic none -serial file:serial.log \
    -device intel-iommu,intremap=on \
    -device edu,addr=0x5 -device pci-testdev,addr=0x6 \
    -netdev hubport,id=lanenet0,hubid=0 -netdev hubport,id=lanenet1,hubid=0 \
    -netdev hubport,id=lanenet2,hubid=0 \
    -device e1000e,addr=0x7,netdev=lanenet0,mac=52:54:00:12:34:07 \
    -drive file="$RUN/nvme.img",if=none,id=lanedisk,format=raw \
    -device nvme,addr=0x8,serial=xenlane,drive=lanedisk,bootindex=1 \
    -device virtio-net-pci,addr=0x9,netdev=lanenet1,mac=52:54:00:12:34:09 \
    -device rtl8139,addr=0xa,netdev=lanenet2,mac=52:54:00:12:34:0a \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs local,path="$RUN/out",mount_tag=laneout,security_model=none,multidevs=remap \
    -kernel xen.elf -append "$XENARGS" -initrd "vmlinuz $DOM0ARGS,dom0.cpio.gz" > qemu.out 2>&1 &
  QPID=$!
  trap 'kill $QPID 2>/dev/null || true' EXIT
  # --pid: tail ends with QEMU (killing the subshell would leave it following the next run's log)
  (tail --pid=$QPID -n +1 -F serial.log 2>/dev/null | grep -a --line-buffered -E 'LANE|Panic|Kernel panic' | sed -u -e 's/\r//g' -e 's/^/  | /') &
  TPID=$!
  local t0 rc=0 w=0 booted=""
  t0=$(date +%s)
  while kill -0 $QPID 2>/dev/null; do
    if [ -z "$booted" ]; then
      if grep -a -q 'LANE: dom0 services up' serial.log; then booted=1; T_BOOTED=$(date +%s)
      elif [ $(( $(date +%s) - t0 )) -ge "$BOOT_TMO" ]; then
        log "dom0 not up after ${BOOT_TMO}s: killing QEMU"; kill $QPID 2>/dev/null; rc=125
      fi
    fi
    sleep 1
  done
  wait $QPID || w=$?
  [ $rc = 125 ] || rc=$w
  trap - EXIT
  kill $TPID 2>/dev/null || true; wait $TPID 2>/dev/null || true
  return $rc
}
QRC=0; QCRASH=""
ulimit -c unlimited 2>/dev/null || true   # a crashing QEMU leaves its core in $RUN
for attempt in 1 2; do
  log "QEMU (TCG, -cpu $CPU) with $DEVICES, modes: $MODES; bounded to ${TMO}s (attempt $attempt)"
  find "$RUN/out" -mindepth 1 ! -name lane.conf -delete
  T_QEMU=$(date +%s); T_BOOTED=""
  QRC=0; run_qemu || QRC=$?
  T_END=$(date +%s)
  log "QEMU exited (rc $QRC) after $(( T_END - T_QEMU ))s; lane wall time so far $(( T_END - T_START ))s"
  case $QRC in
    125) cp serial.log "serial-hung-$attempt.log" ;;
    # the emulator itself died of a signal (137: SIGKILL, the bound's --kill-after):
    # QEMU 7.2's TCG or device model, not dom0; a second boot runs everything again
    13[0-689]|14[0-9]|15[0-9])
      [ -f "$RUN/out/DONE" ] && break
      QCRASH="$QCRASH attempt $attempt: signal $(( QRC - 128 )) (serial-crashed-$attempt.log)"
      cp serial.log "serial-crashed-$attempt.log"
      for c in core core.*; do [ -f "$c" ] && mv "$c" "qemu-core-$attempt"; done
      log "QEMU crashed (signal $(( QRC - 128 ))): serial log kept as serial-crashed-$attempt.log" ;;
    *) break ;;
  esac
done
[ -z "$QCRASH" ] || log "QEMU crashed on$QCRASH: an emulator fault, the whole lane ran again"
[ "$QRC" = 124 ] && log "QEMU hit the ${TMO}s bound"
if [ "$QRC" = 125 ]; then   # dom0 hung early in boot twice: TCG, not pcibackd
  log "dom0 did not boot in two attempts (TCG); no result"; exit 77
fi
[ -s qemu.out ] && sed 's/^/  qemu: /' qemu.out | head -20

# ------------------------------------------------------------ 7. report
RC=0
"$PY" "$LANE/report.py" "$RUN/out" $DEVICES || RC=$?
[ -f "$RUN/out/DONE" ] || { log "dom0 did not finish (no DONE); serial log tail:"; tail -40 serial.log | tr -d '\r'; RC=1; }
"$PY" "$LANE/timing.py" "$RUN/out" $(( T_QEMU - T_START )) $(( ${T_BOOTED:-$T_END} - T_QEMU )) $(( T_END - T_QEMU )) || true
log "lane wall time $(( $(date +%s) - T_START ))s (QEMU $(( T_END - T_QEMU ))s); artifacts in $RUN/out, serial log $RUN/serial.log"
exit $RC
