#!/usr/bin/env bash
# Install what tests/numa_vm needs: qemu (TCG), busybox-static for the guest
# initramfs, and an unpacked Debian 6.1 kernel (vmlinuz + modules) in a cache dir.
# Idempotent: returns within a second when everything is already there.
#   DSD_VM_CACHE  cache dir (default /var/cache/dsd-vm); the harness reads the same variable.
set -euo pipefail
CACHE="${DSD_VM_CACHE:-/var/cache/dsd-vm}"
APT_OPTS=(-y -q -o DPkg::Lock::Timeout=600)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'; }
have_tools() {
  # busybox-static (not busybox): the initramfs has no libc.
  installed qemu-system-x86 && installed busybox-static \
    && command -v qemu-system-x86_64 >/dev/null 2>&1 \
    && /bin/busybox --list 2>/dev/null | grep -qx cpio
}
have_kernel() {
  [ -f "$CACHE/kernel/READY" ] && [ -f "$(cat "$CACHE/kernel/READY")" ]
}
if have_tools && have_kernel; then
  echo "setup-vm: already done ($CACHE)"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
if ! have_tools; then
  apt-get update -q -o DPkg::Lock::Timeout=600
  apt-get install "${APT_OPTS[@]}" --no-install-recommends qemu-system-x86 busybox-static
fi

if ! have_kernel; then
  # The package lists may be stale if the tools were already installed.
  if ! apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | grep -q .; then
    apt-get update -q -o DPkg::Lock::Timeout=600
  fi
  # Highest ABI number of linux-image-6.1.0-N-amd64 (signed image: vmlinuz + all modules).
  PKG=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' \
        | awk '{print $1}' | sort -t- -k4,4n | tail -n1)
  if [ -z "$PKG" ]; then
    echo "setup-vm: no linux-image-6.1.0-*-amd64 package in the apt lists" >&2
    exit 1
  fi
  rm -rf "$CACHE/kernel.tmp"
  mkdir -p "$CACHE/kernel.tmp/deb"
  (cd "$CACHE/kernel.tmp/deb" && apt-get download -q -o APT::Sandbox::User=root "$PKG")
  dpkg -x "$CACHE/kernel.tmp/deb/"*.deb "$CACHE/kernel.tmp/root"
  rm -rf "$CACHE/kernel.tmp/deb"
  VMLINUZ=$(ls "$CACHE/kernel.tmp/root/boot/"vmlinuz-* | head -n1)
  rm -rf "$CACHE/kernel"
  mv "$CACHE/kernel.tmp" "$CACHE/kernel"
  echo "$CACHE/kernel/root/boot/$(basename "$VMLINUZ")" > "$CACHE/kernel/READY"
fi
echo "setup-vm: ok: $(qemu-system-x86_64 --version | head -n1); kernel $(cat "$CACHE/kernel/READY")"
