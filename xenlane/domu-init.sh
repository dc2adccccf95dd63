#!/bin/sh
# domU /init (busybox): load the unmodified xen-pcifront, wait for the devices it
# exposes, dump each one's config space as the guest sees it, then idle until
# dom0 destroys the domain.  Everything between the LANE-DOMU-* markers is parsed
# by dom0 (xenlane/dom0-main.sh) from the guest's console log.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev
arg() { sed -n "s/.*lane\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
up() { cut -d' ' -f1 /proc/uptime; }
WAIT=$(arg wait); WAIT=${WAIT:-60}
# lane.ndev=N: wait for N functions (dom0 hot-plugs the later ones into the running guest)
NDEV=$(arg ndev); NDEV=${NDEV:-1}
echo "LANE-DOMU-UP uptime=$(up)"
# modprobe blocks until the backend connects (xenbus waits for the device): background it
modprobe xen-pcifront &
n=0; i=0
while [ $i -lt $((WAIT * 4)) ]; do
  n=$(ls /sys/bus/pci/devices 2>/dev/null | wc -l)
  [ "$n" -ge "$NDEV" ] && break
  sleep 0.25; i=$((i + 1))
done
sleep 1    # let the scan of the virtual root finish adding functions
echo "LANE-DOMU-BEGIN uptime=$(up) pci-0-state=$(cat /sys/bus/xen/devices/pci-0/state 2>/dev/null)"
for d in /sys/bus/pci/devices/*; do
  [ -e "$d/vendor" ] || continue
  v=$(cat "$d/vendor"); dv=$(cat "$d/device")
  echo "LANE-DOMU-DEV $(basename "$d") ${v#0x}:${dv#0x}"
  lspci -vvv -xxx -s "$(basename "$d")" 2>&1
  echo "LANE-DOMU-DEV-END"
done
echo "LANE-DOMU-END devices=$n uptime=$(up)"
dmesg | grep -i -E 'pcifront|pci 0000|pci_bus|xen:' | tail -30 | sed 's/^/LANE-DOMU-DMESG /'

# What the guest feels (lane.perf=N, lane.perfsecs=S): the enumeration of the
# first function (removed, then found again by a rescan of the bus: every config
# access of the scan is a backend op) and N reads of its VENDOR/DEVICE dword,
# each one op (fewer if S seconds pass first).
PERF=$(arg perf)
if [ -n "$PERF" ]; then
  f=$(ls -d /sys/bus/pci/devices/* | head -1); b=$(basename "$f")
  scan0=$(cfgloop write /sys/bus/pci/rescan 1)
  echo "LANE-PERF-STEP rescan $scan0"
  echo 1 > "$f/remove"
  scan=$(cfgloop write /sys/bus/pci/rescan 1)
  echo "LANE-PERF-STEP remove+rescan $scan $(ls /sys/bus/pci/devices)"
  reads=$(cfgloop read "/sys/bus/pci/devices/$b/config" 0 "$PERF" "$(arg perfsecs)")
  echo "LANE-PERF dev=$b rescan_us=${scan0#write_us=} enum_us=${scan#write_us=} $reads"
  echo "LANE-PERF-END"
fi

# Drive the device with its own driver (through pcifront's MSI/MSI-X/INTx).
irqs() { grep -E "$1" /proc/interrupts | awk '{ s += $2 } END { print s + 0 }'; }
irq_lines() { grep -E "$1" /proc/interrupts | awk '{ $1 = ""; print }' | tr -s ' ' | tr '\n' ';'; }
nvme_test() {
  modprobe nvme
  i=0; while [ ! -b /dev/nvme0n1 ] && [ $i -lt 240 ]; do sleep 0.25; i=$((i + 1)); done
  echo 3 > /proc/sys/vm/drop_caches
  before=$(irqs nvme)
  sum=$(dd if=/dev/nvme0n1 bs=65536 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)
  after=$(irqs nvme)
  echo "LANE-NVME sha=${sum:-none} irq_before=$before irq_after=$after polled=$(dmesg | grep -c 'completion polled')"
  echo "LANE-NVME-IRQ $(irq_lines nvme)"
  dmesg | grep -i -E "nvme|msi|pcifront|irq" | tail -25 | sed 's/^/LANE-NVME-DMESG /'
  echo "LANE-NVME-END"
}
has_eth0() { i=0; until [ -e /sys/class/net/eth0 ] || [ $i -ge 80 ]; do sleep 0.25; i=$((i + 1)); done; [ -e /sys/class/net/eth0 ]; }
net_test() { # module, its interrupt-mode parameter ("" = none), modes, fallback parameter: per
  # mode up, own ping to dom0, then wait for dom0's three echo requests
  mod=$1; param=$2; peer=$(arg peer)
  for mode in $3; do
    if [ -n "$param" ]; then modprobe "$mod" "$param=$mode"; else modprobe "$mod"; fi
    if ! has_eth0 && [ -n "$4" ]; then
      # the probe failed: say why, then try the driver's other access method
      dmesg | tail -12 | sed 's/^/LANE-NET-DMESG /'
      rmmod "$mod"; modprobe "$mod" $4
      echo "LANE-NET-RETRY mode=$mode $mod $4: eth0 $(has_eth0 && echo present || echo absent)"
    fi
    ip link set eth0 up
    i=0; until ip -6 addr show dev eth0 2>/dev/null | grep 'fe80' | grep -qv tentative || [ $i -ge 120 ]; do sleep 0.25; i=$((i + 1)); done
    before=$(irqs eth0)
    ping -6 -c 3 -w 20 "$peer%eth0" > /tmp/ping.out 2>&1; rc=$?
    after=$(irqs eth0)
    echo "LANE-NET mode=$mode ping_rc=$rc irq_before=$before irq_after=$after $(tail -2 /tmp/ping.out | tr '\n' ' ')"
    echo "LANE-NET-IRQ mode=$mode $(irq_lines eth0)"
    # what a failed ping needs to be understood: the link as the driver sees it
    [ "$rc" = 0 ] || echo "LANE-NET-LINK mode=$mode carrier=$(cat /sys/class/net/eth0/carrier 2>&1) $(ip -6 addr show dev eth0 2>&1 | tr -s ' ' | tr '\n' ';') $(grep -E 'eth0|pcifront|xen-pirq' /proc/interrupts | tr -s ' ' | tr '\n' ';')"
    rx=$(cat /sys/class/net/eth0/statistics/rx_packets)
    echo "LANE-NET-READY mode=$mode"
    i=0; while [ $(( $(cat /sys/class/net/eth0/statistics/rx_packets) - rx )) -lt 3 ] && [ $i -lt 160 ]; do sleep 0.25; i=$((i + 1)); done
    sleep 1
    echo "LANE-NET-DONE mode=$mode rx=$(( $(cat /sys/class/net/eth0/statistics/rx_packets) - rx )) irq=$(irqs eth0)"
    ip link set eth0 down; rmmod "$mod"
  done
  dmesg | grep -i -E "$mod|msi|8139" | tail -15 | sed 's/^/LANE-NET-DMESG /'
  echo "LANE-NET-END"
}
for d in /sys/bus/pci/devices/*; do
  [ -e "$d/vendor" ] || continue
  case "$(cat "$d/vendor"):$(cat "$d/device")" in
    0x1b36:0x0010) nvme_test ;;
    0x8086:0x10d3) net_test e1000e IntMode "$(arg intmodes | tr ',' ' ')" ;;
    0x10ec:0x8139) net_test 8139cp "" 0 ;;      # INTx only (8139too refuses the C+ revision QEMU has)
  esac
done
while :; do sleep 5; done
