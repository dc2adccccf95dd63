#!/bin/sh
# dom0 /init (busybox, initramfs): load the Xen and 9p modules, mount the host's
# root filesystem (read-only, QEMU -virtfs tag "hostroot") and the lane's output
# directory (tag "laneout"), then chroot into the host's userland, so dom0 runs
# the host's xl/xenstored/python and the project's venv, and the scenario script
# is read from the checkout (xenlane/dom0-main.sh).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev
arg() { sed -n "s/.*lane\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
die() { echo "LANE-DOM0-FATAL $*"; sleep 1; reboot -f; }
echo "LANE: dom0 initramfs up at $(cut -d' ' -f1 /proc/uptime)s"
for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs virtio_pci 9pnet_virtio 9p; do
  modprobe $m || die "modprobe $m"
done
H=/host
mkdir -p $H
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot $H || die "mount hostroot"
mount -t proc proc $H/proc
mount -t sysfs sysfs $H/sys
mount -t devtmpfs dev $H/dev
mkdir -p $H/dev/pts; mount -t devpts devpts $H/dev/pts
mount -t xenfs xenfs $H/proc/xen || die "mount xenfs"
REPO=$(arg repo)
# The checkout may live under a directory that gets a tmpfs below (a CI clone in
# /tmp): keep it reachable by binding it aside and back at the same path.
mkdir -p /repo
mount -o bind "$H$REPO" /repo || die "bind $REPO"
for d in run tmp var/lib/xen var/log; do mount -t tmpfs -o mode=0755 tmpfs $H/$d || die "tmpfs $d"; done
mkdir -p "$H$REPO" 2>/dev/null
mount -o bind /repo "$H$REPO" || die "rebind $REPO"
chmod 1777 $H/tmp
mkdir -p $H/tmp/out
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 laneout $H/tmp/out || die "mount laneout"
[ -f "$H$REPO/xenlane/dom0-main.sh" ] || die "no $REPO/xenlane/dom0-main.sh in the shared host root"
exec chroot $H /bin/bash "$REPO/xenlane/dom0-main.sh"
