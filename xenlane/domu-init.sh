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
echo "LANE-DOMU-UP uptime=$(up)"
# modprobe blocks until the backend connects (xenbus waits for the device): background it
modprobe xen-pcifront &
n=0; i=0
while [ $i -lt $((WAIT * 4)) ]; do
  n=$(ls /sys/bus/pci/devices 2>/dev/null | wc -l)
  [ "$n" -gt 0 ] && break
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
while :; do sleep 5; done
