#!/bin/bash
# dom0 scenario runner of the Xen lane.  Runs as PID 1 inside a chroot of the
# host's root filesystem (see dom0-init.sh), reads its settings from
# /tmp/out/lane.conf (written by run.sh) and writes everything it learns to
# /tmp/out (a 9p share the host reads after QEMU exits):
#   results.txt                  "<device> <mode> <check> PASS|FAIL|INFO <detail>" lines
#   <device>.<mode>.lspci        the domU's `lspci -vvv -xxx` of the device
#   <device>.<mode>.xenstore     backend/frontend nodes (values and permissions) while connected
#   <device>.<mode>.console      the domU's whole console log
#   dom0.log, pcibackd.log, xl-*.log, dmesg.txt
#   timing.txt                   "<uptime> <phase>" at the start of each phase (run.sh prints the breakdown)
# Per device: mode "kernel" (xl create with pci=, Linux xen-pciback) for every
# device first, then xen-pciback is unloaded and mode "pcibackd" (xl create
# without pci=, pcibackd's attach writes the nodes, pcibackd is the backend).
set -u
export PATH=/usr/lib/xen-4.17/bin:/usr/sbin:/usr/bin:/sbin:/bin
# the host's / is read-only here: caches and homes go to the tmpfs /tmp
export PYTHONDONTWRITEBYTECODE=1 LC_ALL=C HOME=/tmp XDG_CACHE_HOME=/tmp/.cache
# a crashing Python prints every thread's stack; any crashing process leaves a
# core in out/ (the host's gdb reads it: dom0 runs the host's own binaries)
export PYTHONFAULTHANDLER=1
OUT=/tmp/out
ulimit -c unlimited
echo "$OUT/core.%e.%p" > /proc/sys/kernel/core_pattern
# shellcheck source=/dev/null
. $OUT/lane.conf
: "${LANE_REPO:?}" "${LANE_PY:?}" "${LANE_KX:?}" "${LANE_GUEST:?}" "${LANE_DEVICES:?}"
LANE_MODES=${LANE_MODES:-kernel pcibackd}
LANE_DOMU_TIMEOUT=${LANE_DOMU_TIMEOUT:-100}
LANE_CLEAN_TIMEOUT=${LANE_CLEAN_TIMEOUT:-20}
export PYTHONPATH=$LANE_REPO:$LANE_REPO/sim${PYTHONPATH:+:$PYTHONPATH}
# Python under TCG is ~50x slower: give workers a long heartbeat budget.
DAEMON_CMD=${LANE_DAEMON_CMD:-"$LANE_PY -m pcibackd run --platform xen --foreground --heartbeat-timeout 30"}
ATTACH_CMD=${LANE_ATTACH_CMD:-"$LANE_PY -m pcibackd.xenstore.toolstack attach {domid} {bdf} --seize --permissions"}
# hot-unplug: the guest's pcifront lets go of the function (its driver unbinds) within the timeout
DETACH_CMD=${LANE_DETACH_CMD:-"$LANE_PY -m pcibackd.xenstore.toolstack --timeout 90 detach {domid} {bdf} --permissions"}
DAEMONCTL="$LANE_PY $LANE_REPO/xenlane/daemonctl.py"
CON=/var/log/xen/console

up() { cut -d' ' -f1 /proc/uptime; }
# every toolstack call is bounded: a hang shows up as a failed check, not a stuck lane
XL=/usr/lib/xen-4.17/bin/xl
xl() { timeout 90 "$XL" "$@"; }
for t in ls read exists; do eval "xenstore-$t() { timeout 20 /usr/bin/xenstore-$t \"\$@\"; }"; done
log() { echo "LANE: $*"; echo "[$(up)] $*" >> $OUT/dom0.log; }
phase() { echo "$(up) $*" >> $OUT/timing.txt; }   # a phase lasts until the next one starts
SFX=""; TAG=""   # a second create on the same function: check names end in SFX, files carry TAG
result() { # device mode check verdict detail...
  local dev=$1 mode=$2 check=$3$SFX verdict=$4; shift 4
  echo "$dev $mode $check $verdict $*" >> $OUT/results.txt
  log "$verdict $dev/$mode $check $*"
}
kmod() { modprobe -d "$LANE_KX" "$@"; }
vid_of() { case $1 in edu) echo 1234:11e8 ;; pci-testdev) echo 1b36:0005 ;; e1000e) echo 8086:10d3 ;; nvme) echo 1b36:0010 ;; rtl8139) echo 10ec:8139 ;; esac; }
driver_of() { local l; l=$(readlink "/sys/bus/pci/devices/$1/driver" 2>/dev/null) && basename "$l" || echo none; }
finish() {
  log "finishing: $1"
  xl list > $OUT/xl-list-final.txt 2>&1
  if [ -n "${CANARY:-}" ]; then
    kill -TERM "$CANARY" 2>/dev/null; poll 20 grep -q "canary stopped" $OUT/canary.txt
    if grep -q CORRUPT $OUT/canary.txt; then result all dom0 memory-intact FAIL "$(grep -c CORRUPT $OUT/canary.txt) foreign write(s): $(grep -m1 CORRUPT $OUT/canary.txt); see canary.txt"
    elif grep -q "canary stopped" $OUT/canary.txt; then result all dom0 memory-intact PASS "$(tail -1 $OUT/canary.txt | cut -d' ' -f2-)"
    else result all dom0 memory-intact FAIL "the canary did not report (died?)"; fi
  fi
  segv=$(dmesg | grep -E 'segfault at|general protection|traps:' | head -5)
  if [ -z "$segv" ]; then result all dom0 no-crashed-process PASS ""
  else result all dom0 no-crashed-process FAIL "$(echo "$segv" | tr '\n' ';')"; fi
  dmesg > $OUT/dmesg.txt 2>&1
  xl dmesg > $OUT/xl-dmesg.txt 2>&1
  echo "$1" > $OUT/DONE
  phase end
  sync; sleep 0.5
  reboot -f   # Xen resets the machine; QEMU runs with -no-reboot and exits
}
# poll COMMAND until it succeeds or SECONDS pass (no fixed sleeps as synchronisation)
poll() { local secs=$1; shift; local end=$(( $(date +%s) + secs )); until "$@"; do [ "$(date +%s)" -ge "$end" ] && return 1; sleep 0.25; done; }
xs_gone() { ! xenstore-exists "$1" 2>/dev/null; }

# a last resort before run.sh's QEMU bound: leave a picture of what hung, then stop
if [ -n "${LANE_DEADLINE:-}" ]; then
  ( sleep "$LANE_DEADLINE"
    echo "LANE: dom0 deadline (${LANE_DEADLINE}s) hit: dumping state"
    phase "deadline hit: dumping state"
    ps -eo pid,ppid,stat,wchan:30,etime,args > $OUT/ps-at-deadline.txt 2>&1
    timeout 20 /usr/bin/xenstore-ls -fp > $OUT/xenstore-at-deadline.txt 2>&1
    echo "deadline" > $OUT/DEADLINE; dmesg > $OUT/dmesg.txt 2>&1; phase end; sync; reboot -f ) &
fi

# ------------------------------------------------------------ dom0 services
mkdir -p /run/xen /run/xenstored /var/lib/xen /var/log/xen/console
log "dom0 chroot up at $(up)s; python: $($LANE_PY -c 'import sys; print(sys.version.split()[0])' 2>&1)"
xenstored --pid-file /run/xenstored.pid || finish "xenstored failed"
xen-init-dom0 >> $OUT/dom0.log 2>&1 || finish "xen-init-dom0 failed"
xenconsoled --log=guest --log-dir=$CON --pid-file=/run/xenconsoled.pid || finish "xenconsoled failed"
xl info > $OUT/xl-info.txt 2>&1
ls -l /dev/xen >> $OUT/dom0.log 2>&1
log "dom0 services up at $(up)s"
phase "dom0 setup (canary, real-platform tests, devices)"
# memory canary: reports any write into its pages (see canary.py)
$LANE_PY "$LANE_REPO/xenlane/canary.py" $OUT/canary.txt "${LANE_CANARY_MB:-160}" &
CANARY=$!

