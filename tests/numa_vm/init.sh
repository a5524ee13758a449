#!/bin/busybox sh
# Guest /init for tests/numa_vm (runs from the initramfs, busybox only).
# Why each step: the Debian kernel has virtio/9p as modules, so they are loaded by
# hand in dependency order; the host's / is the guest's root (read-only) so the
# host's Python, /work checkout and libraries are all visible at the same paths.
# Kernel command line supplies (as environment variables, since they have no dot):
#   numarun=PATH      script to run inside the chroot (in the run share)
#   dsdvm_pyroot=DIR  host dir with the Python install, shared as tag "pyroot"
#   dsdvm_ncache=DIR  host dir for the numba cache, shared read-write as tag "ncache"
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin /proc /sys /dev /newroot
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

log() { echo "dsdvm-init: $*" > /dev/console; }
stamp() { read up _ < /proc/uptime; echo "$1 $up" >> /newroot/tmp/dsdvm/timings; }
die() {
    log "FATAL: $*"
    echo "init: $*" >> /newroot/tmp/dsdvm/init-error 2>/dev/null
    sync
    poweroff -f
}

for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
         netfs fscache 9pnet 9pnet_virtio 9p; do
    if [ -f /lib/modules/$m.ko ]; then
        insmod /lib/modules/$m.ko || log "insmod $m failed"
    fi
done

P9="trans=virtio,version=9p2000.L,msize=512000"
mount -t 9p -o $P9,cache=loose,ro hostroot /newroot || die "mount hostroot"
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp || die "tmpfs /tmp"
mkdir -p /newroot/tmp/dsdvm
# cache=mmap: writes go straight to the host, so results survive poweroff -f.
mount -t 9p -o $P9,cache=mmap run /newroot/tmp/dsdvm || die "mount run share"
read up _ < /proc/uptime
echo "init $up" >> /newroot/tmp/dsdvm/timings
if [ -n "$dsdvm_pyroot" ]; then
    # cache=loose: imports were 2x slower with cache=mmap.
    mount -t 9p -o $P9,cache=loose,ro pyroot "/newroot$dsdvm_pyroot" || die "mount pyroot"
fi
if [ -n "$dsdvm_repo" ]; then
    mkdir -p "/newroot$dsdvm_repo" 2>/dev/null
    mount -t 9p -o $P9,cache=loose,ro repo "/newroot$dsdvm_repo" || die "mount repo"
fi
if [ -n "$dsdvm_ncache" ]; then
    mount -t 9p -o $P9,cache=mmap ncache "/newroot$dsdvm_ncache" || die "mount numba cache"
fi
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/shm /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs -o mode=755 tmpfs /newroot/run
mount -t tmpfs -o mode=1777 tmpfs /newroot/var/tmp
ifconfig lo 127.0.0.1 up 2>/dev/null

[ -n "$numarun" ] || die "no numarun= on the kernel command line"
stamp start
chroot /newroot /bin/sh "$numarun" \
    > /newroot/tmp/dsdvm/stdout 2> /newroot/tmp/dsdvm/stderr < /dev/null
rc=$?
stamp end
echo "$rc" > /newroot/tmp/dsdvm/rc.tmp && mv /newroot/tmp/dsdvm/rc.tmp /newroot/tmp/dsdvm/rc
log "script exited $rc"
sync
umount /newroot/tmp/dsdvm 2>/dev/null
poweroff -f