# the real platform layer against real /dev/xen (grant to self, evtchn loopback)
# (no plugins, no conftest: every import costs seconds under TCG)
if [ "${LANE_DOM0_PYTEST:-1}" = 0 ]; then
  result all xen real-platform-tests INFO "skipped (LANE_DOM0_PYTEST=0)"
elif (cd "$LANE_REPO" && PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 150 "$LANE_PY" -m pytest -q -p no:cacheprovider \
      --noconftest -o addopts= tests/unit/test_real_platform.py) > $OUT/pytest-real-platform.log 2>&1; then
  result all xen real-platform-tests PASS "$(tail -1 $OUT/pytest-real-platform.log)"
else
  result all xen real-platform-tests FAIL "$(tail -1 $OUT/pytest-real-platform.log)"
fi

# COMMAND as dom0's hardware view has it (decimal / hex)
cmd_of() { echo $(( 0x$(od -An -tx2 -j4 -N2 "/sys/bus/pci/devices/$1/config" | tr -d ' ') )); }
cmd_hex() { printf '0x%04x' "$(cmd_of "$1")"; }
bm_of() { [ $(( $(cmd_of "$1") & 4 )) != 0 ] && echo on || echo off; }

declare -A BDF BM_BOOT
for dev in $LANE_DEVICES; do
  BDF[$dev]=$(lspci -D -n -d "$(vid_of "$dev")" | awk '{print $1; exit}')
  if [ -z "${BDF[$dev]}" ]; then result "$dev" dom0 present FAIL "no $(vid_of "$dev") in dom0"; else
    lspci -vvv -xxx -s "${BDF[$dev]}" > "$OUT/$dev.dom0.lspci" 2>&1
    result "$dev" dom0 present PASS "${BDF[$dev]} driver=$(driver_of "${BDF[$dev]}")"
    BM_BOOT[$dev]=$(bm_of "${BDF[$dev]}"); fi
done
# the boot controller: SeaBIOS set it up (bootindex) and left Bus Master on
if [ -n "${BDF[nvme]:-}" ]; then
  if [ $(( $(cmd_of "${BDF[nvme]}") & 4 )) != 0 ]; then result nvme dom0 firmware-busmaster PASS "COMMAND $(cmd_hex "${BDF[nvme]}") at dom0 boot"
  else result nvme dom0 firmware-busmaster FAIL "COMMAND $(cmd_hex "${BDF[nvme]}"): the firmware did not leave Bus Master on"; fi
fi

# dom0's end of the QEMU-internal network (a hub with no host backend): virtio-net,
# IPv6 link-local only; the domU pings it, and it pings the domU's e1000e
PEER=fe80::5054:ff:fe12:3409; NETIF=""
declare -A DOMU_LL=([e1000e]=fe80::5054:ff:fe12:3407 [rtl8139]=fe80::5054:ff:fe12:340a)
if [[ " $LANE_DEVICES " == *" e1000e "* || " $LANE_DEVICES " == *" rtl8139 "* ]]; then
  echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad
  kmod virtio_net
  poll 20 sh -c 'grep -l 52:54:00:12:34:09 /sys/class/net/*/address >/dev/null 2>&1'
  NETIF=$(grep -l 52:54:00:12:34:09 /sys/class/net/*/address 2>/dev/null | head -1 | cut -d/ -f5)
  if [ -n "$NETIF" ] && ip link set "$NETIF" up && poll 20 sh -c "ip -6 addr show dev $NETIF | grep -q $PEER"; then
    result all dom0 net-up PASS "$NETIF $PEER"
  else result all dom0 net-up FAIL "no dom0 NIC with 52:54:00:12:34:09 up (${NETIF:-none})"; fi
fi
LANE_INTMODES=${LANE_INTMODES:-1 0 2}
INTMODE_NAME=([0]=INTx [1]=MSI [2]=MSI-X)

con_has() { grep -q "$2" "$CON/guest-$1.log" 2>/dev/null; }
con_line() { tr -d '\r' < "$CON/guest-$1.log" | grep "$2" | tail -1; }
field() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p" | head -1; }

net_checks() { # dev mode name intmodes: per interrupt mode, pings both ways and the guest's counter rising
  local dev=$1 mode=$2 name=$3 m l irqline ll=${DOMU_LL[$1]}
  for m in $4; do
    if ! poll 120 con_has "$name" "LANE-NET-READY mode=$m"; then result "$dev" "$mode" "net-${INTMODE_NAME[$m]}" FAIL "domU not ready in IntMode=$m"; break; fi
    local out rc=0; out=$(busybox ping -6 -c 3 -w 20 "$ll%$NETIF" 2>&1) || rc=$?
    poll 60 con_has "$name" "LANE-NET-DONE mode=$m"
    l=$(con_line "$name" "^LANE-NET mode=$m "); irqline=$(con_line "$name" "^LANE-NET-IRQ mode=$m ")
    local done_l; done_l=$(con_line "$name" "^LANE-NET-DONE mode=$m ")
    local want; case $m in 2) want='msi-x' ;; 1) want='msi' ;; 0) want='' ;; esac
    local kind_ok=1 lines=${irqline#LANE-NET-IRQ mode=$m } retry
    retry=$(con_line "$name" "^LANE-NET-RETRY mode=$m "); [ -n "$retry" ] && lines="$lines (${retry#LANE-NET-RETRY })"
    if [ -n "$want" ]; then echo "$lines" | grep -qi -- "-$want" || kind_ok=""
      [ "$m" = 1 ] && echo "$lines" | grep -qi -- '-msi-x' && kind_ok=""
    else echo "$lines" | grep -qi -- '-msi' && kind_ok=""; fi
    if [ "$(field "$l" ping_rc)" = 0 ] && [ "$rc" = 0 ] && [ "$(field "$done_l" irq)" -gt "$(field "$l" irq_before)" ] 2>/dev/null && [ -n "$kind_ok" ]; then
      result "$dev" "$mode" "net-${INTMODE_NAME[$m]}" PASS "ping both ways; irqs $(field "$l" irq_before) -> $(field "$done_l" irq): $lines"
    else
      result "$dev" "$mode" "net-${INTMODE_NAME[$m]}" FAIL "domU ping rc=$(field "$l" ping_rc), dom0 ping rc=$rc ($(echo "$out" | tail -1)), irqs $(field "$l" irq_before) -> $(field "$done_l" irq), kind ok=${kind_ok:-no}: $lines $(con_line "$name" "^LANE-NET-LINK mode=$m ")"
    fi
  done
}

drive_checks() { # dev mode name bdf: the guest driver used the device through its interrupts
  local dev=$1 mode=$2 name=$3 bdf=$4 l m irqline
  case $dev in
  nvme)
    if ! poll 150 con_has "$name" LANE-NVME-END; then result nvme "$mode" nvme-driver FAIL "no LANE-NVME-END from the domU"; return; fi
    l=$(con_line "$name" '^LANE-NVME ')
    if [ "$(field "$l" sha)" = "$LANE_NVME_SHA" ]; then result nvme "$mode" nvme-data PASS "first MiB sha256 matches the host's"
    else result nvme "$mode" nvme-data FAIL "$l (host ${LANE_NVME_SHA:0:16})"; fi
    irqline=$(con_line "$name" '^LANE-NVME-IRQ')
    if [ "$(field "$l" irq_after)" -gt "$(field "$l" irq_before)" ] && echo "$irqline" | grep -qi 'msi-x\|msix'; then
      result nvme "$mode" nvme-msix-irqs PASS "$(field "$l" irq_before) -> $(field "$l" irq_after): ${irqline#LANE-NVME-IRQ }"
    else result nvme "$mode" nvme-msix-irqs FAIL "$(field "$l" irq_before) -> $(field "$l" irq_after): ${irqline#LANE-NVME-IRQ }"; fi
    if [ "$(field "$l" polled)" = 0 ]; then result nvme "$mode" nvme-no-polling PASS ""
    else result nvme "$mode" nvme-no-polling FAIL "'completion polled' $(field "$l" polled) time(s) in the domU's dmesg"; fi
    ;;
  e1000e) net_checks e1000e "$mode" "$name" "$LANE_INTMODES" ;;
  rtl8139) net_checks rtl8139 "$mode" "$name" 0 ;;
  *) return ;;
  esac
  tr -d '\r' < "$CON/guest-$name.log" > "$OUT/$dev$TAG.$mode.console"     # with the driver's part
  # dom0's view of the function while the guest holds it (MASKALL, enable bits as Xen left them)
  lspci -vvv -s "$bdf" > "$OUT/$dev$TAG.$mode.dom0-live.lspci" 2>&1
  result "$dev" "$mode" dom0-view-live INFO "COMMAND $(cmd_hex "$bdf") BusMaster $(bm_of "$bdf"); $(grep -E 'MSI-X:|MSI:' "$OUT/$dev$TAG.$mode.dom0-live.lspci" | tr -s ' ' | tr '\n' ';')"
  # after the driver's work: do wrong-width dom0 writes to the MSI-X capability pass Xen?
  [ "$dev" = nvme ] && [ -z "$SFX" ] && result "$dev" "$mode" msix-write-widths INFO "$(timeout 60 "$LANE_PY" "$LANE_REPO/xenlane/msiprobe.py" "$bdf" 2>&1 | tail -1)"
  return 0    # the checks reported themselves; the caller goes on to the teardown
}

msi_off_after() { # dev mode bdf [when]: nothing left enabled in hardware after the guest left
  local l w=${4:-destroy}; lspci -vvv -s "$3" > "$OUT/$1$TAG.$2.dom0-after-$w.lspci" 2>&1
  l=$(grep -E 'MSI-X:|MSI:' "$OUT/$1$TAG.$2.dom0-after-$w.lspci" | tr -s ' ' | tr '\n' ';')
  if [ -z "$l" ]; then return; fi
  # pcibackd also leaves MSI-X's Function Mask clear: Xen refuses to assign a masked function (EBUSY)
  if echo "$l" | grep -q 'Enable+'; then result "$1" "$2" "msi-off-after-$w" FAIL "$l"
  elif [ "$2" = pcibackd ] && echo "$l" | grep -q 'Masked+'; then result "$1" "$2" "msi-off-after-$w" FAIL "$l"
  else result "$1" "$2" "msi-off-after-$w" PASS "$l"; fi
}

# What Xen printed for a debug key: everything after the last heading of its dump
# (the 'i', 'M' and 'Q' handlers run inside the hypercall, before xl returns).
declare -A XEN_KEY_HEAD=([i]="IRQ information:" [M]="MSI information:" [Q]="==== PCI devices ====")
xen_keys() { # key file
  xl debug-keys "$1" >/dev/null 2>&1
  xl dmesg 2>/dev/null | tr -d '\r' | awk -v k="${XEN_KEY_HEAD[$1]}" 'index($0, k) { on = 1; buf = "" } on { buf = buf $0 "\n" } END { printf "%s", buf }' > "$2"
}
msi_irqs() { # file of 'i': Xen's MSI/MSI-X IRQs (mapped, bound or not)
  grep -c 'PCI-MSI' "$1"; }
XIRQ_BASE=0
xen_irq_baseline() { xen_keys i /tmp/keys.i; XIRQ_BASE=$(msi_irqs /tmp/keys.i); }
pirq_check() { # dev mode domid bdf when: Xen holds no interrupt for the guest, no MSI of the function
  local dev=$1 mode=$2 d=$3 bdf=$4 when=$5 bind n q msis f
  f="$OUT/$dev$TAG.$mode.xen-irqs-after-$when.txt"
  xen_keys i /tmp/keys.i; xen_keys M /tmp/keys.M; xen_keys Q /tmp/keys.Q
  cat /tmp/keys.i /tmp/keys.M /tmp/keys.Q > "$f"
  bind=$(grep -oE "d$d: *[0-9]+\([^)]*\)" /tmp/keys.i | tr '\n' ' ')
  n=$(msi_irqs /tmp/keys.i)
  q=$(grep -i -- "${bdf}" /tmp/keys.Q | head -1)
  msis=$(echo "$q" | sed -n 's/.*MSIs *< *\([^>]*\)>.*/\1/p' | tr -s ' ')
  local detail="guest bindings: ${bind:-none}; Xen MSI IRQs ${XIRQ_BASE} before -> $n; Q: $(echo "$q" | sed 's/^(XEN) *//' | tr -s ' ')"
  if [ ! -s /tmp/keys.i ] || [ ! -s /tmp/keys.Q ]; then result "$dev" "$mode" "no-pirq-after-$when" FAIL "no 'i' or 'Q' dump in xl dmesg"
  elif [ -z "$bind" ] && [ "$n" -le "$XIRQ_BASE" ] && [ -z "${msis// /}" ]; then result "$dev" "$mode" "no-pirq-after-$when" PASS "$detail"
  else result "$dev" "$mode" "no-pirq-after-$when" FAIL "$detail"; fi
}
BM_KERNEL_DIR=/tmp/bm-kernel; mkdir -p $BM_KERNEL_DIR
# the header without STATUS (0x06-0x07: hardware-set, write-1-to-clear) and BIST
# (0x0f), which a release never writes
header_of() { head -c 64 "/sys/bus/pci/devices/$1/config" | od -An -v -tx1 -w16 | awk 'NR == 1 { $7 = $8 = $16 = "--" } 1'; }
busmaster_at_seize() { # dev mode bdf: the backend took the function with DMA off
  if [ "$(bm_of "$3")" = off ]; then result "$1" "$2" busmaster-at-seize PASS "COMMAND $(cmd_hex "$3")"
  else result "$1" "$2" busmaster-at-seize FAIL "COMMAND $(cmd_hex "$3"): Bus Master on while no driver owns the function"; fi
}
busmaster_after() { # dev mode bdf when: the state the kernel backend leaves (kernel mode records it)
  # xen-pciback restores the state saved when it took the function, Bus Master
  # included if the firmware left it on; pcibackd leaves it off: no DMA from a
  # function nobody drives.  Off where xen-pciback leaves it on passes (safer).
  local now; now=$(bm_of "$3")
  if [ "$2" = kernel ]; then echo "$now" > "$BM_KERNEL_DIR/$1.$4"; result "$1" kernel "busmaster-after-$4" INFO "COMMAND $(cmd_hex "$3") BusMaster $now"
  elif [ ! -e "$BM_KERNEL_DIR/$1.$4" ]; then result "$1" "$2" "busmaster-after-$4" INFO "COMMAND $(cmd_hex "$3") BusMaster $now (no kernel-mode run to compare)"
  elif [ "$(cat "$BM_KERNEL_DIR/$1.$4")" = "$now" ]; then result "$1" "$2" "busmaster-after-$4" PASS "BusMaster $now, as xen-pciback leaves it (COMMAND $(cmd_hex "$3"))"
  elif [ "$now" = off ]; then result "$1" "$2" "busmaster-after-$4" PASS "BusMaster off; xen-pciback leaves it on (restores the state it seized): off is the safe side (COMMAND $(cmd_hex "$3"))"
  else result "$1" "$2" "busmaster-after-$4" FAIL "BusMaster $now, xen-pciback leaves it $(cat "$BM_KERNEL_DIR/$1.$4") (COMMAND $(cmd_hex "$3"))"; fi
}

write_cfg() { # name [extra kernel args] -> /tmp/name.cfg (no pci= line)
  cat > "/tmp/$1.cfg" <<CFG
name = "$1"
type = "pv"
kernel = "$LANE_GUEST/vmlinuz"
ramdisk = "$LANE_GUEST/domU.cpio.gz"
extra = "console=hvc0 loglevel=3 iommu=soft lane.wait=$((LANE_DOMU_TIMEOUT - 30)) lane.peer=$PEER lane.intmodes=${LANE_INTMODES// /,}${2:+ $2}"
memory = 256
vcpus = 1
on_poweroff = "destroy"
on_crash = "destroy"
CFG
}

domu_reported() { grep -q LANE-DOMU-END "$CON/guest-$1.log" 2>/dev/null || ! xl domid "$1" >/dev/null 2>&1; }

collect() { # dev mode name domid: the domU's view and the xenstore nodes
  local dev=$1 mode=$2 name=$3 d=$4 vid; vid=$(vid_of "$dev")
  poll "$LANE_DOMU_TIMEOUT" domu_reported "$name"
  local o=$OUT/$dev$TAG.$mode
  tr -d '\r' < "$CON/guest-$name.log" > "$o.console"
  { xenstore-ls -fp "/local/domain/0/backend/pci/$d" 2>&1; echo; xenstore-ls -fp "/local/domain/$d/device/pci" 2>&1
    xenstore-ls -fp "/local/domain/0/error" 2>/dev/null; } > "$o.xenstore"
  sed -n '/^LANE-DOMU-DEV /,/^LANE-DOMU-DEV-END/p' "$o.console" > "$o.lspci"
  if grep -q "^LANE-DOMU-DEV .* $vid\$" "$o.lspci"; then
    result "$dev" "$mode" domu-sees-device PASS "$(grep '^LANE-DOMU-DEV ' "$o.lspci" | head -1 | cut -d' ' -f2-)"
  elif grep -q LANE-DOMU-END "$o.console"; then
    result "$dev" "$mode" domu-sees-device FAIL "$(grep LANE-DOMU-END "$o.console")"
  else
    result "$dev" "$mode" domu-sees-device FAIL "domU reported nothing within ${LANE_DOMU_TIMEOUT}s"
  fi
  [ "$dev" = "$PERF_DEV" ] && [ -z "$SFX" ] && perf_checks "$dev" "$mode" "$name" "$d"
}

# What the guest feels (both modes, one device): the time of its enumeration of
# the function (remove + rescan) and of LANE_PERF_READS config reads of one
# register (fewer when LANE_PERF_SECONDS pass first: a loaded emulator)
PERF_DEV=${LANE_PERF_DEV:-edu}; LANE_PERF_READS=${LANE_PERF_READS:-0}; LANE_PERF_SECONDS=${LANE_PERF_SECONDS:-90}
perf_args() { [ "$1" = "$PERF_DEV" ] && [ "$LANE_PERF_READS" -gt 0 ] && [ -z "$SFX" ] && echo "lane.perf=$LANE_PERF_READS lane.perfsecs=$LANE_PERF_SECONDS"; }
perf_checks() { # dev mode name domid
  [ "$LANE_PERF_READS" -gt 0 ] || return 0
  local l
  poll $(( LANE_PERF_SECONDS + 240 )) con_has "$3" LANE-PERF-END
  tr -d '\r' < "$CON/guest-$3.log" > "$OUT/$1.$2.console"
  if ! con_has "$3" LANE-PERF-END; then
    result "$1" "$2" guest-timing FAIL "no LANE-PERF-END from the domU; last: $(grep LANE-PERF "$OUT/$1.$2.console" | tail -2 | tr '\n' ';')"; return
  fi
  l=$(con_line "$3" '^LANE-PERF ')
  # changed=N: reads that did not return the register's value (an op that failed
  # or timed out in pcifront); shown, not judged: xen-pciback has them too under load
  if [ "$(field "$l" reads)" -gt 0 ] 2>/dev/null; then
    result "$1" "$2" guest-timing INFO "${l#LANE-PERF }"
  else result "$1" "$2" guest-timing FAIL "${l#LANE-PERF }"; fi
  [ "$2" = pcibackd ] || return 0
  # the worker's own view of the same ops: its service time per op (p50/p99)
  # against the guest's round trip shows what the transport and wake-up cost
  timeout 240 $LANE_PY -m pcibackd.control.cli --json --timeout 60 status > "$OUT/$1.pcibackd.status.json" 2>&1 || echo "rc=$?" >> "$OUT/$1.pcibackd.status.json"
  result "$1" pcibackd worker-op-latency INFO "$(timeout 120 $LANE_PY -c '
import json, sys
for g in json.load(open(sys.argv[1]))["guests"]:
    if g["domid"] == int(sys.argv[2]):
        print("served=%d latency_us=%s cpu=%s" % (sum(g["served"].values()), g.get("latency_us"), g.get("cpu_percent")))
' "$OUT/$1.pcibackd.status.json" "$4" 2>&1 | tail -1)"
}

destroy_and_check() { # dev mode name domid
  local dev=$1 mode=$2 name=$3 d=$4
  xl destroy "$name" >> "$OUT/xl-$dev-$mode.log" 2>&1 || result "$dev" "$mode" xl-destroy FAIL "rc=$?"
  if poll "$LANE_CLEAN_TIMEOUT" xs_gone "/local/domain/0/backend/pci/$d"; then
    result "$dev" "$mode" backend-nodes-removed PASS ""
  else
    result "$dev" "$mode" backend-nodes-removed FAIL "$(xenstore-ls -f "/local/domain/0/backend/pci/$d" 2>&1 | head -5 | tr '\n' ' ')"
  fi
  if poll 5 xs_gone "/local/domain/$d"; then result "$dev" "$mode" domain-nodes-removed PASS ""
  else result "$dev" "$mode" domain-nodes-removed FAIL "/local/domain/$d still present"; fi
}

# ------------------------------------------------------------ mode kernel
# Devices whose first guest loses the function by hot-unplug (MSI-X live), then
# a second guest gets it and drives it again.
LANE_REPEAT_DEVS=${LANE_REPEAT_DEVS:-nvme}
repeats() { [[ " $LANE_REPEAT_DEVS " == *" $1 "* ]]; }
kernel_create() { # dev name -> sets KD (domid) or returns 1
  local dev=$1 bdf=${BDF[$1]} name=$2 attempt ok
  write_cfg "$name" "$(perf_args "$dev")"; echo "pci = [ '$bdf' ]" >> "/tmp/$name.cfg"
  log "$dev/kernel: xl create $name (pci=$bdf)"
  for attempt in 1 2; do
    ok=1
    xl create "/tmp/$name.cfg" > /tmp/xl-create.log 2>&1 || ok=""
    cat /tmp/xl-create.log >> "$OUT/xl-$dev-kernel.log"
    # libxl waits a fixed 10 s for xen-pciback; a loaded TCG host can miss that
    # (the domain then runs without its device).  The kernel run is the
    # reference, not the subject: retry it once.
    grep -q "wait_for_backend.*not ready" /tmp/xl-create.log || break
    result "$dev" kernel xl-create INFO "attempt $attempt: libxl's 10 s wait for xen-pciback ran out"
    xl destroy "$name" >/dev/null 2>&1; ok=""
  done
  [ -n "$ok" ] || { result "$dev" kernel xl-create FAIL "see xl-$dev-kernel.log"; return 1; }
  KD=$(xl domid "$name"); log "$dev/kernel: domain $KD created"
  collect "$dev" kernel "$name" "$KD"
  drive_checks "$dev" kernel "$name" "$bdf"
  return 0    # the domain exists: the caller must destroy it
}
kernel_destroy() { # dev name domid
  destroy_and_check "$1" kernel "$2" "$3"
  # the header xen-pciback leaves while it still holds the function (the lifecycle scenario compares)
  header_of "${BDF[$1]}" > "$BM_KERNEL_DIR/$1.header.after-destroy"
  msi_off_after "$1" kernel "${BDF[$1]}"
  pirq_check "$1" kernel "$3" "${BDF[$1]}" destroy
}
run_kernel() { # dev
  local dev=$1 bdf=${BDF[$1]} name=lane-$1-kernel
  phase "$dev/kernel"
  xen_irq_baseline
  xl pci-assignable-add "$bdf" >> "$OUT/xl-$dev-kernel.log" 2>&1 || { result "$dev" kernel assignable FAIL "xl pci-assignable-add $bdf"; return; }
  busmaster_at_seize "$dev" kernel "$bdf"
  if kernel_create "$dev" "$name"; then
    if repeats "$dev"; then
      phase "$dev/kernel: hot-unplug, second guest"
      if xl pci-detach "$name" "$bdf" >> "$OUT/xl-$dev-kernel.log" 2>&1; then result "$dev" kernel hot-unplug PASS "xl pci-detach"
      else result "$dev" kernel hot-unplug FAIL "xl pci-detach rc=$?"; fi
      msi_off_after "$dev" kernel "$bdf" unplug
      pirq_check "$dev" kernel "$KD" "$bdf" unplug
      destroy_and_check "$dev" kernel "$name" "$KD"
      SFX=@2 TAG=.2
      kernel_create "$dev" "$name-2" && kernel_destroy "$dev" "$name-2" "$KD"
      SFX="" TAG=""
    else
      kernel_destroy "$dev" "$name" "$KD"
    fi
  else xl pci-assignable-remove "$bdf" >/dev/null 2>&1; return; fi
  busmaster_after "$dev" kernel "$bdf" destroy
  xl pci-assignable-remove "$bdf" >> "$OUT/xl-$dev-kernel.log" 2>&1 || result "$dev" kernel assignable-remove FAIL ""
  busmaster_after "$dev" kernel "$bdf" return
}

# ------------------------------------------------------------ mode pcibackd
DPID=""
# The daemon starts as etc/pcibackd.service says (daemonctl.py unit-start: its
# ExecStartPre and ExecStart lines, Environment=, the watchdog, UMask=,
# LimitNOFILE=, NoNewPrivileges=), the installed /usr/local/sbin/pcibackd being
# the checkout's venv entry point.  Its config is where the unit's daemon looks
# for it, /etc/pcibackd/pcibackd.toml: /etc gets a tmpfs overlay (the host's / is
# read-only here).  LANE_DAEMON_CMD (a command line) bypasses the unit.
UNIT=$LANE_REPO/etc/pcibackd.service
PBLOG=$OUT/pcibackd.log                    # the running daemon's log (the checks grep it)
VENV_BIN=$(dirname "$LANE_PY")
UNIT_ARGS=(--map "/usr/local/sbin/pcibackd=$VENV_BIN/pcibackd" --env PYTHONFAULTHANDLER=1)
PB_STATE=/run/lane-var-lib/pcibackd        # StateDirectory= (a tmpfs: /var/lib is the host's, read-only)
PB_CONF=/etc/pcibackd/pcibackd.toml
NOTIFY_LOG=$OUT/notify.log
writable() { # dir: a tmpfs overlay on it, so files can be added under a read-only host path
  local u; u=/run/lane-overlay/$(echo "$1" | tr / _)
  mkdir -p "$u/upper" "$u/work"
  mount -t overlay overlay -o "lowerdir=$1,upperdir=$u/upper,workdir=$u/work" "$1"
}
daemon_config() { # the config file the lane's daemon reads (hide: BDFs)
  local extra=()
  if [ -n "${LANE_DAEMON_CMD:-}" ]; then PB_CONF=/run/lane-pcibackd.toml
  elif kmod overlay 2>/dev/null && writable /etc 2>> "$OUT/dom0.log" && mkdir -p /etc/pcibackd; then :
  else PB_CONF=/run/lane-pcibackd.toml; extra=(--config "$PB_CONF")
    result all pcibackd unit-config-path INFO "/etc not writable (no overlayfs?): --config $PB_CONF appended to ExecStart"; fi
  mkdir -p "$PB_STATE"; chmod 0700 "$PB_STATE"
  # Python under TCG on a shared host: a worker's boot took 60 s and more, and time dom0's
  # vCPU did not run counts as a worker's own time (the defaults suit real hardware)
  { echo "# written by the Xen lane (dom0-main.sh)"; echo "[pcibackd]"; echo "state_dir = \"$PB_STATE\""
    echo "heartbeat_timeout = ${LANE_HEARTBEAT_TIMEOUT:-300}"; echo "boot_timeout = ${LANE_BOOT_TIMEOUT:-600}"
    echo "stuck_op_seconds = ${LANE_STUCK_OP_SECONDS:-30}"
    echo "[devices]"; echo "hide = [$(for b in "$@"; do printf '"%s", ' "$b"; done | sed 's/, $//')]"; } > "$PB_CONF"
  cp "$PB_CONF" "$OUT/pcibackd.toml"
  UNIT_ARGS+=(--env "STATE_DIRECTORY=$PB_STATE")
  [ ${#extra[@]} = 0 ] || UNIT_ARGS+=(-- "${extra[@]}")
}
start_daemon() { # [BDF to hide...]
  kmod pci-stub || { result all pcibackd pci-stub FAIL "modprobe pci-stub"; return 1; }
  if grep -q '^xen_pciback ' /proc/modules; then result all pcibackd kernel-backend-absent FAIL "xen_pciback is loaded"; return 1; fi
  result all pcibackd kernel-backend-absent PASS "xen_pciback not loaded"
  daemon_config "$@"
  local rc=0
  if [ -n "${LANE_DAEMON_CMD:-}" ]; then
    log "starting: $DAEMON_CMD"
    # shellcheck disable=SC2086
    $DAEMONCTL start /run/lane-pcibackd.pid "$OUT/pcibackd.log" 90 -- $DAEMON_CMD --config "$PB_CONF" >> $OUT/dom0.log 2>&1 || rc=$?
  else
    log "starting through $UNIT (config $PB_CONF)"
    $DAEMONCTL unit-start "$UNIT" /run/lane-pcibackd.pid "$OUT/pcibackd.log" "$NOTIFY_LOG" 90 "${UNIT_ARGS[@]}" > /tmp/unit-start.log 2>&1 || rc=$?
    cat /tmp/unit-start.log >> $OUT/dom0.log
  fi
  if [ $rc = 0 ]; then
    DPID=$(cat /run/lane-pcibackd.pid); result all pcibackd daemon-ready PASS "pid $DPID $(grep -m1 '^ExecStart=' /tmp/unit-start.log 2>/dev/null)"
  else
    result all pcibackd daemon-ready FAIL "$(tail -1 $OUT/dom0.log); see pcibackd.log"; return 1
  fi
}

backend_past_initwait() { local st; st=$(xenstore-read "/local/domain/0/backend/pci/$1/0/state" 2>/dev/null); [ "${st:-0}" -ge 3 ]; }

tree_of() { # pid -> "pid args" of each descendant (ps, not python: a python start costs seconds here)
  ps -e -o pid=,ppid=,args= | awk -v root="$1" '
    { pid[NR] = $1; ppid[NR] = $2; line[NR] = $0 }
    END { want[root] = 1
          do { changed = 0
               for (i = 1; i <= NR; i++) if (want[ppid[i]] && !want[pid[i]]) { want[pid[i]] = 1; changed = 1 } } while (changed)
          for (i = 1; i <= NR; i++) if (want[pid[i]] && pid[i] != root) print line[i] }'
}
tree_within() { # baseline-file: the daemon's descendants are back to the baseline
  # (the xenstore gate is the daemon's own, not a guest's: it stays up to a minute after its
  # last worker, so that the next guest does not wait for a new one)
  tree_of "$DPID" | grep -v 'pcibackd: xenstore gate' | awk '{print $1}' | sort > /tmp/tree.now
  [ -z "$(comm -13 "$1" /tmp/tree.now)" ]
}

pb_create() { # dev name -> sets PD (domid); attach, seize checks, unpause, the guest's checks
  local dev=$1 bdf=${BDF[$1]} name=$2 d cmd
  write_cfg "$name" "$(perf_args "$dev")"; echo 'passthrough = "enabled"' >> "/tmp/$name.cfg"
  log "$dev/pcibackd: xl create -p $name (no pci=)"
  if ! xl create -p "/tmp/$name.cfg" >> "$OUT/xl-$dev-pcibackd.log" 2>&1; then
    result "$dev" pcibackd xl-create FAIL "see xl-$dev-pcibackd.log"; return 1
  fi
  d=$(xl domid "$name"); PD=$d; log "$dev/pcibackd: domain $d created (paused)"
  cmd=${ATTACH_CMD//\{domid\}/$d}; cmd=${cmd//\{bdf\}/$bdf}
  log "$dev/pcibackd: $cmd"
  if bash -c "$cmd" >> "$OUT/attach-$dev.log" 2>&1; then
    if xenstore-exists "/local/domain/0/backend/pci/$d/0/dev-0" && xenstore-exists "/local/domain/$d/device/pci/0/backend"; then
      result "$dev" pcibackd attach PASS "domid $d"
    else
      result "$dev" pcibackd attach FAIL "exit 0 but no backend/frontend nodes for domain $d"
      xl destroy "$name" >> "$OUT/xl-$dev-pcibackd.log" 2>&1; return 1
    fi
  else
    result "$dev" pcibackd attach FAIL "rc=$? see attach-$dev.log: $(tail -1 "$OUT/attach-$dev.log")"
    xl destroy "$name" >> "$OUT/xl-$dev-pcibackd.log" 2>&1; return 1
  fi
  if [ "$(driver_of "$bdf")" = pci-stub ]; then result "$dev" pcibackd held-by-pci-stub PASS ""
  else result "$dev" pcibackd held-by-pci-stub FAIL "driver=$(driver_of "$bdf") override=$(cat /sys/bus/pci/devices/$bdf/driver_override)"; fi
  # the header as the worker took it (it is exported before the backend leaves InitWait)
  poll 30 backend_past_initwait "$d" || result "$dev" pcibackd backend-initialised FAIL "state $(xenstore-read "/local/domain/0/backend/pci/$d/0/state" 2>&1)"
  header_of "$bdf" > "/tmp/$dev.header.seized"
  busmaster_at_seize "$dev" pcibackd "$bdf"
  xl unpause "$name" || result "$dev" pcibackd xl-unpause FAIL "rc=$?"
  log "$dev/pcibackd: domain $d unpaused"
  collect "$dev" pcibackd "$name" "$d"
  tree_of "$DPID" > "$OUT/$dev$TAG.pcibackd.processes"
  # (no <(...) here: the chroot's devtmpfs has no /dev/fd)
  awk '{print $1}' "$OUT/$dev$TAG.pcibackd.processes" | sort > /tmp/tree.running
  result "$dev" pcibackd worker-running INFO "$(comm -13 /tmp/tree.base /tmp/tree.running | wc -l) new process(es) under the daemon"
  drive_checks "$dev" pcibackd "$name" "$bdf"
  local p held=""
  for p in $(comm -13 /tmp/tree.base /tmp/tree.running); do
    ls -l "/proc/$p/fd" 2>/dev/null | grep -q '/dev/xen/privcmd' && held="$held $p"
  done
  if [ -z "$held" ]; then result "$dev" pcibackd worker-no-privcmd PASS "(the supervisor holds $(ls -l "/proc/$DPID/fd" 2>/dev/null | grep -c privcmd))"
  else result "$dev" pcibackd worker-no-privcmd FAIL "privcmd open in pid(s)$held"; fi
  return 0    # the domain exists: the caller must destroy it
}
journal_empty() { # dev domid when: the broker's journal holds a guest's file only while it has PIRQs mapped
  local j=/run/pcibackd/irq/dom$2.json
  if poll 10 test ! -e "$j"; then result "$1" pcibackd "no-pirq-journaled-after-$3" PASS "$(cat /run/pcibackd/irq/prepared.json 2>/dev/null)"
  else result "$1" pcibackd "no-pirq-journaled-after-$3" FAIL "$(cat "$j")"; fi
}
pb_unplug() { # dev name domid: hot-unplug through the toolstack, the function back to dom0
  local dev=$1 bdf=${BDF[$1]} d=$3 cmd
  cmd=${DETACH_CMD//\{domid\}/$d}; cmd=${cmd//\{bdf\}/$bdf}
  log "$dev/pcibackd: $cmd"
  if bash -c "$cmd" >> "$OUT/attach-$dev.log" 2>&1; then result "$dev" pcibackd hot-unplug PASS "$(tail -1 "$OUT/attach-$dev.log")"
  else result "$dev" pcibackd hot-unplug FAIL "rc=$? see attach-$dev.log: $(tail -1 "$OUT/attach-$dev.log")"; fi
  msi_off_after "$dev" pcibackd "$bdf" unplug
  journal_empty "$dev" "$d" unplug
  pirq_check "$dev" pcibackd "$d" "$bdf" unplug
  if [ "$(driver_of "$bdf")" != pci-stub ] && [ -z "$(cat "/sys/bus/pci/devices/$bdf/driver_override" 2>/dev/null | grep -v '(null)')" ]; then
    result "$dev" pcibackd returned-to-dom0 PASS "driver=$(driver_of "$bdf")"
  else result "$dev" pcibackd returned-to-dom0 FAIL "driver=$(driver_of "$bdf") override=$(cat "/sys/bus/pci/devices/$bdf/driver_override")"; fi
  busmaster_after "$dev" pcibackd "$bdf" return
  destroy_and_check "$dev" pcibackd "$2" "$d"
}
pb_destroy() { # dev name domid: xl destroy, the worker's release, nothing of the guest left
  local dev=$1 bdf=${BDF[$1]} d=$3 released
  destroy_and_check "$dev" pcibackd "$2" "$d"
  msi_off_after "$dev" pcibackd "$bdf"
  journal_empty "$dev" "$d" destroy
  pirq_check "$dev" pcibackd "$d" "$bdf" destroy
  if poll "$LANE_CLEAN_TIMEOUT" tree_within /tmp/tree.base; then result "$dev" pcibackd worker-gone PASS ""
  else result "$dev" pcibackd worker-gone FAIL "left: $(tree_of "$DPID" | tr '\n' ';')"; fi
  if [ "$(driver_of "$bdf")" = pci-stub ]; then result "$dev" pcibackd held-after-destroy PASS ""
  else result "$dev" pcibackd held-after-destroy FAIL "driver=$(driver_of "$bdf")"; fi
  released=$(grep "released $bdf" "$PBLOG" | tail -1 | sed 's/.*released/released/')
  header_of "$bdf" > "/tmp/$dev.header.after"
  if [ -z "$released" ]; then result "$dev" pcibackd released-as-seized FAIL "no 'released $bdf' in ${PBLOG##*/}"
  elif cmp -s "/tmp/$dev.header.seized" "/tmp/$dev.header.after"; then result "$dev" pcibackd released-as-seized PASS "$released"
  else result "$dev" pcibackd released-as-seized FAIL "header differs: $(diff "/tmp/$dev.header.seized" "/tmp/$dev.header.after" | tr '\n' ' ')"; fi
  busmaster_after "$dev" pcibackd "$bdf" destroy
}
run_pcibackd() { # dev
  local dev=$1 name=lane-$1-pcibackd
  phase "$dev/pcibackd"
  xen_irq_baseline
  tree_of "$DPID" | awk '{print $1}' | sort > /tmp/tree.base
  # the kernel-mode run may have left Bus Master off: give pcibackd's seize the
  # function as the firmware left it (no controller runs: the reset stopped it)
  if [ "${BM_BOOT[$dev]:-off}" = on ] && [ "$(bm_of "${BDF[$dev]}")" = off ]; then
    setpci -s "${BDF[$dev]}" COMMAND="$(printf '%04x' $(( $(cmd_of "${BDF[$dev]}") | 4 )))"
    result "$dev" pcibackd busmaster-as-firmware-left INFO "Bus Master set again before the seize: COMMAND $(cmd_hex "${BDF[$dev]}")"
  fi
  pb_create "$dev" "$name" || return
  if repeats "$dev"; then
    phase "$dev/pcibackd: hot-unplug, second guest"
    pb_unplug "$dev" "$name" "$PD"
    SFX=@2 TAG=.2
    pb_create "$dev" "$name-2" && pb_destroy "$dev" "$name-2" "$PD"
    SFX="" TAG=""
  else
    pb_destroy "$dev" "$name" "$PD"
  fi
  if kill -0 "$DPID" 2>/dev/null; then result "$dev" pcibackd daemon-alive PASS ""
  else result "$dev" pcibackd daemon-alive FAIL "pcibackd died"; fi
}

# ------------------------------------------------------------ the unit's reload and notify
PBCTL() { timeout 240 "$VENV_BIN/pcibackctl" "$@"; }
reload_check() { # ExecReload (check-config, then SIGHUP), once; the daemon still serves after it
  [ -z "${LANE_DAEMON_CMD:-}" ] || return 0
  phase "pcibackd: ExecReload"
  local before out rc=0
  before=$(grep -c 'RELOADING=1' "$NOTIFY_LOG")
  $DAEMONCTL unit-reload "$UNIT" /run/lane-pcibackd.pid "${UNIT_ARGS[@]}" > /tmp/unit-reload.log 2>&1 || rc=$?
  cat /tmp/unit-reload.log >> "$OUT/dom0.log"
  if [ $rc = 0 ]; then result all pcibackd exec-reload PASS "$(tr '\n' ';' < /tmp/unit-reload.log)"
  else result all pcibackd exec-reload FAIL "rc=$rc: $(tr '\n' ';' < /tmp/unit-reload.log)"; return; fi
  # RELOADING=1 then READY=1 again (Type=notify: systemctl reload waits for that READY=1)
  reloaded() { [ "$(grep -c 'RELOADING=1' "$NOTIFY_LOG")" -gt "$before" ] && sed -n '/RELOADING=1/,$p' "$NOTIFY_LOG" | tail -n +2 | grep -q 'READY=1'; }
  if poll 60 reloaded; then result all pcibackd reload-notified PASS "$(grep 'RELOADING=1' "$NOTIFY_LOG" | tail -1)"
  else result all pcibackd reload-notified FAIL "no RELOADING=1 then READY=1 after SIGHUP: $(tail -3 "$NOTIFY_LOG" | tr '\n' ';')"; fi
  out=$(PBCTL status 2>&1); rc=$?
  if [ $rc = 0 ] && kill -0 "$DPID" 2>/dev/null; then result all pcibackd serving-after-reload PASS "pid $DPID; $(grep -m1 'SIGHUP' "$PBLOG" | cut -c1-160)"
  else result all pcibackd serving-after-reload FAIL "pcibackctl status rc=$rc: $(echo "$out" | tail -2 | tr '\n' ';')"; fi
}
notify_checks() { # what systemd would have made of the notify messages (NotifyAccess=main, WatchdogSec=)
  [ -z "${LANE_DAEMON_CMD:-}" ] || return 0
  local others wd gap
  others=$(grep -v " pid=$DPID " "$NOTIFY_LOG" | head -3 | tr '\n' ';')
  if [ -z "$others" ]; then result all pcibackd notify-from-main PASS "$(wc -l < "$NOTIFY_LOG") message(s), all from the main pid $DPID (NotifyAccess=main)"
  else result all pcibackd notify-from-main FAIL "from another pid (systemd drops them): $others"; fi
  wd=$(sed -n 's/^WatchdogSec=//p' "$UNIT" | tail -1); wd=${wd%s}
  # the longest silence between watchdog pings (and from READY=1 to the first)
  gap=$(grep -E 'READY=1|WATCHDOG=1' "$NOTIFY_LOG" | awk '{ t = $1 } NR > 1 && t - p > g { g = t - p } { p = t } END { printf "%.1f", g + 0 }')
  if [ "$(grep -c 'WATCHDOG=1' "$NOTIFY_LOG")" -gt 0 ] && awk -v g="$gap" -v w="$wd" 'BEGIN { exit !(g < w) }'; then
    result all pcibackd watchdog-pings PASS "$(grep -c 'WATCHDOG=1' "$NOTIFY_LOG") WATCHDOG=1, longest gap ${gap}s < WatchdogSec=${wd}s"
  else result all pcibackd watchdog-pings FAIL "$(grep -c 'WATCHDOG=1' "$NOTIFY_LOG") WATCHDOG=1, longest gap ${gap}s (WatchdogSec=${wd}s: systemd would have killed it)"; fi
}

# ------------------------------------------------------------ an administrator's lifecycle
# Two functions (LANE_LIFECYCLE, default pci-testdev then edu): the first hidden at
# daemon start ([devices] hide), the second made assignable by command; an
# unchanged xl config with pci=['first'] created by `pcibackctl create`, the
# second hot-plugged into the running guest; `xl destroy` gives both back to
# the pool as they were; `assignable-remove -r` gives them back to dom0.
LANE_LIFECYCLE=${LANE_LIFECYCLE:-pci-testdev edu}
declare -a LC=()
declare -A LC_ORIG
lifecycle_plan() { # -> LC (two devices with a BDF) or nothing
  local dev; LC=()
  for dev in $LANE_LIFECYCLE; do [ -n "${BDF[$dev]:-}" ] && LC+=("$dev"); done
  if [ ${#LC[@]} -lt 2 ]; then
    [ -z "$LANE_LIFECYCLE" ] || result lifecycle pcibackd scenario INFO "skipped: needs two of '$LANE_LIFECYCLE' among the devices"
    LC=(); return
  fi
  LC=("${LC[0]}" "${LC[1]}")
  for dev in "${LC[@]}"; do LC_ORIG[$dev]=$(driver_of "${BDF[$dev]}"); done
}
in_pool() { PBCTL assignable-list > /tmp/pool.list 2>&1 && grep -qx "$1" /tmp/pool.list; }
pool_entry() { # bdf -> "driver=X source=Y" from pool.json
  timeout 60 "$LANE_PY" -c 'import json, sys
for f in json.load(open(sys.argv[1]))["functions"]:
    if f["bdf"] == sys.argv[2]:
        print("driver=%s source=%s" % (f["driver"] or "none", f["source"]))' "$PB_STATE/pool.json" "$1" 2>&1
}
backend_connected() { [ "$(xenstore-read "/local/domain/0/backend/pci/$1/0/state" 2>/dev/null)" = 4 ]; }
run_lifecycle() {
  [ ${#LC[@]} = 2 ] || return 0
  local d1=${LC[0]} d2=${LC[1]} b1=${BDF[${LC[0]}]} b2=${BDF[${LC[1]}]} name=lane-lifecycle d out rc dev b
  local L=lifecycle log=$OUT/lifecycle.log
  phase "lifecycle/pcibackd: hide, create, hot-plug, destroy, give back"
  xen_irq_baseline
  tree_of "$DPID" | awk '{print $1}' | sort > /tmp/tree.base
  # 1. hidden at start: in the pool, on the stub, its original driver in pool.json
  if in_pool "$b1"; then result $L pcibackd hidden-at-start PASS "$d1 $b1 in assignable-list"
  else result $L pcibackd hidden-at-start FAIL "$d1 $b1 not in assignable-list: $(tr '\n' ';' < /tmp/pool.list)"; fi
  if [ "$(driver_of "$b1")" = pci-stub ]; then result $L pcibackd hidden-on-stub PASS "$b1 driver=pci-stub"
  else result $L pcibackd hidden-on-stub FAIL "$b1 driver=$(driver_of "$b1")"; fi
  out=$(pool_entry "$b1")
  if [ "$out" = "driver=${LC_ORIG[$d1]} source=hide" ]; then result $L pcibackd pool-original-driver PASS "pool.json: $b1 $out (dom0 had ${LC_ORIG[$d1]})"
  else result $L pcibackd pool-original-driver FAIL "pool.json: '$out', dom0 had driver=${LC_ORIG[$d1]}"; fi
  # 2. the second one by command
  out=$(PBCTL assignable-add "$b2" 2>&1); rc=$?; echo "assignable-add $b2: rc=$rc $out" >> "$log"
  if [ $rc = 0 ] && in_pool "$b2" && [ "$(driver_of "$b2")" = pci-stub ]; then result $L pcibackd assignable-add PASS "$d2 $b2: $out"
  else result $L pcibackd assignable-add FAIL "rc=$rc $out; driver=$(driver_of "$b2"); pool: $(tr '\n' ';' < /tmp/pool.list)"; fi
  for dev in "${LC[@]}"; do header_of "${BDF[$dev]}" > "/tmp/$dev.header.pooled"; done
  # 3. an unchanged xl config with pci=: pcibackctl create
  write_cfg "$name" "lane.ndev=2 lane.wait=240"; echo "pci = [ '$b1' ]" >> "/tmp/$name.cfg"
  cp "/tmp/$name.cfg" "$OUT/lifecycle.cfg"
  log "lifecycle: pcibackctl create $name (pci=$b1)"
  out=$(PBCTL --timeout 60 create --xl "$XL" "/tmp/$name.cfg" 2>&1); rc=$?; echo "create: rc=$rc $out" >> "$log"
  if [ $rc = 0 ] && d=$(xl domid "$name" 2>/dev/null); then result $L pcibackd create PASS "domid $d: $(echo "$out" | tail -1)"
  else result $L pcibackd create FAIL "rc=$rc $(echo "$out" | tr '\n' ';')"; lifecycle_cleanup "$name"; return; fi
  if poll 180 backend_connected "$d"; then result $L pcibackd backend-connected PASS "domain $d backend state 4"
  else result $L pcibackd backend-connected FAIL "backend state $(xenstore-read "/local/domain/0/backend/pci/$d/0/state" 2>&1)"; fi
  # 4. hot-plug the second into the running guest
  out=$(PBCTL --timeout 120 pci-attach "$name" "$b2" 2>&1); rc=$?; echo "pci-attach: rc=$rc $out" >> "$log"
  if [ $rc = 0 ]; then result $L pcibackd pci-attach PASS "$b2 into $name: $(echo "$out" | tail -1)"
  else result $L pcibackd pci-attach FAIL "rc=$rc $(echo "$out" | tr '\n' ';')"; fi
  poll 260 domu_reported "$name"
  tr -d '\r' < "$CON/guest-$name.log" > "$OUT/lifecycle.pcibackd.console"
  local seen=""; for dev in "${LC[@]}"; do grep -q "^LANE-DOMU-DEV .* $(vid_of "$dev")\$" "$OUT/lifecycle.pcibackd.console" && seen="$seen $dev"; done
  if [ "$seen" = " $d1 $d2" ]; then result $L pcibackd domu-sees-both PASS "$(grep '^LANE-DOMU-DEV ' "$OUT/lifecycle.pcibackd.console" | cut -d' ' -f2- | tr '\n' ';')"
  else result $L pcibackd domu-sees-both FAIL "seen:${seen:- none}; $(grep -E '^LANE-DOMU-(DEV|END) ' "$OUT/lifecycle.pcibackd.console" | tr '\n' ';')"; fi
  out=$(PBCTL pci-list "$name" 2>&1); rc=$?; echo "pci-list: rc=$rc $out" >> "$log"
  if [ $rc = 0 ] && echo "$out" | grep -q "$b1" && echo "$out" | grep -q "$b2" && [ "$(echo "$out" | grep -c '0000:')" = 2 ]; then
    result $L pcibackd pci-list PASS "$(echo "$out" | tr -s ' ' | tr '\n' ';')"
  else result $L pcibackd pci-list FAIL "rc=$rc $(echo "$out" | tr '\n' ';')"; fi
  # 5. bad input: a function this host does not have (exit 6: no such guest or device)
  out=$(PBCTL pci-attach "$name" 0000:0a:00.0 2>&1); rc=$?; echo "pci-attach 0000:0a:00.0: rc=$rc $out" >> "$log"
  if [ $rc = 6 ] && echo "$out" | grep -q '0000:0a:00.0'; then result $L pcibackd bad-bdf-refused PASS "exit 6: $(echo "$out" | tail -1)"
  else result $L pcibackd bad-bdf-refused FAIL "exit $rc (want 6 naming the function): $(echo "$out" | tr '\n' ';')"; fi
  # 6. xl destroy: both back in the pool, on the stub, with the header they had there
  destroy_and_check $L pcibackd "$name" "$d"
  pirq_check $L pcibackd "$d" "$b1" destroy
  if poll "$LANE_CLEAN_TIMEOUT" tree_within /tmp/tree.base; then result $L pcibackd worker-gone PASS ""
  else result $L pcibackd worker-gone FAIL "left: $(tree_of "$DPID" | tr '\n' ';')"; fi
  for dev in "${LC[@]}"; do
    b=${BDF[$dev]}
    poll 60 grep -q "released $b" "$PBLOG"
    if in_pool "$b" && [ "$(driver_of "$b")" = pci-stub ]; then result "$dev" pcibackd lifecycle-back-in-pool PASS "$b in assignable-list, driver=pci-stub"
    else result "$dev" pcibackd lifecycle-back-in-pool FAIL "driver=$(driver_of "$b"); pool: $(tr '\n' ';' < /tmp/pool.list)"; fi
    header_of "$b" > "/tmp/$dev.header.lc-after"
    local rel; rel=$(grep "released $b" "$PBLOG" | tail -1 | sed 's/.*released/released/')
    if [ -z "$rel" ]; then result "$dev" pcibackd lifecycle-restored FAIL "no 'released $b' in ${PBLOG##*/}"
    elif cmp -s "/tmp/$dev.header.pooled" "/tmp/$dev.header.lc-after"; then result "$dev" pcibackd lifecycle-restored PASS "header as in the pool before the guest; $rel"
    else result "$dev" pcibackd lifecycle-restored FAIL "header differs: $(diff "/tmp/$dev.header.pooled" "/tmp/$dev.header.lc-after" | tr '\n' ' ')"; fi
    if [ ! -e "$BM_KERNEL_DIR/$dev.header.after-destroy" ]; then result "$dev" pcibackd lifecycle-like-kernel INFO "no kernel-mode run to compare"
    elif cmp -s "$BM_KERNEL_DIR/$dev.header.after-destroy" "/tmp/$dev.header.lc-after"; then result "$dev" pcibackd lifecycle-like-kernel PASS "header as xen-pciback leaves it after xl destroy (COMMAND $(cmd_hex "$b"))"
    else result "$dev" pcibackd lifecycle-like-kernel FAIL "xen-pciback leaves: $(diff "$BM_KERNEL_DIR/$dev.header.after-destroy" "/tmp/$dev.header.lc-after" | tr '\n' ' ')"; fi
  done
  # 7. assignable-remove -r: back to the dom0 driver each had before pcibackd took it
  for dev in "${LC[@]}"; do
    b=${BDF[$dev]}
    out=$(PBCTL assignable-remove -r "$b" 2>&1); rc=$?; echo "assignable-remove -r $b: rc=$rc $out" >> "$log"
    local ovr; ovr=$(cat "/sys/bus/pci/devices/$b/driver_override" 2>/dev/null)
    if [ $rc = 0 ] && [ "$(driver_of "$b")" = "${LC_ORIG[$dev]}" ] && ! in_pool "$b" && [ "$ovr" = "(null)" -o -z "$ovr" ]; then
      result "$dev" pcibackd lifecycle-given-back PASS "driver=$(driver_of "$b") as before pcibackd took it (original: ${LC_ORIG[$dev]}); $out"
    else result "$dev" pcibackd lifecycle-given-back FAIL "rc=$rc $out; driver=$(driver_of "$b") (original ${LC_ORIG[$dev]}) override=$ovr"; fi
  done
}
lifecycle_cleanup() { # name: after a failed step, nothing of the scenario left for the next ones
  xl destroy "$1" >/dev/null 2>&1
  # refused while the daemon has not yet seen the guest's backend go: retried
  local dev; for dev in "${LC[@]}"; do poll 60 PBCTL assignable-remove -r "${BDF[$dev]}" >> "$OUT/lifecycle.log" 2>&1; done
}

# ------------------------------------------------------------ scenarios
if [[ " $LANE_MODES " == *" kernel "* ]]; then
  phase "kernel: load xen-pciback"
  kmod xen-pciback && log "xen-pciback loaded"
  for dev in $LANE_DEVICES; do [ -n "${BDF[$dev]}" ] && run_kernel "$dev"; done
  phase "kernel: unload xen-pciback"
  kmod -r xen-pciback && log "xen-pciback unloaded" || result all kernel rmmod-xen-pciback FAIL "$(lsmod | grep pciback)"
fi
if [[ " $LANE_MODES " == *" pcibackd "* ]]; then
  phase "pcibackd: start the daemon"
  lifecycle_plan
  if start_daemon ${LC[0]:+"${BDF[${LC[0]}]}"}; then
    run_lifecycle
    reload_check
    for dev in $LANE_DEVICES; do [ -n "${BDF[$dev]}" ] && run_pcibackd "$dev"; done
    phase "pcibackd: stop the daemon"
    if [ -n "${LANE_DAEMON_CMD:-}" ]; then stop=(stop /run/lane-pcibackd.pid 10); else stop=(unit-stop "$UNIT" /run/lane-pcibackd.pid); fi
    if $DAEMONCTL "${stop[@]}" >> $OUT/dom0.log 2>&1; then result all pcibackd daemon-stop PASS "$(tail -1 $OUT/dom0.log)"
    else result all pcibackd daemon-stop FAIL "$(tail -1 $OUT/dom0.log)"; fi
    notify_checks
  fi
  # shellcheck source=xenlane/dom0-systemd.sh
  . "$LANE_REPO/xenlane/dom0-systemd.sh"
  run_systemd
fi
phase "final checks"
leftover=$(xenstore-ls -f /local/domain/0/backend 2>/dev/null | grep -c '/backend/pci/')
if [ "$leftover" = 0 ]; then result all all dom0-clean PASS ""; else result all all dom0-clean FAIL "$leftover backend/pci nodes left"; fi
finish "scenarios done"
